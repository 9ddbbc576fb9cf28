"""Hardware-aware PPD trees: from an acceptance table and a slot budget, one tree per depth state, and the
budget that is fastest on a measured device.

Model (as in the PPD paper, with depths independent): a candidate path c = (r1, r2, ...) is accepted with
probability P(c) = prod_d a[d][r_d]; a tree of depth state m emits V_m = 1 + sum_c P(c) tokens per step (the
bonus token counted). The node that ends up deepest accepted is c with the *ending probability*
p_c = P(c) - sum_{children} P(child); its prompt-token count is the next step's depth state. So depth states
form a Markov chain, and a tree set is scored by its long-run tokens per step sum_m pi_m V_m, with pi the
stationary distribution of the chain started where decoding starts (state 0: no guesses yet).

Building, for a budget of L input slots per row (root + candidates + n slots per prompt token):
- for each state m and each candidate count S, the S most probable paths of depth <= m;
- every node starts with k prompt tokens; while over budget, take one from the node where it costs least,
  cost = p_c * (h(j) - h(j-1)) for a node holding j, h being the relative value of depth states;
- keep the best S per state, by V_m + sum_c p_c h(count_c); h comes from relative value iteration on the
  chain (the paper's first-order rule uses h(j) = V_j), and every iterate is scored exactly by its stationary
  distribution, the best kept.
Every node keeps at least one prompt token unless the budget cannot give the root one: a node with none
sends the next step to state 0, a plain step, and that is never chosen by accident.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from decoding.tree import TreeOption, TreeSet, TreeSpec, vanilla_tree_set
from trees.paths import Path, best_paths, path_probability

Table = Sequence[Sequence[float]]


def ending_probabilities(table: Table, tree: TreeSpec) -> list[float]:
    """p_c for every node, root first: the probability that c is the deepest accepted node."""
    return _ending(list(tree.paths), [path_probability(table, p) for p in tree.paths])


def _ending(paths: Sequence[Path], probs: Sequence[float]) -> list[float]:
    """Ending probabilities of the tree ``[()] + paths`` (parents before children), path probabilities given."""
    index = {p: i + 1 for i, p in enumerate(paths)}
    ending = [1.0, *probs]
    for p, q in zip(paths, probs):
        ending[index.get(p[:-1], 0)] -= q
    return [max(0.0, e) for e in ending]


def tree_slots(tree: TreeSpec, n: int = 1) -> int:
    """Input slots of one row's tree with n ensemble copies per prompt token."""
    return tree.num_nodes + n * sum(tree.prompt_counts)


def tree_set_slots(tree_set: TreeSet, n: int = 1) -> int:
    """The widest state's input: what a step pays when any row is in that state."""
    return max(tree_slots(t, n) for t in tree_set.trees)


def transition_matrix(table: Table, tree_set: TreeSet) -> torch.Tensor:
    """[k+1, k+1] float64: P[m, j] = probability that a step in depth state m leaves the row in state j."""
    k = tree_set.k
    P = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    for m, tree in enumerate(tree_set.trees):
        for count, p in zip(tree.prompt_counts, ending_probabilities(table, tree)):
            P[m, count] += p
    return P


def stationary_distribution(P: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The long-run share of steps in each state for the chain started in ``start`` [S].

    Computed as the limit of the lazy chain (I + P) / 2, which has the same stationary distributions and is
    aperiodic, by repeated squaring; started from one state, so it is well defined even when some states
    are transient or unreachable.
    """
    rows = P / P.sum(1, keepdim=True).clamp(min=1e-300)  # guard against rounding drift in the tables
    M = 0.5 * (torch.eye(len(P), dtype=torch.float64) + rows)
    for _ in range(40):  # M^(2^40): far past any mixing time of a few states
        M = M @ M
    return M[start] / M[start].sum()


@dataclass(frozen=True)
class TreeEstimate:
    expected_tokens: float  # long-run tokens per step (tau), bonus token included
    state_distribution: tuple[float, ...]  # pi over depth states 0..k
    state_values: tuple[float, ...]  # V_m: tokens per step in state m


def estimate(table: Table, tree_set: TreeSet) -> TreeEstimate:
    """Expected tokens per step of a tree set under an acceptance table, from the stationary distribution."""
    values = [1.0 + sum(path_probability(table, p) for p in t.paths) for t in tree_set.trees]
    pi = stationary_distribution(transition_matrix(table, tree_set))
    tau = float(sum(p * v for p, v in zip(pi.tolist(), values)))
    return TreeEstimate(expected_tokens=tau, state_distribution=tuple(pi.tolist()), state_values=tuple(values))


# ----------------------------------------------------------------------------------------------------------------
# Building for one budget


def _assign_prompt_tokens(ending: Sequence[float], k: int, capacity: int, h: Sequence[float]) -> list[int]:
    """Prompt-token counts per node: start at k, then take from the cheapest node until ``capacity`` fits.
    Cost of taking one from a node holding j: ending * (h[j] - h[j-1]). No node goes below 1."""
    counts = [k] * len(ending)
    excess = k * len(ending) - capacity
    if excess <= 0:
        return counts
    heap = [(ending[c] * (h[k] - h[k - 1]), c) for c in range(len(ending))] if k > 1 else []
    heapq.heapify(heap)
    while excess > 0 and heap:
        _, c = heapq.heappop(heap)
        counts[c] -= 1
        excess -= 1
        if counts[c] > 1:
            heapq.heappush(heap, (ending[c] * (h[counts[c]] - h[counts[c] - 1]), c))
    assert excess <= 0, "capacity below one prompt token per node"
    return counts


def _candidate_counts(max_count: int) -> list[int]:
    """Candidate counts S tried per state: all up to 32, then about 6% apart (the optimum is flat there)."""
    counts, s = list(range(min(max_count, 32) + 1)), 32
    while s < max_count:
        s = min(max_count, max(s + 1, int(s * 1.06)))
        counts.append(s)
    return counts


def _best_state_tree(ordered: list[Path], prob: list[float], state: int, k: int, n: int, budget: int,
                     h: Sequence[float]) -> tuple[float, TreeSpec]:
    """The tree for one depth state maximising V + sum_c p_c h(count_c) within ``budget`` slots.
    ``ordered``: the state's paths, most probable first; ``prob``: their path probabilities."""
    root_only = min(k, (budget - 1) // n)
    best = (1.0 + h[root_only], TreeSpec.build({(): root_only}))
    if state == 0 or root_only < 1:
        return best
    max_candidates = min(len(ordered), (budget - 1 - n) // (1 + n))  # every node with at least one prompt token
    for S in _candidate_counts(max_candidates):
        ending = _ending(ordered[:S], prob[:S])
        counts = _assign_prompt_tokens(ending, k, (budget - 1 - S) // n, h)
        score = 1.0 + sum(prob[:S]) + sum(e * h[c] for e, c in zip(ending, counts))
        if score > best[0] + 1e-12:
            best = (score, TreeSpec.build(dict(zip([()] + ordered[:S], counts))))
    return best


@dataclass(frozen=True)
class BuiltTree:
    tree_set: TreeSet
    budget: int  # the slot budget it was built for
    slots: int  # its widest state's input slots (<= budget)
    estimate: TreeEstimate


def build_tree_set(table: Table, k: int, budget: int, *, n: int = 1, top_k: int | None = None,
                   iterations: int = 12) -> BuiltTree:
    """The best tree set found for ``budget`` input slots per row (see the module docstring)."""
    if len(table) < k:
        raise ValueError(f"the acceptance table covers {len(table)} prompt tokens, the tree needs k={k}")
    if budget < 1:
        raise ValueError("a tree needs at least one slot (the root)")
    top_k = top_k or len(table[0])
    table = [list(row[:top_k]) for row in table[:k]]
    max_paths = max(0, (budget - 1 - n) // (1 + n))
    ordered = {m: best_paths(table, max_paths, m) for m in range(k + 1)}
    prob = {m: [path_probability(table, p) for p in paths] for m, paths in ordered.items()}
    h = [0.0] + [1.0] * k  # any guess beats none; refined below
    best: BuiltTree | None = None
    for _ in range(iterations):
        scored = [_best_state_tree(ordered[m], prob[m], m, k, n, budget, h) for m in range(k + 1)]
        tree_set = TreeSet(k=k, top_k=top_k, trees=tuple(t for _, t in scored))
        est = estimate(table, tree_set)
        if best is None or est.expected_tokens > best.estimate.expected_tokens + 1e-12:
            best = BuiltTree(tree_set, budget, tree_set_slots(tree_set, n), est)
        new_h = [s - scored[0][0] for s, _ in scored]  # relative value iteration, state 0 as reference
        if max(abs(a - b) for a, b in zip(new_h, h)) < 1e-9:
            break
        h = new_h
    assert best is not None and best.slots <= budget
    return best


# ----------------------------------------------------------------------------------------------------------------
# Choosing the budget for a device


@dataclass(frozen=True)
class BudgetChoice:
    chosen: BuiltTree
    step_seconds: float  # predicted latency of one step of the chosen tree
    speedup: float  # predicted tokens/s over plain decoding (one token per step) on the same device and batch
    sweep: tuple[tuple[int, int, float, float], ...]  # (budget, slots, tau, step seconds) per budget tried


def choose_budget(table: Table, k: int, step_seconds: Callable[[int], float], budgets: Sequence[int], *,
                  n: int = 1, top_k: int | None = None) -> BudgetChoice:
    """The budget maximising expected tokens per step / step latency, ``step_seconds(slots)`` being the
    measured latency of a step whose rows have that many input slots (for the worker's batch size)."""
    plain = step_seconds(1)
    best: tuple[float, BuiltTree, float] | None = None
    sweep = []
    for budget in sorted(set(budgets)):
        built = vanilla_built(k, top_k or len(table[0])) if budget == 1 else build_tree_set(
            table, k, budget, n=n, top_k=top_k)
        seconds = step_seconds(built.slots)
        if not math.isfinite(seconds):
            continue
        sweep.append((budget, built.slots, built.estimate.expected_tokens, seconds))
        rate = built.estimate.expected_tokens / seconds
        if best is None or rate > best[0] * (1 + 1e-9):
            best = (rate, built, seconds)
    if best is None:
        raise ValueError("no budget has a measured latency")
    rate, built, seconds = best
    return BudgetChoice(chosen=built, step_seconds=seconds, speedup=rate * plain, sweep=tuple(sweep))


def vanilla_built(k: int, top_k: int) -> BuiltTree:
    """Budget 1: the root alone, no guesses; plain decoding through the tree machinery."""
    ts = vanilla_tree_set(k=k, top_k=top_k)
    return BuiltTree(ts, 1, 1, TreeEstimate(1.0, (1.0,) + (0.0,) * k, (1.0,) * (k + 1)))


def tree_family(k: int, budgets: Sequence[int], *, n: int = 1, top_k: int | None = None):
    """A ProPD tree-family builder: acceptance table -> the built tree set for every budget, plain decoding
    (1 slot) first. Budgets that build the same tree set as a smaller one are left out."""
    def build(table: Table) -> list[TreeOption]:
        plain = vanilla_built(k, top_k or len(table[0]))
        options = [TreeOption(plain.tree_set, plain.estimate.expected_tokens)]
        for budget in sorted(b for b in set(budgets) if b > 1):
            built = build_tree_set(table, k, budget, n=n, top_k=top_k)
            if built.tree_set != options[-1].tree_set:
                options.append(TreeOption(built.tree_set, built.estimate.expected_tokens))
        return options

    return build
