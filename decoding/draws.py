"""A sampled step's draws (decoding/sampling.py has the arithmetic): the token a slot's row draws at a depth below
its root, and the walk of its tree that verification makes with them. The step's runner (decoding/runners.py)
picks the kind, once per batch:

- ``SlotDraw`` (eager): the walk draws only for the rows still in their tree, and top_p's cut is searched among
  the most probable tokens first: data-dependent shapes and host reads, cheaper on a CPU.
- ``FixedShapeDraw`` (fixed shapes: compiled or captured steps): every row draws at every depth, and top_p's cut
  is found over the whole sorted vocabulary: no data-dependent shape, no host read.

Both draw the same tokens (``tests/test_sampling.py`` checks it on synthetic logits and trees).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from decoding.sampling import Filters, SamplingParams, sample_accept, sample_tokens

if TYPE_CHECKING:
    from decoding.slots import SlotBatch


@dataclass(frozen=True)
class SlotDraw:
    """draw(logits [R, V], depth, rows [R]): the tokens of slots ``rows`` at ``depth`` below their root, each
    with its own uniform at its stream position (tokens emitted so far, plus depth)."""

    batch: SlotBatch
    filters: Filters
    all_rows: ClassVar[bool] = False  # sample_accept walks every row to the full depth

    @classmethod
    def of(cls, batch: SlotBatch, params: Sequence[SamplingParams]) -> SlotDraw:
        return cls(batch, Filters.of(params, exhaustive=cls.all_rows))

    def __call__(self, logits: torch.Tensor, depth: int, rows: torch.Tensor) -> torch.Tensor:
        b = self.batch
        u = b.uniforms[rows, b.emitted[rows] + depth]  # [R]
        return sample_tokens(logits, b.temperature[rows], b.top_k[rows], b.top_p[rows], u, self.filters)

    def accept(self, node_tokens: torch.Tensor, node_parent: torch.Tensor, node_valid: torch.Tensor,
               logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_depth: int):
        """Sampled verification of the rows' trees with these draws (decoding/sampling.sample_accept)."""
        return sample_accept(node_tokens, node_parent, node_valid, logits_at, self, max_depth,
                             all_rows=self.all_rows)


@dataclass(frozen=True)
class FixedShapeDraw(SlotDraw):
    """A ``SlotDraw`` with no data-dependent shape: every row draws at every depth (draws past a row's count are
    thrown away), top_p's cut over the whole vocabulary."""

    all_rows: ClassVar[bool] = True
