"""ProPD dynamic tree sizing on top of batched PPD: every step picks, from a family of tree sets of
different sizes, the one with the most expected tokens per predicted second for the rows now in the batch.

The family is rebuilt every ``rebuild_every`` steps from the online acceptance table (decoding/online_stats.py),
by a builder the caller passes in (the workers use profiling.tree_builder), so this module stays free of
how trees are searched. Tree buffers are cached per tree set, so switching trees between steps costs
nothing but the choice. Every tree set has a tree for each depth state, so any set can follow any other.
Verification is unchanged: the output is plain greedy decoding's, whichever trees were used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from decoding.batch import ActiveRows
from decoding.online_stats import AcceptanceTracker, LatencyModel
from decoding.ppd import PPDDecoder
from decoding.prompt_tokens import PromptTokens
from decoding.tree import TreeSet, tree_set_buffers


@dataclass(frozen=True)
class TreeOption:
    tree_set: TreeSet
    expected_tokens: float  # tau under the acceptance table it was built from


# acceptance table -> tree sets of increasing size (the first is usually plain decoding: 1 slot)
TreeFamilyBuilder = Callable[[list[list[float]]], Sequence[TreeOption]]


class ProPDDecoder(PPDDecoder):
    """PPD whose tree is re-chosen every step. ``choices`` records (active rows, slots per row) per step."""

    def __init__(self, model: nn.Module, prompt_tokens: PromptTokens, build_family: TreeFamilyBuilder,
                 acceptance_prior: Sequence[Sequence[float]], latency: LatencyModel | None = None,
                 eos_token_ids: Sequence[int] = (), rebuild_every: int = 64, rebuild_drift: float = 0.01,
                 top_k: int = 10):
        self.build_family = build_family
        self.acceptance = AcceptanceTracker(acceptance_prior, prompt_tokens.k, top_k)
        self.latency = latency or LatencyModel()
        self.rebuild_every, self.rebuild_drift = rebuild_every, rebuild_drift
        self.built_from = self.acceptance.table()
        started = time.perf_counter()
        family = list(build_family(self.built_from))
        self.last_build_seconds = time.perf_counter() - started
        if not family:
            raise ValueError("the tree family builder returned no tree set")
        super().__init__(model, prompt_tokens, family[0].tree_set, eos_token_ids)
        self._set_family(family)
        self.initial_family = tuple(self.family)
        self.steps_since_rebuild, self.seconds_since_rebuild = 0, 0.0
        self.choices: list[tuple[int, int]] = []

    def _slots_per_state(self, option: TreeOption) -> list[int]:
        return tree_set_buffers(option.tree_set, self.prompt_tokens.n).num_slots.tolist()

    def _set_family(self, family: Sequence[TreeOption]) -> None:
        self.family = list(family)
        self.slots_per_state = [self._slots_per_state(option) for option in self.family]
        self.buffers: dict[int, object] = {}  # family index -> its buffers on the device (filled when used)
        # Each option is priced at its widest state: in steady state a batch nearly always holds a row in the
        # deepest state, and pricing the current state instead would favour trees whose cheap states cannot
        # accept anything (state 0 has no guesses) and then abandon them when they become useful.
        self.widest = [max(slots) for slots in self.slots_per_state]

    def choose(self, batch: int, context: float) -> int:
        """The family index with the most expected tokens per predicted second at this batch size and context."""
        rates = [option.expected_tokens / self.latency.predict(batch, slots, context)
                 for option, slots in zip(self.family, self.widest)]
        return max(range(len(rates)), key=lambda i: (rates[i], -i))

    def _maybe_rebuild(self, decode_seconds: float) -> None:
        """Rebuild the family when the acceptance table has moved, at most once per ``rebuild_every`` steps
        and never more than 1% of the decoding time (a build costs ~0.5 s on a CPU)."""
        self.steps_since_rebuild += 1
        self.seconds_since_rebuild += decode_seconds
        if (self.steps_since_rebuild < self.rebuild_every
                or self.seconds_since_rebuild < 100 * self.last_build_seconds):
            return
        self.steps_since_rebuild, self.seconds_since_rebuild = 0, 0.0
        table = self.acceptance.table()
        drift = max(abs(a - b) for new, old in zip(table, self.built_from) for a, b in zip(new, old))
        if drift > self.rebuild_drift:
            started = time.perf_counter()
            family = list(self.build_family(table))
            self.last_build_seconds = time.perf_counter() - started
            if family:
                self._set_family(family)
                self.built_from = table

    def _start(self) -> None:
        self.choices = []
        self.states = None  # depth states of the active rows; all 0 (no guesses) before the first step

    def _buffers_for_step(self, rows: ActiveRows, kv_len: torch.Tensor, state: torch.Tensor):
        self.context = float(kv_len.float().mean())
        self.chosen = self.choose(rows.size, self.context)
        self.tree_set = self.family[self.chosen].tree_set
        if self.chosen not in self.buffers:
            self.buffers[self.chosen] = tree_set_buffers(self.tree_set, self.prompt_tokens.n, self.device)
        states = set(self.states) if self.states is not None else {0}
        self.choices.append((rows.size, max(self.slots_per_state[self.chosen][m] for m in states)))
        self.step_started = time.perf_counter()
        return self.buffers[self.chosen]

    def _after_commit(self, rows: ActiveRows, keep: torch.Tensor, first_step: bool) -> None:
        self.step_seconds = time.perf_counter() - self.step_started
        if not first_step:  # the first step also ran the prompts: not a tree step's latency
            # Filed under the width the choice priced (the set's widest state), not this step's width: tau is a
            # long-run average over the states a set passes through, so the price must be the long-run average
            # step of that set too.
            self.latency.observe(rows.size, self.widest[self.chosen], self.context, self.step_seconds)
        for row, kept in zip(rows.index.tolist(), keep.tolist()):
            self.acceptance.resolve(row, rows.results[row].token_ids, finished=not kept)

    def _after_propose(self, rows: ActiveRows, guesses: torch.Tensor, state: torch.Tensor) -> None:
        self.states = state.tolist()
        active = rows.index.tolist()
        self.acceptance.record(active, [len(rows.results[r].token_ids) for r in active], guesses, self.states)
        self._maybe_rebuild(self.step_seconds)
