"""Plain batched greedy decoding with the same ragged-cache handling as PPD: the baseline.

One token per row per step; the prefill's last position gives the first. A row with sampling parameters
draws its t-th token with the t-th uniform of its own stream (decoding/sampling.py), as PPD does. Rows keep
the holes their prefill padding left (hidden by the mask) instead of moving KV every step: every row advances
by exactly one column, so nothing ever needs compacting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from decoding.batch import ActiveRows, StopCheck, check_prompts, new_cache, one_token_forward, prefill
from decoding.results import RowResult
from decoding.sampling import RowSampler, SamplingParams


class VanillaDecoder:
    def __init__(self, model: nn.Module, eos_token_ids: Sequence[int] = ()):
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: Sequence[SamplingParams] | None = None,
                 stop: Sequence[StopCheck | None] | None = None) -> list[RowResult]:
        """``sampling``: per-row parameters (None: all greedy); ``stop``: per-row stop checks (stop strings)."""
        check_prompts(prompts)
        device = self.lm_head.weight.device
        rows = ActiveRows(len(prompts), max_new_tokens, self.eos_token_ids, device, stop)
        if rows.size == 0:
            return rows.results
        sampler = RowSampler.for_rows(sampling, rows.limits, 0, device)  # None: all greedy, the argmax
        active = [prompts[i] for i in rows.index.tolist()]
        cache = new_cache(self.model)
        kv_valid, hidden = prefill(self.model, cache, active, device)  # [B, P], [B, P, H]
        position = kv_valid.sum(1)  # [B]: where each row's next token goes
        last = hidden.gather(1, (position - 1)[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]  # [B, H]

        while True:
            logits = self.lm_head(last)  # [B, V]
            token = logits.argmax(-1) if sampler is None else sampler.draw(logits, rows.index, rows.emitted())  # [B]
            keep = rows.commit(token[:, None], torch.ones_like(token))
            token, position, kv_valid = rows.drop_finished(keep, cache, token, position, kv_valid)
            if rows.size == 0:
                return rows.results
            last = one_token_forward(self.decoder, cache, token, kv_valid, position, self.lm_head.weight.dtype)
            B = token.shape[0]
            kv_valid = torch.cat([kv_valid, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
            position = position + 1
