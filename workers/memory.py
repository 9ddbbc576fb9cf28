"""A worker's memory plan: how many decode slots of how many KV columns its device holds, decided before the
first step, so that the KV cache is allocated once (the gpt-fast way) and never grows mid-job.

Contract:
- The budget. On CUDA, ``gpu_memory_utilization`` of the device's total memory (vLLM's meaning), less what is in
  use once the model is loaded (its weights, the CUDA context, other processes). On a CPU, ``cpu_memory_share`` of
  the host's available memory once the model is loaded.
- What it holds: the peak activation of the widest step (a full batch at the widest tree, over every column) or of
  the widest prefill chunk, whichever is larger; as much again for the CUDA graphs' pool when the step is captured,
  plus a little for each of the MAX_GRAPHS graphs a worker holds at most (an LRU, decoding/runners.py); and
  KV for slots x capacity.
- The capacity (columns per slot) is a function of the configuration alone: the prompt budget plus
  ``max_new_tokens``, capped by the model's context, plus room for the widest step, rounded up to 256 columns. Every
  worker and every rerun of a job share it, hence its shapes and compile caches.
- Slots: a fixed batch size that does not fit raises ``DoesNotFit`` with the numbers; ``auto`` takes the
  latency-best batch size among those that fit (``max_slots``). A model that leaves no room for one slot raises too.

Nothing here allocates: ``plan_memory`` is arithmetic over a ``ModelShape`` and the device's (total, free) bytes,
so a CPU test can plan for any model shape on any faked device.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from decoding.slot_cache import CAPACITY_BUCKET, round_up
from decoding.slots import PREFILL_TOKENS  # newcomers are prefilled in chunks of this many padded tokens

# Columns reserved past a row's prompt and new tokens for one step's tree (the widest a plan may choose:
# profiling.latency.DEFAULT_SLOTS' last); plain decoding needs 1.
PPD_STEP_ROOM = 256

# The most step graphs (or compiled shapes) a worker holds at once; each holds its output and launch
# parameters beyond the shared pool, budgeted at GRAPH_OVERHEAD bytes.
MAX_GRAPHS = 64
GRAPH_OVERHEAD = 4 << 20

GiB = 1 << 30


class DoesNotFit(ValueError):
    """The configuration asks for more memory than the worker's budget; the message gives the numbers."""


@dataclass(frozen=True)
class ModelShape:
    """What a model's memory needs depend on."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_context: int
    dtype_bytes: int
    weights_bytes: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        c = model.config.get_text_config()
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        dtype = next(model.parameters()).dtype
        return cls(layers=c.num_hidden_layers, heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, hidden=c.hidden_size,
                   intermediate=getattr(c, "intermediate_size", 4 * c.hidden_size),
                   vocab=c.vocab_size, max_context=c.max_position_embeddings,
                   dtype_bytes=torch.empty((), dtype=dtype).element_size(), weights_bytes=weights)

    @property
    def kv_bytes_per_column(self) -> int:
        """Keys and values of one token in every layer."""
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes


def forward_activation_bytes(shape: ModelShape, rows: int, tokens: int, columns: int, logits: bool) -> int:
    """An upper estimate of one forward's peak activation: ``rows`` x ``tokens`` new tokens attending to ``columns``
    columns. One layer's live tensors at once (the residual stream, the normed input, q/k/v, the MLP's gate, up and
    product, the attention scores and the float mask, as the math kernel materialises them), plus float32 logits
    and one copy of them (sampling and verification read them) when the forward ends in the LM head."""
    t = rows * tokens
    d = shape.dtype_bytes
    per_token = (3 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * shape.head_dim + 3 * shape.intermediate) * d
    scores = rows * (shape.heads + 1) * tokens * columns * max(d, 4)
    head = 2 * t * shape.vocab * 4 if logits else 0
    return t * per_token + scores + head


def job_capacity(max_prompt_tokens: int, max_new_tokens: int, max_context: int, step_room: int) -> int:
    """Columns per slot for a job's limits: a row's prompt and new tokens (at most the model's context) and one
    step's tree past them, rounded up to CAPACITY_BUCKET."""
    return round_up(min(max_prompt_tokens + max_new_tokens, max_context) + step_room, CAPACITY_BUCKET)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes: the CUDA device's, or the host's (MemTotal, MemAvailable)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes, per worker. ``room`` is the budget less what was in use before the KV (weights included on CUDA)."""

    device: str
    budget: int
    in_use: int
    weights: int
    activation: int
    graph_pool: int
    kv_per_slot: int
    slots: int
    capacity: int
    max_slots: int
    max_graphs: int

    @property
    def kv(self) -> int:
        return self.slots * self.kv_per_slot

    @property
    def free(self) -> int:
        return self.budget - self.in_use - self.activation - self.graph_pool - self.kv

    def with_slots(self, slots: int) -> MemoryPlan:
        if slots > self.max_slots:
            raise DoesNotFit(f"{slots} slots do not fit, {self.max_slots} do: {self.describe()}")
        return MemoryPlan(**{**asdict(self), "slots": slots})

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kv": self.kv, "free": self.free}

    def describe(self) -> str:
        g = lambda n: f"{n / GiB:.2f}"  # noqa: E731
        return (f"memory budget {g(self.budget)} GiB on {self.device}: in use {g(self.in_use)} (weights "
                f"{g(self.weights)}), KV {g(self.kv)} ({self.slots} slots x {self.capacity} columns, "
                f"{self.kv_per_slot / 2**20:.1f} MiB a slot), activation {g(self.activation)}, graphs "
                f"{g(self.graph_pool)}, free {g(self.free)}")


def plan_memory(shape: ModelShape, *, device: str, total: int, free: int, capacity: int, step_tokens: int,
                prefill_columns: int, graphs: bool, batch_size: int | None, max_batch_size: int,
                gpu_memory_utilization: float, cpu_memory_share: float) -> MemoryPlan:
    """The plan for ``batch_size`` slots (None: the most that fit, up to ``max_batch_size``, for ``auto`` to choose
    among with ``with_slots``). ``step_tokens``: the widest step's tokens per row; ``prefill_columns``: the longest
    prompt a prefill runs; ``graphs``: the step is captured (its graphs' pool is budgeted as one more activation).
    Raises DoesNotFit with the numbers."""
    if device.startswith("cuda"):
        budget, in_use = int(total * gpu_memory_utilization), total - free
    else:
        budget, in_use = int(free * cpu_memory_share), 0
    kv_per_slot = capacity * shape.kv_bytes_per_column

    def parts(slots: int) -> tuple[int, int]:
        step = forward_activation_bytes(shape, slots, step_tokens, capacity, logits=True)
        prefill = forward_activation_bytes(shape, 1, min(PREFILL_TOKENS, slots * prefill_columns), prefill_columns,
                                           logits=False)
        activation = max(step, prefill)
        return activation, activation + MAX_GRAPHS * GRAPH_OVERHEAD if graphs else 0

    def fits(slots: int) -> bool:
        activation, pool = parts(slots)
        return in_use + activation + pool + slots * kv_per_slot <= budget

    def plan(slots: int, max_slots: int) -> MemoryPlan:
        activation, pool = parts(slots)
        return MemoryPlan(device, budget, in_use, shape.weights_bytes, activation, pool, kv_per_slot, slots, capacity,
                          max_slots, MAX_GRAPHS)

    if not fits(1):
        raise DoesNotFit(f"the model does not fit: {plan(1, 0).describe()} (one slot of {capacity} columns; lower "
                         "--max-prompt-tokens or --max-new-tokens, or use a device with more memory)")
    low, high = 1, max(1, batch_size or max_batch_size)  # the most slots that fit, up to high
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    if batch_size is not None and low < batch_size:
        raise DoesNotFit(f"--batch-size {batch_size} does not fit, {low} slots would: "
                         f"{plan(batch_size, low).describe()}")
    return plan(batch_size or low, low)
