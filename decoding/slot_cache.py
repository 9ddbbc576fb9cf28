"""The decoders' KV cache: a fixed number of slots, each a row of preallocated columns, written in place.

Every layer holds keys and values of shape [slots, kv_heads, capacity, head_dim], allocated at the first write
and never concatenated, gathered or cropped. The rows now decoding sit in the leading slots 0..A-1 (the batch
engine, decoding/slots.py, moves the last row into a finished row's slot), so a step's attention reads a view
of the leading rows and columns, never a copy. Slot b holds ``kv_len[b]`` valid columns from column 0 on; what
lies past them is scratch, hidden by the mask and overwritten by later steps.

A forward writes in one of two ways, set on the cache before it runs:
- ``for_step(kv_len, view)``: the batch is slots 0..A-1 and each row's n new tokens go to columns
  ``kv_len[b] .. kv_len[b] + n - 1``; attention sees columns [0, view). n is taken per layer from the
  incoming keys, so early pruning's later layers (fewer slots, decoding/pruning.py) write their own n.
- ``for_prefill(first, rows, length, sources)``: the batch is a set of newcomers' prompts (``length`` columns),
  written from column 0 into slots ``first .. first + rows - 1`` (row i takes batch entry ``sources[i]``:
  completions of one prompt share its pass). Attention sees the prompts alone.

This is transformers' ``Cache`` interface (``update`` per layer): the models' own attention writes here. A
``StaticCache`` would not do: it writes at its own running length, one per layer, not where a tree step needs.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from decoding.batch import additive_from_visible

COLUMN_BUCKET = 16  # attention views are this many columns wide at a time (fewer distinct shapes)
CAPACITY_BUCKET = 256  # the smallest capacity; it doubles from there


def round_up(x: int, bucket: int) -> int:
    return -(-x // bucket) * bucket


def capacity_for(columns: int) -> int:
    """The capacity that holds ``columns``: CAPACITY_BUCKET times a power of two. A compiled or captured step
    is specialised on the cache's shape, so each capacity compiles or captures its shapes again; doubling
    bounds that to a handful of growths (rows up to 8,192 columns pass 6 capacities, not 32) at most twice the
    memory the rows need, and a capacity fixed by the columns alone gives every worker the same shapes (so
    inductor's on-disk cache serves them)."""
    buckets = max(1, round_up(columns, CAPACITY_BUCKET) // CAPACITY_BUCKET)
    return CAPACITY_BUCKET << (buckets - 1).bit_length()


class SlotLayer(CacheLayerMixin):
    """One layer's slots. The write pattern lives on the owning ``SlotCache``."""

    is_compileable = False
    is_sliding = False
    keys: torch.Tensor  # [slots, kv_heads, capacity, head_dim], once initialized
    values: torch.Tensor

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        o = self.owner
        self.keys = key_states.new_zeros(o.num_slots, key_states.shape[1], o.capacity, key_states.shape[3])
        self.values = value_states.new_zeros(o.num_slots, value_states.shape[1], o.capacity, value_states.shape[3])
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.owner.write(self, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.owner.view

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.view, 0

    def get_max_length(self) -> int:
        return self.owner.capacity

    def grow(self, capacity: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)


class SlotCache(Cache):
    """Per-slot KV for ``num_slots`` rows of up to ``capacity`` columns each: grown by ``ensure_capacity`` (to
    ``capacity_for`` sizes), or, ``fixed``, exactly ``capacity`` columns for the cache's life (a worker's memory
    plan, workers/memory.py), which ``ensure_capacity`` refuses to pass."""

    def __init__(self, num_layers: int, num_slots: int, capacity: int = CAPACITY_BUCKET, fixed: bool = False):
        assert num_slots >= 1 and capacity >= 1
        self.num_slots, self.capacity, self.fixed = num_slots, capacity if fixed else capacity_for(capacity), fixed
        self.slot_layers = [SlotLayer(self) for _ in range(num_layers)]  # the same layers, typed as ours
        super().__init__(layers=list(self.slot_layers))
        self.view = 0  # columns the current forward's attention sees
        self._mode: tuple | None = None  # ("step", rows, kv_len) or ("prefill", first, rows, sources)
        self._index: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # this forward's write index by (H, n)

    @classmethod
    def for_model(cls, model, num_slots: int, capacity: int = CAPACITY_BUCKET, fixed: bool = False) -> SlotCache:
        return cls(model.config.get_text_config().num_hidden_layers, num_slots, capacity, fixed)

    # -- what the next forward writes --------------------------------------------------------------------------
    def for_step(self, kv_len: torch.Tensor, view: int) -> None:
        """The next forward is a step over slots 0..A-1 (kv_len [A] long), attending to columns [0, view)."""
        assert kv_len.shape[0] <= self.num_slots and view <= self.capacity, (kv_len.shape, view, self.capacity)
        self._mode, self.view, self._index = ("step", kv_len.shape[0], kv_len), view, {}

    def for_prefill(self, first: int, rows: int, length: int, sources: torch.Tensor | None = None) -> None:
        """The next forward is ``length`` prompt columns for slots first..first+rows-1 (row i from batch entry
        ``sources[i]``, default i)."""
        assert first + rows <= self.num_slots and length <= self.capacity
        self._mode, self.view, self._index = ("prefill", first, rows, sources), length, {}

    def write(self, layer: SlotLayer, key_states: torch.Tensor, value_states: torch.Tensor):
        """Store a forward's new keys and values [B, H, n, D]; return what its attention reads."""
        mode = self._mode
        assert mode is not None, "set the write pattern (for_step / for_prefill) before a forward"
        if mode[0] == "prefill":
            _, first, rows, sources = mode
            n = key_states.shape[2]
            k, v = (key_states, value_states) if sources is None else (key_states[sources], value_states[sources])
            layer.keys[first : first + rows, :, :n] = k
            layer.values[first : first + rows, :, :n] = v
            return key_states, value_states
        _, A, kv_len = mode
        B, H, n, D = key_states.shape
        assert B == A, f"a step over {A} slots got a batch of {B}"
        index = self._index.get((H, n))
        if index is None:  # built once per shape and forward, not per layer
            cols = kv_len[:, None, None] + torch.arange(n, device=kv_len.device)  # [A, 1, n]
            index = self._index[H, n] = (*self._slot_head_index(A, H, kv_len.device), cols)
        layer.keys.index_put_(index, key_states)
        layer.values.index_put_(index, value_states)
        return layer.keys[:A, :, : self.view], layer.values[:A, :, : self.view]

    def _slot_head_index(self, A: int, H: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors [A, 1, 1] (slot) and [1, H, 1] (head) for writes into slots 0..A-1.

        Writes go into the whole per-layer tensor with ``index_put_``, never through a view of it (``[:A]``)
        and never with ``scatter_``: compiled, a mutation through a view or a scatter becomes a copy of the
        whole cache, written back (inductor re-inplaces ``index_put`` on a graph input, not those).
        """
        return (torch.arange(A, device=device)[:, None, None], torch.arange(H, device=device)[None, :, None])

    # -- moving what is held -----------------------------------------------------------------------------------
    def ensure_capacity(self, columns: int) -> None:
        """Room for ``columns`` columns per slot: grown (a copy of what is held) to ``capacity_for`` when short."""
        if columns <= self.capacity:
            return
        if self.fixed:
            raise ValueError(f"a row needs {columns} KV columns; the cache holds {self.capacity} (its fixed capacity)")
        self.capacity = capacity_for(columns)
        for layer in self.slot_layers:
            if layer.is_initialized:
                layer.grow(self.capacity)

    def move_columns(self, src: torch.Tensor, dst: torch.Tensor, layers: slice = slice(None)) -> None:
        """In every layer of ``layers``, slot b's columns ``src[b]`` go to ``dst[b]`` (both [A, L] long, A the
        leading slots). Sources are read before anything is written: overlapping columns are safe."""
        A = src.shape[0]
        src, dst = src[:, None, :], dst[:, None, :]  # [A, 1, L]
        index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in self.slot_layers[layers]:
            for t in (layer.keys, layer.values):
                H = t.shape[1]
                if H not in index:
                    index[H] = self._slot_head_index(A, H, t.device)
                slots, heads = index[H]
                t.index_put_((slots, heads, dst), t[slots, heads, src])  # [A, H, L, D], read before the write

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor, columns: int) -> None:
        """Slot ``src[i]``'s first ``columns`` columns become slot ``dst[i]``'s (src, dst [M] long, disjoint)."""
        for layer in self.slot_layers:
            if layer.is_initialized:
                layer.keys[dst, :, :columns] = layer.keys[src, :, :columns]
                layer.values[dst, :, :columns] = layer.values[src, :, :columns]


def step_mask(kv_len: torch.Tensor, attend: torch.Tensor, view: int, dtype: torch.dtype) -> torch.Tensor:
    """The 4D float mask [A, 1, N, view] of a step whose N new tokens sit at columns kv_len[b].. of their slot.

    Each new token sees the row's held columns (< kv_len[b]) and, among the new ones, those ``attend``
    [A, N, N] bool allows. A float mask: a 4D bool mask is silently wrong on the eager attention path.
    """
    A, N, _ = attend.shape
    rel = torch.arange(view, device=kv_len.device)[None, :] - kv_len[:, None]  # [A, view]: column - first new
    new = (rel >= 0) & (rel < N)  # [A, view]
    among_new = attend.gather(2, rel.clamp(0, N - 1)[:, None, :].expand(A, N, view)) & new[:, None, :]  # [A, N, view]
    visible = (rel < 0)[:, None, :] | among_new
    return additive_from_visible(visible, dtype)[:, None]  # [A, 1, N, view]


def step_view(longest: int, new_tokens: int, capacity: int) -> int:
    """Columns a step's attention reads: the longest row plus the step's new tokens, rounded up to a bucket."""
    return min(capacity, round_up(longest + new_tokens, COLUMN_BUCKET))


FIXED_VIEW_MIN = 64  # the narrowest attention view of a fixed-shape step


def fixed_view(longest: int, new_tokens: int, capacity: int) -> int:
    """Columns a fixed-shape step's attention reads: the longest row plus the step's new tokens, rounded up to
    a power of two (at least FIXED_VIEW_MIN): a few shapes to compile or capture (6 up to 2,048 columns), and
    at most twice the columns the rows hold (256-column buckets would give short rows up to 4x)."""
    need = max(longest + new_tokens, FIXED_VIEW_MIN)
    return min(capacity, 1 << (need - 1).bit_length())
