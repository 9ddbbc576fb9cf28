"""Plain batched decoding, one token per row per step: the baseline, on the same slots as PPD.

A row's prompt but its last token is prefilled into its slot; the last token is the first root. Each step
runs every row's root through the model at column ``kv_len`` of its slot and draws the next token there: the
argmax, or for a row with sampling parameters the t-th token with the t-th uniform of its own stream
(decoding/sampling.py), as PPD does. Nothing ever moves: every row advances by exactly one column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from decoding.batch import StopCheck
from decoding.protocol import ActiveView, Decoder, StepOutput, StepPlan
from decoding.results import RowResult
from decoding.sampling import SamplingParams
from decoding.slot_cache import SlotCache, step_mask
from decoding.slots import generate as generate_in_slots
from decoding.tree import StepSizes


def root_only_step(decoder: nn.Module, lm_head: nn.Linear, cache: SlotCache, kv_len: torch.Tensor,
                   root: torch.Tensor, guesses: torch.Tensor, draw, view: int) -> StepOutput:
    """One plain decoding step over slots 0..A-1: each row's root (root [A]) at position and column
    ``kv_len[b]`` (kv_len [A] long), attention reading KV columns [0, ``view``). ``draw``: None for the argmax,
    else draw(logits [R, V], depth, rows [R]).

    Returns tokens [A, 1], counts [A] (ones), the next root [A], ``guesses`` [A, k, top_k] zeroed (no guesses)
    and the next state [A] (zeros): the decoders' ``step`` contract (decoding/protocol.StepOutput)."""
    A = root.shape[0]
    self_only = torch.ones(A, 1, 1, dtype=torch.bool, device=root.device)  # [A, 1, 1]
    cache.for_step(kv_len, view)
    mask = step_mask(kv_len, self_only, view, lm_head.weight.dtype)  # [A, 1, 1, view]
    hidden = decoder(input_ids=root[:, None], attention_mask=mask, position_ids=kv_len[:, None],
                     cache=cache, use_cache=True).last_hidden_state[:, 0]  # [A, H]
    logits = lm_head(hidden)  # [A, V]
    token = logits.argmax(-1) if draw is None else draw(logits, 0, torch.arange(A, device=root.device))  # [A]
    return StepOutput(token[:, None], torch.ones_like(token), token, torch.zeros_like(guesses), torch.zeros_like(token))


ROOT_ONLY = StepSizes(slots=1, nodes=1, depth=0, prompts=0, internal=0)


class VanillaDecoder(Decoder):
    """Plain decoding through the decoder protocol (decoding/protocol.py; no guesses: k = 0)."""

    PLAN = StepPlan(None, ROOT_ONLY, ROOT_ONLY)

    def __init__(self, model: PreTrainedModel, eos_token_ids: Sequence[int] = ()):
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def k(self) -> int:
        return 0

    @property
    def top_k(self) -> int:
        return 1

    @property
    def max_step_tokens(self) -> int:
        return 1

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: Sequence[SamplingParams] | None = None,
                 stop: Sequence[StopCheck | None] | None = None) -> list[RowResult]:
        """``sampling``: per-row parameters (None: all greedy); ``stop``: per-row stop checks (stop strings)."""
        return generate_in_slots(self, prompts, max_new_tokens, sampling, stop)

    # The decoder protocol (decoding/protocol.py).
    def plan_step(self, rows: ActiveView | None) -> StepPlan:
        return self.PLAN

    def step(self, cache: SlotCache, buffers, kv_len: torch.Tensor, root: torch.Tensor, guesses: torch.Tensor,
             state: torch.Tensor, draw=None, *, sizes: StepSizes, view: int) -> StepOutput:
        return root_only_step(self.decoder, self.lm_head, cache, kv_len, root, guesses, draw, view)
