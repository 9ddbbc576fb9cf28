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
``_WEIGHT_STATIONARY_BELOW`` rows and is ``nn.Linear``'s otherwise, and on any other device or dtype.

Its results differ from ``nn.Linear``'s in the last bits, as a change of batch size does. Plain and tree
decoding, and the reference decoder, all run the same model, so the lossless check is unaffected.
"""

from __future__ import annotations

import torch
from torch import nn

_WEIGHT_STATIONARY_BELOW = 10  # rows: from 10 up the second form is no faster on the CPU above (at 12, slower)


class WeightStationaryLinear(nn.Linear):
    """``nn.Linear`` computing ``(W @ x.T).T`` for fewer than 10 rows of float32 input on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [M, in]
        M = rows.shape[0]
        if x.device.type != "cpu" or x.dtype != torch.float32 or not 0 < M < _WEIGHT_STATIONARY_BELOW:
            return super().forward(x)
        pair = torch.cat([rows, rows]) if M == 1 else rows  # one row alone would be a matrix-vector product
        out = (self.weight @ pair.T).T[:M]  # [M, out], strides (1, M)
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], self.out_features)  # callers .view() it: contiguous


def use_weight_stationary_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a ``WeightStationaryLinear``, in place (the module's
    class changes; its parameters, buffers and hooks stay). Subclasses of ``nn.Linear`` (quantised or adapted
    layers) are left as they are. Returns how many changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = WeightStationaryLinear
            changed += 1
    return changed


def linear_kind(model: nn.Module) -> str:
    """"weight_stationary" when any linear layer of ``model`` is a WeightStationaryLinear, else "torch": a step's
    cost depends on it, so cached latency profiles are keyed by it."""
    return "weight_stationary" if any(isinstance(m, WeightStationaryLinear) for m in model.modules()) else "torch"
