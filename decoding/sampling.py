"""Sampling that stays exact under tree verification.

Every row owns a stream of uniforms, drawn once from its own ``torch.Generator`` (seeded from the row's
seed): the t-th new token of the row is drawn with the t-th uniform, by inverse CDF over the row's filtered
distribution (temperature, then top-k, then top-p) in vocabulary order. Plain sampling draws token t from the
model's distribution after tokens 0..t-1 with uniform t. PPD draws it the same way at the tree node that holds
tokens 0..t-1 (``sample_accept``): the node's logits are the model's logits after that prefix, so the draw is
the very token plain sampling would make, and the walk goes on into the child holding it, if the tree has
one; otherwise the draw is the step's last token. So a sampled row's tokens do not depend on the tree, the
decoder, the batch it was in or the worker that ran it: only on its seed and the model's numerics.

This acceptance is also the best any exact scheme can do with deterministic candidates: a child is taken with
the model's probability of its token, which is all the mass the tree offers there. Typical acceptance (PPD's,
Medusa's) takes a child whose probability clears a threshold, which over-represents the guessed tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Uniforms are drawn in chunks of this many, so a row's stream is the same whatever length a call asks for.
UNIFORM_CHUNK = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one row draws its tokens (names as vLLM's ``SamplingParams``). temperature 0 is greedy; top_k 0
    and top_p 1 filter nothing; ``seed`` seeds the row's own generator (see ``completion_seed`` for several
    completions of one prompt)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def completion_seed(seed: int, sample_index: int) -> int:
    """The generator seed of completion ``sample_index`` of a prompt whose seed is ``seed``: a hash, so
    neighbouring seeds and indices give unrelated streams."""
    digest = hashlib.sha256(f"{int(seed)}:{int(sample_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def uniform_stream(seed: int, length: int) -> torch.Tensor:
    """The first ``length`` uniforms in [0, 1) of the stream seeded by ``seed`` (float64, on the CPU)."""
    generator = torch.Generator().manual_seed(int(seed))
    chunks = -(-length // UNIFORM_CHUNK)
    stream = torch.cat([torch.rand(UNIFORM_CHUNK, generator=generator, dtype=torch.float64)
                        for _ in range(max(chunks, 1))])
    return stream[:length]


class Filters(NamedTuple):
    """What a batch's sampled rows ask of the filters, known on the host, so that drawing reads nothing back
    from the device to decide how."""

    max_top_k: int  # the largest top_k among the sampled rows (0: none limits by top_k)
    top_p: bool  # some sampled row has top_p < 1
    # Find top_p's cut over the whole sorted vocabulary at once (fixed shapes, no host read), instead of
    # looking at the top 64 first and further only for the rows that need it (cheaper on a CPU, but data-
    # dependent). The cut is the same either way.
    exhaustive: bool = False

    @staticmethod
    def of(params: Sequence[SamplingParams], exhaustive: bool = False) -> Filters:
        sampled = [p for p in params if not p.greedy]
        return Filters(max((p.top_k for p in sampled), default=0), any(p.top_p < 1 for p in sampled), exhaustive)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  uniforms: torch.Tensor, filters: Filters | None = None) -> torch.Tensor:
    """One token per row from logits [B, V]: the argmax where temperature is 0, else the inverse CDF at
    ``uniforms`` [B] of softmax(logits / temperature) restricted to the top_k [B] tokens (0: all), then to
    the most probable tokens whose mass reaches top_p [B] (see ``kept_threshold``). Returns [B] long.

    A row's token depends only on its own logits, parameters and uniform: which filters the other rows of
    the batch ask for changes nothing (an unfiltered row goes through the same arithmetic either way).
    ``filters``: what the rows ask, known on the host; with it nothing here reads the device unless top_p's
    cut is searched the cheap way (not ``exhaustive``). Without it, it is read from the parameters.
    """
    greedy = temperature == 0  # [B]
    argmax = logits.argmax(-1)  # [B]
    if filters is None:
        if bool(greedy.all()):
            return argmax
        sampled = ~greedy
        filters = Filters(int(torch.where(sampled, top_k, 0).max()), bool((sampled & (top_p < 1)).any()))
    scaled = logits.double() / torch.where(greedy, 1.0, temperature.double())[:, None]  # [B, V]
    if filters.max_top_k > 0 or filters.top_p:
        threshold = kept_threshold(scaled, torch.where(greedy, 0, top_k), torch.where(greedy, 1.0, top_p),
                                   max_top_k=filters.max_top_k, top_p_rows=filters.top_p,
                                   exhaustive=filters.exhaustive)  # [B]
        scaled = scaled.masked_fill(scaled < threshold[:, None], -math.inf)
    cdf = scaled.softmax(-1).cumsum(-1)  # [B, V]
    # The first token whose cdf exceeds u * total (kept below the total, whatever u's rounding): never a token
    # of zero probability, never past the end.
    total = cdf[:, -1]  # [B]
    x = torch.minimum(uniforms.double() * total, torch.nextafter(total, torch.zeros_like(total)))  # [B]
    drawn = torch.searchsorted(cdf, x[:, None], right=True).squeeze(1)  # [B]
    return torch.where(greedy, argmax, drawn)


def kept_threshold(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, first_look: int = 64, *,
                   max_top_k: int | None = None, top_p_rows: bool | None = None,
                   exhaustive: bool = False) -> torch.Tensor:
    """The smallest scaled logit a row keeps [B] (-inf: all): the top_k-th largest (0: no limit), raised to
    the largest value whose token, with every more probable one, holds top_p of the mass left by top_k.

    A threshold keeps every token tied with the last one needed, so the kept set does not depend on how a
    sort orders ties (it differs between devices and algorithms). Only the most probable tokens are looked
    at: the top ``first_look``, then 16 times more for rows whose top_p mass lies beyond them, up to the whole
    vocabulary. A full sort of a 49k vocabulary costs ~6 ms a row on a CPU; a sampled step draws up to k+1
    times per row. ``exhaustive``: sort the whole vocabulary of every row at once instead, with no host read
    (a captured step). ``max_top_k`` (the largest top_k, 0: none) and ``top_p_rows`` (some top_p < 1), when
    the caller knows them, spare reading them from the device.
    """
    B, V = scaled.shape
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # [B]
    peak = scaled.max(-1, keepdim=True).values  # [B, 1]
    threshold = torch.full((B,), -math.inf, dtype=scaled.dtype, device=scaled.device)
    limited = k < V
    if max_top_k is None:
        max_top_k = int(k[limited].max()) if bool(limited.any()) else 0
    if max_top_k > 0:
        kth = scaled.topk(min(max_top_k, V), dim=-1).values  # [B, K] descending
        threshold = torch.where(limited, kth.gather(1, (k - 1).clamp(max=kth.shape[1] - 1)[:, None]).squeeze(1),
                                threshold)
    weight = (scaled - peak).exp().masked_fill(scaled < threshold[:, None], 0.0)  # [B, V] unnormalised probs
    mass = weight.sum(-1)  # [B]
    if top_p_rows is False:
        return threshold
    if exhaustive:
        values = scaled.sort(dim=-1, descending=True).values  # [B, V]
        cut, _ = top_p_cut(values, peak, threshold, top_p, mass, whole_vocabulary=True)
        return torch.where(top_p < 1, torch.maximum(threshold, cut), threshold)
    pending = top_p < 1  # rows whose top_p cut is not found yet
    look = first_look
    while bool(pending.any()):
        look = min(look, V)
        rows = pending.nonzero().squeeze(1)
        values = scaled[rows].topk(look, dim=-1).values  # [R, look] descending
        cut, found = top_p_cut(values, peak[rows], threshold[rows], top_p[rows], mass[rows], look == V)
        threshold[rows[found]] = torch.maximum(threshold[rows[found]], cut[found])
        pending[rows[found]] = False
        look *= 16
    return threshold


def top_p_cut(values: torch.Tensor, peak: torch.Tensor, threshold: torch.Tensor, top_p: torch.Tensor,
              mass: torch.Tensor, whole_vocabulary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Over each row's largest scaled logits ``values`` [R, L] (descending), the first value whose token, with
    every more probable one above ``threshold`` [R], holds ``top_p`` [R] of ``mass`` [R] (peak [R, 1]: the
    row's largest logit). Returns (that value [R], whether it lies within the L values looked at [R]).
    ``whole_vocabulary``: L is the whole vocabulary, so a top_p within rounding of 1 keeps everything left."""
    w = (values - peak).exp().masked_fill(values < threshold[:, None], 0.0)
    reached = w.cumsum(-1) >= top_p[:, None].double() * mass[:, None]  # [R, L]
    if whole_vocabulary:
        reached[:, -1] = True
    cut = values.gather(1, reached.long().argmax(-1, keepdim=True)).squeeze(1)  # the first index that reaches
    return cut, reached.any(-1)


def sample_accept(node_tokens: torch.Tensor, node_parent: torch.Tensor, node_valid: torch.Tensor,
                  logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  draw: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor], max_depth: int,
                  all_rows: bool = False):
    """Sampled verification: walk each row's tree from the root, drawing at every node the token the model
    would sample there, and step into the child holding it while there is one.

    node_tokens, node_parent [B, C] long and node_valid [B, C] bool, as for ``greedy_accept``;
    ``logits_at(node [R], rows [R])`` gives the logits [R, V] of batch rows ``rows`` at their nodes;
    ``draw(logits [R, V], depth, rows [R])`` their tokens drawn at that depth below the root (it knows each
    row's position). Only the rows still walking are drawn for at each depth: the lm_head and the draw are a
    good part of a CPU step, and most rows stop at the root. Returns (deepest accepted node [B], tokens
    [B, max_depth + 1], accepted candidates [B]): row b emits ``tokens[b, :accepted[b] + 1]``, the accepted
    candidates and then the draw at the deepest accepted node.

    ``all_rows``: draw for every row at every depth instead (a row whose walk ended draws again at its last
    node, and those draws lie past its count): fixed shapes and no host read, for a captured step.
    """
    B = node_tokens.shape[0]
    device = node_tokens.device
    node = torch.zeros(B, dtype=torch.long, device=device)  # [B] where each row's walk is
    accepted = torch.zeros(B, dtype=torch.long, device=device)
    tokens = torch.zeros(B, max_depth + 1, dtype=torch.long, device=device)
    if all_rows:
        every = torch.arange(B, device=device)
        walking = torch.ones(B, dtype=torch.bool, device=device)  # [B] every draw so far was in the tree
        for depth in range(max_depth + 1):
            drawn = draw(logits_at(node, every), depth, every)  # [B]
            tokens[:, depth] = drawn
            if depth == max_depth:
                break
            child = (node_parent == node[:, None]) & (node_tokens == drawn[:, None]) & node_valid  # [B, C]
            child[:, 0] = False
            walking = walking & child.any(1)
            node = torch.where(walking, child.long().argmax(1), node)
            accepted += walking.long()
        return node, tokens, accepted
    rows = torch.arange(B, device=device)  # [R] rows whose every draw so far was in the tree
    for depth in range(max_depth + 1):
        at = node[rows]  # [R]
        drawn = draw(logits_at(at, rows), depth, rows)  # [R]
        tokens[rows, depth] = drawn
        if depth == max_depth:
            break
        child = ((node_parent[rows] == at[:, None]) & (node_tokens[rows] == drawn[:, None])
                 & node_valid[rows])  # [R, C]
        child[:, 0] = False  # the root is nobody's child
        found = child.any(1)  # siblings hold distinct tokens: at most one child matches
        node[rows] = torch.where(found, child.long().argmax(1), at)
        accepted[rows] += found.long()
        rows = rows[found]
        if rows.numel() == 0:  # every row has its last token
            break
    return node, tokens, accepted
