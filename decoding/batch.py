"""Small pieces shared by the decoders and the training scripts: additive masks, right-padded prompts, dtype
helpers. The decoders' KV lives in decoding/slot_cache.py; training and distillation use a ``DynamicCache``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

# A row's stop condition beyond EOS (stop strings live above the decoder, with the tokenizer): given the row's
# tokens and the index of the first new one, (tokens to keep, the stop string) once a stop string is complete.
StopCheck = Callable[[list[int], int], "tuple[int, str] | None"]


def additive_mask(kv_valid: torch.Tensor, attend: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4D float mask for N new tokens over T cached columns: [B, 1, N, T + N].

    kv_valid [B, T] bool: cached columns each row may see (all new tokens see the same prefix).
    attend [B, N, N] bool: which new tokens see which (the tree, or causal).
    A float mask, not bool: a 4D bool mask is silently wrong on the eager attention path.
    """
    B, N, _ = attend.shape
    assert kv_valid.shape[0] == B
    visible = torch.cat([kv_valid[:, None, :].expand(B, N, -1), attend], dim=-1)  # [B, N, T+N]
    return additive_from_visible(visible, dtype)[:, None]  # [B, 1, N, T+N]


def additive_from_visible(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool visibility -> additive float mask of the same shape: 0 where visible, dtype-min elsewhere."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def pad_prompts(prompts: Sequence[Sequence[int]], device: torch.device):
    """Right-pad ragged prompts. Returns (ids [B, P], valid [B, P] bool, attend [B, P, P] bool, positions [B, P]).

    ``attend`` is causal over each row's real tokens; padding queries see themselves only, so no attention
    row is empty. Padding positions are 0 (never seen by a real token).
    """
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    P = max((len(p) for p in prompts), default=0)  # from the host lists: no read of the device
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    cols = torch.arange(P, device=device)
    valid = cols[None, :] < lens[:, None]  # [B, P]
    causal = cols[None, :, None] >= cols[None, None, :]  # [1, P, P]: query i sees key j <= i
    attend = (causal & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)  # [B, P, P]
    positions = torch.where(valid, cols[None, :], 0)  # [B, P]
    return ids, valid, attend, positions


def embedding_weight(model: Any) -> torch.Tensor:
    """The model's input embedding matrix [V, H]: its device and dtype are the model's."""
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision logits for softmax / averaging; leave fp32 and fp64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Drop every layer's KV columns from ``length`` on. Layers are cropped one by one: after a pruned step
    (decoding/pruning.py) the early layers hold more columns than the later ones."""
    layers: list[Any] = list(cache.layers)  # DynamicLayers (typed as the union of every cache's layer kinds)
    for layer in layers:
        excess = layer.get_seq_length() - length
        if excess > 0:  # crop takes a negative count; crop(-0) would not be a no-op
            layer.crop(-excess)
