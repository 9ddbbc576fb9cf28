"""The oracle: naive greedy decoding, one row at a time, the whole sequence re-run every step, no cache.

Slow on purpose and obviously right; the fast decoders are tested against it and against transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from decoding.results import FinishReason, RowResult


@torch.inference_mode()
def reference_greedy(model: nn.Module, prompt: Sequence[int], max_new_tokens: int,
                     eos_token_ids: Sequence[int] = ()) -> RowResult:
    device = model.get_input_embeddings().weight.device
    seq = list(prompt)
    result = RowResult()
    while len(result.token_ids) < max_new_tokens:
        logits = model(input_ids=torch.tensor([seq], device=device)).logits  # [1, S, V]
        token = int(logits[0, -1].argmax())
        seq.append(token)
        result.token_ids.append(token)
        result.num_steps += 1
        result.accepted_per_step.append(1)
        if token in eos_token_ids:
            result.finish_reason = FinishReason.STOP
            return result
    result.finish_reason = FinishReason.LENGTH
    return result
