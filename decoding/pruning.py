"""ProPD early pruning: after an early layer, drop the tree nodes that are unlikely to be accepted, with their
subtrees and prompt tokens, before the remaining layers run.

A light head reads each internal node's hidden state after the first L layers and predicts the model's next
token there. A child survives only when its token is among its parent's ``keep_top_k`` head predictions (and its
parent survives); the root always survives. Every surviving slot attends only to surviving slots (a node's
ancestors survive with it, a prompt token's node and chain survive with it), so its final hidden state is
the one the unpruned pass computes, and verification accepts the same path among the survivors. Pruning
only removes guesses and never accepts one: the output stays plain decoding's (greedy or sampled). Only tau
can fall, when the head's top ``keep_top_k`` at a node misses the child that verification would take.

The early layers run over every slot; the later layers over the survivors only, compacted per row and padded
to the widest row. The KV cache is then ragged across layers for the rest of the step: the early layers hold
this step's N slots, the later ones N' <= N. The step maps the accepted path into both layouts when it keeps
its KV (``decoding/ppd.py``), after which every layer holds the same columns again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from decoding.tree import on_whole_root_path


class PruneHead(nn.Module):
    """A low-rank residual adapter on the hidden state after the first ``layer`` decoder layers (the input of
    layer ``layer``, 0-based), read out through the model's own final norm and lm_head, which it does not own:
    logits = lm_head(norm(h + up(down(h)))). ``up`` starts at zero, so an untrained head is the logit lens.
    Only ``down`` and ``up`` train (rank x hidden each): the base model stays frozen."""

    def __init__(self, hidden_size: int, layer: int, rank: int = 64, keep_top_k: int = 8):
        super().__init__()
        if layer < 1:
            raise ValueError("the prune head reads the output of at least one layer (layer >= 1)")
        if keep_top_k < 1 or rank < 1:
            raise ValueError("keep_top_k and rank must be >= 1")
        self.layer, self.keep_top_k = layer, keep_top_k
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor, norm: nn.Module, lm_head: nn.Module) -> torch.Tensor:
        """hidden [..., H] after the first ``layer`` layers -> logits [..., V]."""
        return lm_head(norm(hidden + self.up(self.down(hidden))))


def run_layers(decoder: Any, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
               layers: slice) -> torch.Tensor:
    """Run ``decoder.layers[layers]`` over ``hidden`` [B, S, H] through the public module API, as the decoder's
    own forward does (rotary embeddings from ``positions`` [B, S]; ``mask`` the 4D float mask [B, 1, S, T+S]).
    Each layer appends its KV to ``cache`` under its own index. No final norm."""
    position_embeddings = decoder.rotary_emb(hidden, position_ids=positions)
    for layer in decoder.layers[layers]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=positions,
                       cache=cache, use_cache=True)
    return hidden


def check_splittable(decoder: Any, head: PruneHead) -> None:
    """Pruning runs the decoder's layers one by one: it needs a Llama-style decoder (layers, rotary_emb, norm)."""
    missing = [name for name in ("layers", "rotary_emb", "norm") if not hasattr(decoder, name)]
    if missing:
        raise ValueError(f"early pruning needs a decoder with {missing} (Llama-style); this one has none")
    if not 1 <= head.layer < len(decoder.layers):
        raise ValueError(f"the prune head reads layer {head.layer}; the model has {len(decoder.layers)} layers")


def kept_nodes(node_tokens: torch.Tensor, parent_top: torch.Tensor, node_parent: torch.Tensor,
               node_valid: torch.Tensor, ancestor_or_self: torch.Tensor) -> torch.Tensor:
    """Which nodes survive: the root, and every node whose own token and every ancestor's token is among its
    parent's head predictions.

    node_tokens [B, C]; parent_top [B, C, K]: the head's top-K tokens at each node (rows of leaves unused);
    node_parent [B, C] long; node_valid [B, C] bool; ancestor_or_self [B, C, C] bool. Returns [B, C] bool.
    """
    K = parent_top.shape[-1]
    at_parent = parent_top.gather(1, node_parent[..., None].expand(-1, -1, K))  # [B, C, K]
    likely = (at_parent == node_tokens[..., None]).any(-1) & node_valid  # [B, C]
    likely[:, 0] = True  # the root is committed: never pruned
    return on_whole_root_path(likely, ancestor_or_self)  # [B, C]: the node and all its ancestors likely


@dataclass(frozen=True)
class Compaction:
    """The surviving slots of each row, moved to the front: ``order`` [B, N'] gives each compacted slot's
    original slot; ``valid`` [B, N'] marks real ones (rows with fewer survivors are padded); ``position`` [B, N]
    gives each original slot's compacted index (-1 when pruned)."""

    order: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor

    @property
    def width(self) -> int:
        return self.order.shape[1]


def compact(keep: torch.Tensor) -> Compaction:
    """keep [B, N] bool -> the compaction of the kept slots, in their original order. Syncs the device once
    (the compacted width is data-dependent)."""
    B, N = keep.shape
    counts = keep.sum(1)  # [B]
    width = int(counts.max())
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :width]  # [B, N']: kept first
    valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]  # [B, N']
    position = torch.full((B, N), -1, dtype=torch.long, device=keep.device)
    position.scatter_(1, order, torch.where(valid, torch.arange(width, device=keep.device)[None, :], -1))
    return Compaction(order=order, valid=valid, position=position)


def compacted_attend(attend: torch.Tensor, c: Compaction) -> torch.Tensor:
    """Which surviving slots see which [B, N', N'] bool (from the tree's ``attend`` [B, N, N]): what they saw
    before, among the survivors; padding sees itself only (with the cached prefix, no attention row is empty)."""
    B, width = c.order.shape
    sub = attend.gather(1, c.order[..., None].expand(-1, -1, attend.shape[2]))  # [B, N', N]
    sub = sub.gather(2, c.order[:, None, :].expand(-1, width, -1))  # [B, N', N']
    sub = sub & c.valid[:, :, None] & c.valid[:, None, :]
    return sub | (torch.eye(width, dtype=torch.bool, device=attend.device)[None] & ~c.valid[:, :, None])
