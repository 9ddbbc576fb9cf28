"""What a decoder offers the batch engine (decoding/slots.py), and what passes between them each step.

A step of a ``SlotBatch`` goes:

1. ``plan = decoder.plan_step(rows)``: on the host, from the rows now in slots 0..A-1 (an ``ActiveView``): the
   tree buffers of the step and their sizes (for these rows, and at their widest for a fixed-shape step), plus
   whatever the decoder wants back in step 3. Nothing passes from the plan to step 3 but through the plan (a
   decoder may update the state its choices carry from step to step here, as ProPD's current tree set).
2. ``decoder.step(...)`` on the device, given the plan's buffers and the sizes the runner chose (eager: the
   rows'; fixed shapes: the widest): it reads tensors only, changes no Python state, and returns a
   ``StepOutput``. This is the part a runner compiles or captures (decoding/runners.py).
3. ``decoder.finish_step(plan, report)`` on the host, once the step's tokens are committed and finished rows have
   left their slots: the decoder learns from the step (its statistics, its counters). A test may rewrite the
   survivors' guesses here (an oracle).

``row_finished`` says a row left the batch (finished, or taken out after a failed step). ``begin`` says a new
``SlotBatch`` begins: row ids restart, so per-row statistics start again.

``Decoder`` is a ``typing.Protocol``: the type checker verifies that ``VanillaDecoder``, ``PPDDecoder`` and
``ProPDDecoder`` satisfy it. A decoder subclasses it explicitly to take the optional hooks' defaults (no-ops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from transformers import PreTrainedModel

from decoding.results import RowResult
from decoding.tree import StepSizes, TreeSetBuffers

if TYPE_CHECKING:
    from decoding.slot_cache import SlotCache


class ActiveView(NamedTuple):
    """The rows in slots 0..A-1, for the decoders' hooks, in slot order: ids, results, and host copies of their
    KV lengths, depth states and guesses (flat [k * top_k] each; empty before a row's first step)."""

    ids: list[int]
    results: list[RowResult]
    kv_lens: list[int]
    states: list[int]
    guesses: list[list[int]]

    @property
    def size(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class StepPlan:
    """One step's plan: the tree buffers (None: plain decoding's root-only step), the sizes of the rows' trees
    (an eager step runs these) and the tree set's widest sizes (a fixed-shape step runs these for any rows)."""

    buffers: TreeSetBuffers | None
    sizes: StepSizes
    widest: StepSizes


class StepOutput(NamedTuple):
    """What a device step returns, for slots 0..A-1: row b emits ``tokens[b, :counts[b]]`` (tokens [A, D+1],
    counts [A]); ``root`` [A] is its next root, ``guesses`` [A, k, top_k] and ``state`` [A] its next guesses and
    depth state (how many of them are real). ``late_width``: with early pruning (eager only), the slots per row
    the layers after the prune head ran; else None."""

    tokens: torch.Tensor
    counts: torch.Tensor
    root: torch.Tensor
    guesses: torch.Tensor
    state: torch.Tensor
    late_width: int | None = None


@dataclass(frozen=True)
class StepReport:
    """A finished step, for ``finish_step``. ``before``: the rows the step ran (slots 0..A-1) with their results
    as committed now; ``keep`` [A]: which are still decoding; ``after``: the survivors (slots 0..A'-1) with their
    next guesses and states; ``guesses``: the slots' own guesses tensor [slots, k, top_k] (rows 0..A'-1 theirs),
    which a rewrite must keep in step with ``after.guesses``; ``run``: the slots the step ran (idle ones
    included, at fixed shapes); ``sizes``: the sizes it ran at; ``late_width``: as in ``StepOutput``."""

    before: ActiveView
    keep: list[bool]
    after: ActiveView
    guesses: torch.Tensor
    run: int
    sizes: StepSizes
    late_width: int | None


class Decoder(Protocol):
    """A decoder as the batch sees it. ``k`` and ``top_k`` shape the guesses ([k, top_k] per row; k = 0 for
    plain decoding); ``max_step_tokens``: the most KV columns one step may add to a row."""

    model: PreTrainedModel
    eos_token_ids: list[int]

    @property
    def device(self) -> torch.device: ...

    @property
    def k(self) -> int: ...

    @property
    def top_k(self) -> int: ...

    @property
    def max_step_tokens(self) -> int: ...

    def plan_step(self, rows: ActiveView | None) -> StepPlan:
        """The plan of the next step for ``rows`` (None: a first step's, which a warm-up compiles or captures;
        it records nothing)."""
        ...

    def step(self, cache: SlotCache, buffers: Any, kv_len: torch.Tensor, root: torch.Tensor, guesses: torch.Tensor,
             state: torch.Tensor, draw: Any, *, sizes: StepSizes, view: int) -> StepOutput:
        """One decoding step over slots 0..A-1 (see ``StepOutput``), sized ``sizes``, attention over ``view``
        columns; ``draw`` None is greedy (decoding/draws.py). Reads and writes tensors only."""
        ...

    # Optional members: their defaults.
    @property
    def varies_shape(self) -> bool:
        """Whether a step's shapes depend on the data (early pruning keeps a data-dependent number of slots):
        such a decoder steps eager only."""
        return False

    def begin(self) -> None:
        """A new SlotBatch begins (row ids restart at 0)."""
        return None

    def finish_step(self, plan: StepPlan, report: StepReport) -> None:
        """The step of ``plan`` is committed (see ``StepReport``)."""
        return None

    def row_finished(self, row_id: int) -> None:
        """The row of this id has left its slot."""
        return None
