"""The oracles: naive greedy decoding and naive sampling, one row at a time, the whole sequence re-run every
step, no cache.

Slow on purpose and obviously right; the fast decoders are tested against it and against transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from decoding.batch import embedding_weight
from decoding.results import FinishReason, RowResult
from decoding.sampling import GREEDY, SamplingParams, sample_tokens, uniform_stream


def reference_greedy(model: PreTrainedModel, prompt: Sequence[int], max_new_tokens: int,
                     eos_token_ids: Sequence[int] = ()) -> RowResult:
    return reference_sample(model, prompt, max_new_tokens, GREEDY, eos_token_ids)


@torch.inference_mode()
def reference_sample(model: PreTrainedModel, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams,
                     eos_token_ids: Sequence[int] = ()) -> RowResult:
    """Plain sampling: token t drawn from the model's filtered distribution after tokens 0..t-1 with the
    t-th uniform of the row's stream (decoding/sampling.py); temperature 0 is the argmax."""
    device = embedding_weight(model).device
    uniforms = uniform_stream(params.seed, max_new_tokens).to(device)
    seq = list(prompt)
    result = RowResult()
    for t in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([seq], device=device)).logits[:, -1]  # [1, V]
        if params.greedy:
            token = int(logits[0].argmax())
        else:
            token = int(sample_tokens(logits, torch.tensor([params.temperature], device=device),
                                      torch.tensor([params.top_k], device=device),
                                      torch.tensor([params.top_p], device=device), uniforms[t : t + 1])[0])
        seq.append(token)
        result.token_ids.append(token)
        result.num_steps += 1
        result.accepted_per_step.append(1)
        if token in eos_token_ids:
            result.finish_reason = FinishReason.STOP
            return result
    result.finish_reason = FinishReason.LENGTH
    return result
