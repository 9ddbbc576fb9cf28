"""transformers' own greedy ``generate``: the plain-decoding baseline the benchmarks compare against."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.inference_mode()
def hf_greedy(model, prompts: Sequence[Sequence[int]], new_tokens: int, pad_id: int = 0, width: int | None = None,
              static_cache: bool = False) -> list[list[int]]:
    """Exactly ``new_tokens`` greedy tokens per prompt (EOS ignored), one batch, prompts left-padded to ``width``
    (default: the longest; `generate` needs left padding for a batch). ``static_cache``: transformers' static
    KV cache, with which `generate` compiles the forward on CUDA (its documented fast path); else its default
    dynamic cache, eager."""
    device = model.get_input_embeddings().weight.device
    width = width or max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens, eos_token_id=None,
                         do_sample=False, pad_token_id=pad_id, top_k=None, top_p=None, temperature=None,
                         cache_implementation="static" if static_cache else None)
    return out[:, width:].tolist()
