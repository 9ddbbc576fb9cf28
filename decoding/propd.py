"""ProPD dynamic tree sizing on top of batched PPD: every step picks, from a family of tree sets of
different sizes, the one with the most expected tokens per predicted second for the rows now in the batch.

Expected tokens are learned, not taken on trust: the table's stationary tau assumes guesses at different
depths are independent and is a long-run figure, and what a set really yields can be well below it. Each
set's tokens per row-step are tracked online (decoding/online_stats.YieldTracker), the table's figure as a
prior worth a few row-steps. The current set is kept unless another is predicted to be faster by a margin:
single-step latencies are noisy, and every switch into a tree from plain decoding costs a step that can
emit only one token per row (the rows have no guesses yet).

The family is rebuilt from the online acceptance table (decoding/online_stats.py) once that table has moved,
at most every ``rebuild_every`` steps, by a builder the caller passes in (the workers use trees.builder), so
this module stays free of how trees are searched. Tree buffers are cached per tree set, so switching trees
between steps costs nothing but the choice. Every tree set has a tree for each depth state, so any set can
follow any other. Verification is unchanged: the output is plain decoding's (greedy, or sampled with the
row's seed), whichever trees were used.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel

from decoding.online_stats import AcceptanceTracker, LatencyModel, YieldTracker
from decoding.ppd import PPDDecoder
from decoding.prompt_tokens import PromptTokens
from decoding.protocol import ActiveView, StepPlan, StepReport
from decoding.pruning import PruneHead
from decoding.tree import TreeOption, TreeSet, TreeSetBuffers, tree_set_buffers

# acceptance table -> tree sets of increasing size (the first is usually plain decoding: 1 slot)
TreeFamilyBuilder = Callable[[list[list[float]]], Sequence[TreeOption]]


@dataclass(frozen=True)
class ProPDPlan(StepPlan):
    """A step's plan with what ProPD learns from its step: the family option chosen (``option``, its tree_hash
    ``key``), the rows' mean context, whether the previous step ran the same set, and when the step began."""

    option: int = 0
    key: str = ""
    context: float = 0.0
    same_as_last: bool = False
    started: float = 0.0


class ProPDDecoder(PPDDecoder):
    """PPD whose tree is re-chosen every step. ``choices`` records (active rows, slots per row) per step.

    ``start``: the tree set of the first step (the worker's planned tree), if the choice does not beat it by
    the margin. ``yields`` learns each tree set's real tokens per row-step (default: a fresh YieldTracker);
    the current set is kept unless another's predicted tokens per second beat it by more than
    ``switch_margin``; a set not yet run at the batch size and within ``explore_margin`` of the choice is run
    once to be measured, as is plain decoding (the narrowest set) at any rate, and again after
    ``reprobe_every`` steps, then twice as many, up to every ``reprobe_narrowest_every``.

    A tree is chosen over plain decoding (the narrowest set) only when its predicted rate beats plain decoding's
    by more than ``tree_margin``. The two estimates are not equally sure: plain decoding yields exactly one
    token a row-step, a tree's yield and price are learned from noisy steps. Where a tree's edge is within that
    noise it is as likely a loss, and ProPD promises never to lose to plain decoding; where trees pay (a GPU,
    where a wide step costs about what a narrow one does) their edge is far beyond the margin.
    """

    def __init__(self, model: PreTrainedModel, prompt_tokens: PromptTokens, build_family: TreeFamilyBuilder,
                 acceptance_prior: Sequence[Sequence[float]], latency: LatencyModel | None = None,
                 eos_token_ids: Sequence[int] = (), rebuild_every: int = 64, rebuild_drift: float = 0.01,
                 top_k: int = 10, yields: YieldTracker | None = None, switch_margin: float = 0.05,
                 tree_margin: float = 0.05,
                 explore_margin: float = 0.15, reprobe_every: int = 64, reprobe_narrowest_every: int = 512,
                 prune_head: PruneHead | None = None, start: TreeSet | None = None):
        self.build_family = build_family
        self.acceptance = AcceptanceTracker(acceptance_prior, prompt_tokens.k, top_k)
        self.latency = latency or LatencyModel()
        self.yields = yields or YieldTracker()
        self.switch_margin, self.explore_margin, self.reprobe_every = switch_margin, explore_margin, reprobe_every
        self.tree_margin = tree_margin
        self.reprobe_narrowest_every = reprobe_narrowest_every
        self.narrowest_probes: dict[int, int] = {}  # batch size -> times plain decoding was probed from afar
        self.current: str | None = None  # tree_hash of the set the last step ran (kept across generate calls)
        self.explored = False  # whether that set ran only to be measured (see choose)
        self.rebuild_every, self.rebuild_drift = rebuild_every, rebuild_drift
        self.keys: list[str] = []  # the family's tree hashes (_set_family)
        self.widest: list[int] = []  # the family's widest states' slots
        self.built_from = self.acceptance.table()
        started = time.perf_counter()
        family = list(build_family(self.built_from))
        self.last_build_seconds = time.perf_counter() - started
        if not family:
            raise ValueError("the tree family builder returned no tree set")
        super().__init__(model, prompt_tokens, family[0].tree_set, eos_token_ids, prune_head=prune_head)
        self._set_family(family)
        self.initial_family = tuple(self.family)
        if start is not None:  # kept until another set is predicted faster by the margin
            if start.tree_hash not in self.keys:
                raise ValueError("the starting tree set is not in the family: plan it with the family's builder")
            self.current = start.tree_hash
        self.start: str | None = self.current  # the planned first set, if any
        self.steps_since_rebuild, self.seconds_since_rebuild = 0, 0.0
        self.choices: deque[tuple[int, int]] = deque(maxlen=1 << 16)  # (rows, slots) per step, the latest 65536
        self.ran_last: dict[int, str] = {}  # row id -> tree_hash of the set its last step ran
        self.last_step_key: str | None = None  # tree_hash of the set the previous step ran
        self.step_seconds = 0.0  # the last step's, its bookkeeping included

    def _set_family(self, family: Sequence[TreeOption]) -> None:
        old = dict(zip(self.keys, self.widest))
        self.family = list(family)
        self.keys = [option.tree_set.tree_hash for option in self.family]  # the yields' keys
        self.option_buffers: dict[int, TreeSetBuffers] = {}  # family index -> its buffers on the device (when used)
        # Each option is priced at its widest state: in steady state a batch nearly always holds a row in the
        # deepest state, and pricing the current state instead would favour trees whose cheap states cannot
        # accept anything (state 0 has no guesses) and then abandon them when they become useful.
        self.widest = [tree_set_buffers(option.tree_set, self.prompt_tokens.n).widest.slots for option in self.family]
        # Realised yields stay with the tree sets that survive a rebuild. A new set starts from its table
        # figure: carrying over a lower yield from the old set of its size could hide a better tree for good
        # (a set never chosen is never measured), while an optimistic start corrects itself in a few steps.
        self.yields.new_table(self.keys)
        # Hysteresis follows the current set across a rebuild: the same set, else the one nearest in width.
        if self.current is not None and self.current not in self.keys:
            width = old.get(self.current)
            self.current = None if width is None else min(
                zip(self.keys, self.widest), key=lambda kw: abs(math.log(kw[1] / width)))[0]

    def expected_tokens(self, i: int) -> float:
        """Family option i's expected tokens per row-step: its table figure, corrected by what it yielded."""
        return self.yields.estimate(self.keys[i], self.family[i].expected_tokens)

    def rates(self, batch: int, context: float) -> list[float]:
        """Expected tokens per predicted second of every family option, at this batch size and context."""
        return [self.expected_tokens(i) / self.latency.predict(batch, slots, context)
                for i, slots in enumerate(self.widest)]

    def choose(self, batch: int, context: float) -> int:
        """The family index with the most expected tokens per predicted second at this batch size and context
        (a tree only if it beats plain decoding by ``tree_margin``), unless the set now in use is within
        ``switch_margin`` of it: then that set. Without the margin, noise in single-step timings flips the
        choice between near-equal options, and each flip from plain decoding into a tree wastes a step (rows
        coming from plain decoding have no guesses: one token each).

        Then exploration: instead of the choice, the best-rated of these runs once, to be measured:
        - options never run at this batch size whose predicted rate is within ``explore_margin`` of the
          choice: their price is an estimate, and a profile's shape can be off (measured: a profile taken on a
          busy machine put a 1-slot step 40% above its real cost, next to trees priced about right);
        - plain decoding, however far behind, on the schedule in the comment below;
        - when there are none, the best near option if it has not run among the latest ``reprobe_every``
          steps: prices measured at different times carry the machine's load of each time (measured on a
          2-core VM: with plain decoding's price from a busy spell, ProPD at batch 1 kept an 8-slot tree that
          lost 9% to it).
        The step after an exploration chooses on the rates alone: the margin protects a settled choice, not
        one that ran once to be measured."""
        rates = self.rates(batch, context)
        narrowest = min(range(len(rates)), key=lambda i: self.widest[i])
        # A tree must beat plain decoding by tree_margin to be chosen at all (see the class docstring).
        eligible = [i for i in range(len(rates))
                    if i == narrowest or rates[i] > rates[narrowest] * (1 + self.tree_margin)]
        choice = max(eligible, key=lambda i: (rates[i], -i))
        if self.current in self.keys and not self.explored:
            # The set in use keeps the benefit of the switch margin against plain decoding too (a tree in use is
            # left once plain decoding is within tree_margin / switch_margin of it): leaving and coming back need
            # different rates, or a tree whose estimate hovers at the margin flips in and out.
            current = self.keys.index(self.current)
            kept = current == narrowest or (
                rates[current] * (1 + self.switch_margin) > rates[narrowest] * (1 + self.tree_margin))
            if kept and rates[choice] <= rates[current] * (1 + self.switch_margin):
                choice = current
        near = [i for i in range(len(rates)) if i != choice and rates[i] * (1 + self.explore_margin) >= rates[choice]]
        untried = [i for i in near if not self.latency.has_run(batch, self.widest[i])]
        # The narrowest set (plain decoding) is measured at every batch size however far behind it looks, and
        # measured again after reprobe_every steps, then twice as many, ... up to reprobe_narrowest_every: its
        # step is the cheapest there is, and its price is the reference every tree must beat, so a price set
        # too high (by a profile from a busy moment, or by one step in a stall) must not stand (measured: with
        # 1 slot priced 1.4x too dear, a tree that lost 10% to plain decoding was kept). The doubling keeps the
        # probes of a plain decoding that really is far behind (a GPU's) to a handful.
        probes = self.narrowest_probes.get(batch, 0)
        probing = self.explored and self.current == self.keys[narrowest]  # a probe's unmeasured first step ran
        every = min(self.reprobe_every * 2 ** max(probes - probing, 0), self.reprobe_narrowest_every)
        probe_from_afar = narrowest != choice and narrowest not in near and not self.latency.has_run(
            batch, self.widest[narrowest], within=every)
        if probe_from_afar:
            untried.append(narrowest)
        if not untried and near:  # the runner-up alone, if its price is stale: a probe costs ~2 steps
            runner_up = max(near, key=lambda i: rates[i])
            if not self.latency.has_run(batch, self.widest[runner_up], within=self.reprobe_every):
                untried = [runner_up]
        self.explored = bool(untried)
        if not untried:
            return choice
        run = max(untried, key=lambda i: rates[i])
        if run == narrowest and probe_from_afar and not probing:
            self.narrowest_probes[batch] = probes + 1  # a probe from afar begins (its first step goes unmeasured)
        return run

    def _maybe_rebuild(self, decode_seconds: float) -> None:
        """Rebuild the family when an entry of the acceptance table has moved by more than ``rebuild_drift``,
        at most once per ``rebuild_every`` steps and never more than 1% of the decoding time (a build costs
        ~0.5 s on a CPU)."""
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

    def adopt_prompt_tokens(self, prompt_tokens: PromptTokens) -> None:
        """New prompt tokens (PPDDecoder's), with their acceptance table: the family is rebuilt from it, and
        the statistics learned of the old tokens (acceptance, yields) start again from it."""
        self.check_adoptable(prompt_tokens)
        table = prompt_tokens.meta.extra["acceptance"]
        family = list(self.build_family(table))
        if not family:
            raise ValueError("the tree family builder returned no tree set")
        super().adopt_prompt_tokens(prompt_tokens)
        self.acceptance = AcceptanceTracker(table, prompt_tokens.k, self.acceptance.top_k)
        self.yields = YieldTracker()
        self._set_family(family)
        self.built_from = table
        self.initial_family = tuple(self.family)
        self.start = self.current if self.current is not None else self.keys[0]  # the set in use, mapped across
        self.steps_since_rebuild, self.seconds_since_rebuild = 0, 0.0

    def check_adoptable(self, prompt_tokens: PromptTokens) -> None:
        super().check_adoptable(prompt_tokens)
        if not prompt_tokens.meta.extra.get("acceptance"):
            raise ValueError("ProPD needs prompt tokens with an acceptance table")

    @property
    def max_step_tokens(self) -> int:
        return max(self.widest)  # the family's widest state

    def begin(self) -> None:
        """A new batch: its row ids start again, and its first step follows no step of this decoder."""
        self.choices.clear()
        self.ran_last.clear()
        self.last_step_key = None

    def _buffers_of(self, option: int) -> TreeSetBuffers:
        if option not in self.option_buffers:
            self.option_buffers[option] = tree_set_buffers(self.family[option].tree_set, self.prompt_tokens.n,
                                                           self.device)
        return self.option_buffers[option]

    def plan_step(self, rows: ActiveView | None) -> StepPlan:
        """The set chosen for ``rows`` (``choose``); None: the starting set at its widest, chosen from nothing."""
        if rows is None:
            return self.plan_for(self._buffers_of(self.keys.index(self.start) if self.start in self.keys else 0), None)
        context = sum(rows.kv_lens) / rows.size
        option = self.choose(rows.size, context)
        self.current = self.keys[option]
        buffers = self._buffers_of(option)
        sizes = buffers.sizes(rows.states)
        self.choices.append((rows.size, sizes.slots))
        return ProPDPlan(buffers, sizes, buffers.widest, option, self.current, context,
                         self.last_step_key == self.current, time.perf_counter())

    def finish_step(self, plan: StepPlan, report: StepReport) -> None:
        """Learns from the step: the acceptance of the guesses it verified and of the survivors' new ones, the
        yield of the set it ran, and the price of its step.

        The set's yield: the tokens of the rows whose depth state this set produced (their previous step ran
        it too). Left out: a row's first step and the step after a switch, whose state another set (or the
        start) left behind, e.g. state 0 after plain decoding, which emits one token whatever the tree; that
        is the price of switching, which the margin in choose() keeps rare, not the set's long-run yield.
        Also left out: a row's last step, cut short by EOS or max_new_tokens.

        The price is the step and all its bookkeeping (the next guesses, the acceptance record, this): a tree's
        bookkeeping is dearer than plain decoding's. It is filed under the width the choice priced (the set's
        widest state), not this step's width: tau is a long-run average over the states a set passes through,
        so the price must be the long-run average step of that set too. Hence not filed: a batch's first
        step, and a set's first step after a switch, whose rows are in the states the previous set left (after
        plain decoding, state 0: root and prompt tokens only, far cheaper than the set's steady steps, so
        filing it would make a tree tried from there look cheap)."""
        super().finish_step(plan, report)
        assert isinstance(plan, ProPDPlan)
        key, before = plan.key, report.before
        own = []
        for row, result, kept in zip(before.ids, before.results, report.keep):
            self.acceptance.resolve(row, result.token_ids, finished=not kept)
            if kept:
                if self.ran_last.get(row) == key:
                    own.append(result.accepted_per_step[-1])
                self.ran_last[row] = key
        self.yields.observe(key, self.family[plan.option].expected_tokens, own)
        after = report.after
        self.acceptance.record(after.ids, [len(r.token_ids) for r in after.results], after.guesses, after.states)
        self.step_seconds = time.perf_counter() - plan.started
        if plan.same_as_last:
            self.latency.observe(before.size, self.widest[plan.option], plan.context, self.step_seconds)
        self.last_step_key = key
        self._maybe_rebuild(self.step_seconds)

    def row_finished(self, row_id: int) -> None:
        self.ran_last.pop(row_id, None)
