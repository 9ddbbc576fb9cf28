"""Linear layers for decoding on a CPU: the same weights, multiplied the other way round.

A decode step runs every linear layer of the model over a handful of rows (batch x slots), so its cost is
reading the weights. On a CPU, ``torch.nn.Linear`` computes ``x @ W.T``, and MKL's kernel for that shape
with few rows of ``x`` streams W at a fraction of the memory bandwidth (over the lm_head's 113 MB it took
7.0, 14.6 and 21.1 ms for 1, 2 and 3 rows: a read of W per row). ``W @ x.T`` is the same product as a
tall, thin matrix times a few columns, which MKL splits over the threads and streams at full speed.
Measured on a 2-thread AMD EPYC (torch 2.13, MKL 2024.2, float32): one pass over the 90 distinct weights of
30 layers' MLPs (318 MB, as a decode step reads them), interleaved, the median of 9 (another run differed
by up to 20%), milliseconds by rows M:

    M                        1     2     3     4     5     6     8     9    10    12    32    64
    nn.Linear, x @ W.T     18.7  28.3  31.3  27.7  26.3  22.0  28.3  33.1  33.2  33.8  47.9  75.6
    (W @ x.T).T, copied     8.8   9.0  11.6   9.9  15.3  19.1  21.4  24.5  28.2  33.8  40.1  66.0

(M = 1 runs as two copies of the row: a matrix-vector product is as slow as ``x @ W.T``.) So from the
loader, on a CPU in float32, every ``nn.Linear`` of the model becomes a ``WeightStationaryLinear``: the
same module and parameters (tied weights stay tied), whose forward takes the second form below
``rows_below`` rows and is ``nn.Linear``'s otherwise, and on any other device or dtype. Where the forms
cross depends on the CPU, its MKL and the threads, so by default (``cpu_linear="auto"``) ``rows_below`` comes
from measuring both over the model's own weights (``measure_rows_below``, 2.5 s on the VM), once per kind of
machine, and every later load reuses that decision (workers/numerics.py); ``"weight_stationary"`` takes the 10
measured above without measuring.

Its results differ from ``nn.Linear``'s in the last bits, as a change of batch size does. Plain and tree
decoding, and the reference decoder, all run the same model, so the lossless check is unaffected.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ROWS_BELOW = 10  # rows: from 10 up the second form is no faster on the CPU above (at 12, slower)
# Row counts a measurement tries (a decode step's rows are batch x slots: 1-16 is where the forms differ).
ROW_CANDIDATES = (1, 2, 3, 4, 6, 8, 10, 12, 16)
# Bytes of the model's own weights timed per pass: beyond the caches of most CPUs, as a decode step's weights
# are, yet short (a pass of 256 MB is 10-30 ms), so a measurement costs a few seconds at start-up (2.5 s on the VM).
_MEASURE_BYTES = 256 * 2**20
# Below this many bytes of linear weights in all, nothing is measured and nn.Linear stays: such a model sits in
# the caches of many CPUs, where the two forms differ by their kernels' overhead rather than by how they read
# memory, and passes of well under a millisecond time mostly noise (a tiny test model could then choose
# differently in two processes, and two workers' float32 logits differ in the last bits).
_MEASURE_MIN_BYTES = 32 * 2**20


def _weight_stationary_product(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows @ weight.T`` computed as ``(weight @ rows.T).T``: [M, in] x [out, in] -> [M, out], contiguous."""
    M = rows.shape[0]
    pair = torch.cat([rows, rows]) if M == 1 else rows  # one row alone would be a matrix-vector product
    return (weight @ pair.T).T[:M].contiguous()  # strides (1, M) before the copy; callers .view() it


class WeightStationaryLinear(nn.Linear):
    """``nn.Linear`` computing ``(W @ x.T).T`` for fewer than ``rows_below`` rows of float32 input on a CPU."""

    # The class value is the measured default above; use_weight_stationary_linears sets each layer's own.
    rows_below: int = DEFAULT_ROWS_BELOW

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [M, in]
        M = rows.shape[0]
        if x.device.type != "cpu" or x.dtype != torch.float32 or not 0 < M < self.rows_below:
            return super().forward(x)
        out = _weight_stationary_product(self.weight, rows)  # [M, out]
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def use_weight_stationary_linears(model: nn.Module, rows_below: int = DEFAULT_ROWS_BELOW) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a ``WeightStationaryLinear`` taking the second form below
    ``rows_below`` rows, in place (the module's class changes; its parameters, buffers and hooks stay); layers
    converted before take the new ``rows_below``. Subclasses of ``nn.Linear`` (quantised or adapted layers) are
    left as they are. Returns how many changed."""
    assert rows_below >= 1, rows_below
    changed = 0
    for module in model.modules():
        if type(module) in (nn.Linear, WeightStationaryLinear):
            module.__class__ = WeightStationaryLinear
            module.rows_below = rows_below
            changed += 1
    return changed


def linear_kind(model: nn.Module) -> str:
    """"weight_stationary" when any linear layer of ``model`` is a WeightStationaryLinear, else "torch": a step's
    cost depends on it, so cached latency profiles are keyed by it."""
    return "torch" if linear_rows_below(model) is None else "weight_stationary"


def linear_rows_below(model: nn.Module) -> int | None:
    """The largest ``rows_below`` of the model's weight-stationary layers (None without any): what a worker
    reports beside ``linear_kind``."""
    values = [m.rows_below for m in model.modules() if isinstance(m, WeightStationaryLinear)]
    return max(values) if values else None


# ---------------------------------------------------------------------------------------------------------
# Measuring where the second form pays on this CPU


@dataclass(frozen=True)
class RowsBelowMeasurement:
    """Both forms timed over the same weights, the median pass in milliseconds by rows, and the choice."""

    rows_below: int  # 1: the second form is never faster here, keep nn.Linear
    torch_ms: dict[int, float]
    stationary_ms: dict[int, float]


def choose_rows_below(torch_ms: dict[int, float], stationary_ms: dict[int, float]) -> int:
    """The smallest measured row count at which the second form is no faster than ``x @ W.T``: below it every
    measured count was faster. One past the largest count when it was faster at all of them; 1 when at none.
    The first loss ends it, since both forms' costs grow with rows and the second's grows faster."""
    assert torch_ms.keys() == stationary_ms.keys() and torch_ms, (torch_ms, stationary_ms)
    for rows in sorted(torch_ms):
        if stationary_ms[rows] >= torch_ms[rows]:
            return rows
    return max(torch_ms) + 1


def _nbytes(weights: list[torch.Tensor]) -> int:
    return sum(w.numel() * w.element_size() for w in weights)


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The model's distinct float32 CPU weights of linear layers that can convert, in the model's order (a weight
    tied to another counts once)."""
    distinct: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if type(module) in (nn.Linear, WeightStationaryLinear):
            w = module.weight
            if w.device.type == "cpu" and w.dtype == torch.float32:
                distinct.setdefault(w.data_ptr(), w.detach())
    return list(distinct.values())


def _timed_weights(weights: list[torch.Tensor], budget_bytes: int) -> list[torch.Tensor]:
    """The weights to time: one of every shape (the lm_head's too), then more in order up to ``budget_bytes``,
    so a pass reads them from memory as a decode step does."""
    chosen: list[torch.Tensor] = []
    for w in weights:
        if all(c.shape != w.shape for c in chosen):
            chosen.append(w)
    size = _nbytes(chosen)
    for w in weights:
        if size >= budget_bytes:
            break
        if all(c is not w for c in chosen):
            chosen.append(w)
            size += w.numel() * w.element_size()
    return chosen


def worth_measuring(model: nn.Module, min_bytes: int = _MEASURE_MIN_BYTES) -> bool:
    """Whether the model has at least ``min_bytes`` of linear weights that could convert (float32, on a CPU):
    below that a measurement would time noise (``_MEASURE_MIN_BYTES``), and none at all leaves nothing to time."""
    return _enough(_linear_weights(model), min_bytes)


def _enough(weights: list[torch.Tensor], min_bytes: int) -> bool:
    return bool(weights) and _nbytes(weights) >= min_bytes


def measure_rows_below(model: nn.Module, candidates: tuple[int, ...] = ROW_CANDIDATES, repeats: int = 5,
                       budget_bytes: int = _MEASURE_BYTES, min_bytes: int = _MEASURE_MIN_BYTES
                       ) -> RowsBelowMeasurement:
    """Time ``x @ W.T`` (nn.Linear's product) against ``(W @ x.T).T`` over the model's own linear weights, on this
    CPU with this process's threads, for each row count in ``candidates``; ``repeats`` passes of each after a
    warm-up, the two forms interleaved and their order alternated, so drift hits both alike. The thresholds of
    MKL's kernels differ by CPU and thread count: the table in this module's docstring is one machine's.
    A model with under ``min_bytes`` of such weights in all is not measured: 1, nn.Linear throughout."""
    every = _linear_weights(model)
    if not _enough(every, min_bytes):  # none on a CPU in float32, or too few bytes to time (worth_measuring)
        return RowsBelowMeasurement(rows_below=1, torch_ms={}, stationary_ms={})
    weights = _timed_weights(every, budget_bytes)
    g = torch.Generator().manual_seed(0)
    inputs = {(rows, w.shape[1]): torch.randn(rows, w.shape[1], generator=g)
              for rows in candidates for w in weights}  # [M, in] per row count and input width
    forms = {"torch": lambda w, x: F.linear(x, w), "stationary": _weight_stationary_product}
    times: dict[str, dict[int, list[float]]] = {name: {rows: [] for rows in candidates} for name in forms}
    with torch.no_grad():
        for rep in range(repeats + 1):  # the first pass warms up and is not counted
            for rows in candidates:
                order = list(forms) if rep % 2 == 0 else list(reversed(forms))
                for name in order:
                    product = forms[name]
                    start = time.perf_counter()
                    for w in weights:
                        product(w, inputs[rows, w.shape[1]])
                    if rep:
                        times[name][rows].append((time.perf_counter() - start) * 1e3)
    torch_ms = {rows: statistics.median(t) for rows, t in times["torch"].items()}
    stationary_ms = {rows: statistics.median(t) for rows, t in times["stationary"].items()}
    return RowsBelowMeasurement(choose_rows_below(torch_ms, stationary_ms), torch_ms, stationary_ms)
