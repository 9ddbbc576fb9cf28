"""Machinery shared by the batched decoders: ragged prefill, additive masks, KV compaction, row bookkeeping.

The KV cache is a transformers ``DynamicCache`` of shape [B, heads, T, head_dim] per layer. Rows are ragged:
row b's valid KV columns are given by a bool map ``kv_valid`` [B, T]; everything else in the row is a hole,
hidden by the attention mask. New tokens are always appended at columns T.. by the model; positions are
per row (``position_ids``), so holes never shift a row's positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from transformers import DynamicCache

from decoding.results import FinishReason, RowResult

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
    P = int(lens.max()) if B else 0
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    cols = torch.arange(P, device=device)
    valid = cols[None, :] < lens[:, None]  # [B, P]
    causal = cols[None, :, None] >= cols[None, None, :]  # [1, P, P]: query i sees key j <= i
    attend = (causal & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)  # [B, P, P]
    positions = torch.where(valid, cols[None, :], 0)  # [B, P]
    return ids, valid, attend, positions


def shared_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]] | None:
    """(the distinct prompts, each row's index among them) when some rows share a prompt, else None."""
    first: dict[tuple[int, ...], int] = {}
    index = [first.setdefault(tuple(p), len(first)) for p in prompts]
    if len(first) == len(prompts):
        return None
    return [list(p) for p in first], index


def prefill(model, cache: DynamicCache, prompts: Sequence[Sequence[int]], device: torch.device):
    """Run ragged prompts, right-padded, into an empty ``cache``. Returns (kv_valid [B, P], hidden [B, P, H]).

    Rows with the same prompt (several completions of one prompt) share one pass: the distinct prompts run
    once, and their KV and hidden states are copied to each of their rows."""
    shared = shared_prompts(prompts)
    if shared is not None:
        distinct, of_row = shared
        valid, hidden = prefill(model, cache, distinct, device)  # [U, P], [U, P, H]
        index = torch.tensor(of_row, dtype=torch.long, device=device)  # [B]
        if cache.get_seq_length() > 0:
            cache.batch_select_indices(index)  # row b becomes row index[b] (rows repeat)
        return valid[index], None if hidden is None else hidden[index]
    ids, valid, attend, positions = pad_prompts(prompts, device)
    if ids.shape[1] == 0:
        return valid, None
    mask = additive_mask(torch.zeros(len(prompts), 0, dtype=torch.bool, device=device), attend, model.dtype)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 cache=cache, use_cache=True).last_hidden_state
    return valid, hidden


def one_token_forward(decoder, cache: DynamicCache, tokens: torch.Tensor, kv_valid: torch.Tensor,
                      positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A plain decoding pass: each row's one token (tokens, positions [B] long) over the columns its
    ``kv_valid`` [B, T] holds, appended to the cache at column T. Returns the hidden states [B, H]."""
    B = tokens.shape[0]
    self_only = torch.ones(B, 1, 1, dtype=torch.bool, device=tokens.device)  # [B, 1, 1]
    mask = additive_mask(kv_valid, self_only, dtype)  # [B, 1, 1, T+1]
    hidden = decoder(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                     cache=cache, use_cache=True).last_hidden_state  # [B, 1, H]
    return hidden[:, 0]


def move_kv(cache: DynamicCache, src: torch.Tensor, dst: torch.Tensor, layers: slice = slice(None)) -> None:
    """For every layer in ``layers`` and row b, copy KV columns ``src[b]`` to ``dst[b]`` (both [B, L] long).

    Sources are read before anything is written, so overlapping source and destination columns are safe.
    """
    index: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # built once per shape, not per layer
    for layer in cache.layers[layers]:
        for name in ("keys", "values"):
            t = getattr(layer, name)  # [B, H, T, D]
            B, H, _, D = t.shape
            if (B, H, D) not in index:
                index[B, H, D] = (src[:, None, :, None].expand(B, H, -1, D), dst[:, None, :, None].expand(B, H, -1, D))
            src_i, dst_i = index[B, H, D]
            t.scatter_(2, dst_i, t.gather(2, src_i))


class RowKV(NamedTuple):
    """Where each row's KV columns sit in the cache, for a decoder that appends a tree per step.

    valid [B, T] bool: the columns the row holds, in order; the others are holes, hidden by the mask.
    length [B] long: how many columns the row holds, which is the position of its next token.
    end [B] long: one past the row's last held column. A tree step moves its accepted path there, so no
    hole opens. A root-only step (plain decoding) leaves every row's one new column where the model wrote
    it, at T, as plain decoding does: no KV moves, and a row that ended before T gets a hole of
    T - end columns. Holes open only when a tree step (rows ragged) is followed by a root-only step, and
    at the prefill (right-padded prompts); they cost nothing, as every row attends over T columns anyway.
    """

    valid: torch.Tensor
    length: torch.Tensor
    end: torch.Tensor

    @classmethod
    def right_padded(cls, valid: torch.Tensor) -> RowKV:
        """Rows held from column 0 on, as a ragged prefill leaves them (valid [B, P])."""
        length = valid.sum(1)  # [B]
        return cls(valid, length, length)

    def after_step(self, start: torch.Tensor, kept: torch.Tensor, new_columns: int) -> RowKV:
        """The step appended ``new_columns`` to the cache; row b now holds ``kept[b]`` more columns from column
        ``start[b]`` on (start, kept: [B] long)."""
        B, T = self.valid.shape
        cols = torch.arange(T + new_columns, device=start.device)  # [T+S]
        new_end = start + kept  # [B]
        held = (cols[None, :] >= start[:, None]) & (cols[None, :] < new_end[:, None])  # [B, T+S]
        valid = torch.cat([self.valid, self.valid.new_zeros(B, new_columns)], 1) | held
        return RowKV(valid, self.length + kept, new_end)

    def cropped(self, cache: DynamicCache) -> RowKV:
        """Drop the cache's columns past every row's end (a step's rejected slots, a finished row's)."""
        T = int(self.end.max())  # syncs the device
        crop_cache(cache, T)
        return RowKV(self.valid[:, :T], self.length, self.end)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision logits for softmax / averaging; leave fp32 and fp64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Drop every layer's KV columns from ``length`` on. Layers are cropped one by one: after a pruned step
    (decoding/pruning.py) the early layers hold more columns than the later ones."""
    for layer in cache.layers:
        excess = layer.get_seq_length() - length
        if excess > 0:  # crop takes a negative count; crop(-0) would not be a no-op
            layer.crop(-excess)


class ActiveRows:
    """Bookkeeping for the rows still decoding: their results, limits and stop conditions.

    ``index[b]`` is the input position of active row b. Rows leave the batch once finished, so a finished
    row stops costing compute.
    """

    def __init__(self, num_rows: int, max_new_tokens: int | Sequence[int], eos_token_ids: Sequence[int],
                 device: torch.device, stop: Sequence[StopCheck | None] | None = None):
        limits = [max_new_tokens] * num_rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != num_rows:
            raise ValueError(f"max_new_tokens has {len(limits)} entries for {num_rows} prompts")
        if any(m < 0 for m in limits):
            raise ValueError("max_new_tokens must be >= 0")
        if stop is not None and len(stop) != num_rows:
            raise ValueError(f"stop has {len(stop)} entries for {num_rows} prompts")
        self.limits = limits
        self.stop = list(stop) if stop is not None else [None] * num_rows
        self.eos = set(int(e) for e in eos_token_ids)
        self.results = [RowResult() for _ in range(num_rows)]
        for r, limit in zip(self.results, limits):
            if limit == 0:
                r.finish_reason = FinishReason.LENGTH
        self.index = torch.tensor([i for i in range(num_rows) if limits[i] > 0], dtype=torch.long, device=device)

    @property
    def size(self) -> int:
        return int(self.index.numel())

    def commit(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Append ``tokens[b, :counts[b]]`` to each active row, honouring EOS and max_new_tokens exactly.

        tokens [B, L] long, counts [B] long. Returns keep [B] bool: rows still decoding.
        """
        tokens_l, counts_l, rows = tokens.tolist(), counts.tolist(), self.index.tolist()  # one device sync
        keep = []
        for row, toks, count in zip(rows, tokens_l, counts_l):
            res = self.results[row]
            room = self.limits[row] - len(res.token_ids)
            new = toks[: min(count, room)]
            for i, t in enumerate(new):
                if t in self.eos:
                    new = new[: i + 1]
                    res.finish_reason = FinishReason.STOP
                    break
            start = len(res.token_ids)
            res.token_ids.extend(new)
            stopped = self.stop[row](res.token_ids, start) if self.stop[row] is not None and new else None
            if stopped is not None:
                keep_len, res.stop_reason = stopped
                del res.token_ids[keep_len:]
                new = res.token_ids[start:]
                res.finish_reason = FinishReason.STOP
            res.num_steps += 1
            res.accepted_per_step.append(len(new))
            if res.finish_reason is None and len(res.token_ids) >= self.limits[row]:
                res.finish_reason = FinishReason.LENGTH
            keep.append(res.finish_reason is None)
        return torch.tensor(keep, dtype=torch.bool, device=self.index.device)

    def emitted(self) -> torch.Tensor:
        """How many tokens each active row has emitted so far [B] (the position of its next token)."""
        return torch.tensor([len(self.results[r].token_ids) for r in self.index.tolist()], dtype=torch.long,
                            device=self.index.device)

    def drop_finished(self, keep: torch.Tensor, cache: DynamicCache, *row_tensors: torch.Tensor):
        """Remove finished rows from the index, the cache and every per-row tensor (leading axis B)."""
        if bool(keep.all()):
            return row_tensors
        idx = keep.nonzero().squeeze(1)
        self.index = self.index[idx]
        if cache.get_seq_length() > 0:
            cache.batch_select_indices(idx)
        return tuple(t[idx] for t in row_tensors)


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: a decoder needs at least one prompt token")
