"""The hardware-aware tree builder: stationary analysis on literals, the builder against brute force on small
cases, the estimate against a simulation of the chain, budgets respected, and the budget choice."""

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoding.tree import TreeSet, TreeSpec, tree_set_buffers
from trees.builder import (
    build_tree_set,
    choose_budget,
    ending_probabilities,
    estimate,
    stationary_distribution,
    transition_matrix,
    tree_set_slots,
)
from trees.paths import best_paths, path_probability

TABLE = [[0.5, 0.2, 0.1], [0.4, 0.2, 0.05], [0.3, 0.1, 0.1]]


def test_stationary_distribution_literals():
    two = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    assert stationary_distribution(two).tolist() == pytest.approx([1 / 3, 2 / 3])
    periodic = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # no limit; the lazy chain has one
    assert stationary_distribution(periodic).tolist() == pytest.approx([0.5, 0.5])
    # Two closed classes: where the chain ends depends on where it starts.
    split = torch.tensor([[0.0, 0.25, 0.75], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert stationary_distribution(split, start=0).tolist() == pytest.approx([0.0, 0.25, 0.75])
    assert stationary_distribution(split, start=1).tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_ending_probabilities_and_transitions_literal():
    tree = TreeSpec.build({(): 3, (0,): 2, (1,): 1, (0, 0): 3})
    # P: root 1, (0) .5, (1) .2, (0,0) .5*.4 = .2; ending: root 1-.5-.2 = .3, (0) .5-.2 = .3, (1) .2, (0,0) .2
    assert ending_probabilities(TABLE, tree) == pytest.approx([0.3, 0.3, 0.2, 0.2])
    ts = TreeSet(k=3, top_k=3, trees=(TreeSpec.build({(): 3}),) * 3 + (tree,))
    P = transition_matrix(TABLE, ts)
    assert P[0].tolist() == [0, 0, 0, 1] and P[3].tolist() == pytest.approx([0, 0.2, 0.3, 0.5])


def test_estimate_counts_the_bonus_token_in_a_one_state_chain():
    """Every node carries k: after the first step the chain sits in state k, so tau = 1 + sum of P(c)."""
    paths = best_paths(TABLE, 6, 3)
    tree = TreeSpec.build({(): 3, **{p: 3 for p in paths}})
    ts = TreeSet(k=3, top_k=3, trees=(TreeSpec.build({(): 3}),) * 3 + (tree,))
    est = estimate(TABLE, ts)
    assert est.state_distribution == pytest.approx((0, 0, 0, 1))
    assert est.expected_tokens == pytest.approx(1 + sum(path_probability(TABLE, p) for p in paths))


def simulate(table, tree_set: TreeSet, steps: int, seed: int) -> float:
    """Tokens per step of the chain, drawing the true token's rank at each depth independently."""
    rng = random.Random(seed)
    state, tokens = 0, 0
    for _ in range(steps):
        tree = tree_set.trees[state]
        counts = dict(zip(((),) + tree.paths, tree.prompt_counts))
        node: tuple[int, ...] = ()
        for depth in range(tree.depth):
            u, rank = rng.random(), None
            for r, p in enumerate(table[depth]):
                u -= p
                if u < 0:
                    rank = r
                    break
            if rank is None or node + (rank,) not in counts:
                break
            node += (rank,)
        tokens += len(node) + 1
        state = counts[node]
    return tokens / steps


@pytest.mark.parametrize("budget", [6, 20, 48])
def test_estimate_matches_a_simulation_of_the_chain(budget):
    built = build_tree_set(TABLE, 3, budget)
    assert len({c for t in built.tree_set.trees for c in t.prompt_counts}) > 1  # a chain with several states
    simulated = simulate(TABLE, built.tree_set, 40_000, seed=budget)
    assert simulated == pytest.approx(built.estimate.expected_tokens, abs=0.02)


def brute_force_best(table, k: int, top_k: int, budget: int) -> float:
    """The best tau over every tree set whose nodes each carry 1..k prompt tokens (the root alone with 0
    when the budget leaves it none) within the budget."""
    def trees(state):
        if budget < 2:
            return [TreeSpec.build({(): 0})]
        all_paths = [p for d in range(1, state + 1) for p in itertools.product(range(top_k), repeat=d)]
        out = []
        for size in range(len(all_paths) + 1):
            if 1 + size + (size + 1) > budget:
                break
            for subset in itertools.combinations(all_paths, size):
                if any(len(p) > 1 and p[:-1] not in subset for p in subset):
                    continue
                nodes = [()] + list(subset)
                for counts in itertools.product(range(1, k + 1), repeat=len(nodes)):
                    if 1 + size + sum(counts) <= budget:
                        out.append(TreeSpec.build(dict(zip(nodes, counts))))
        return out

    options = [trees(m) for m in range(k + 1)]
    return max(estimate(table, TreeSet(k=k, top_k=top_k, trees=combo)).expected_tokens
               for combo in itertools.product(*options))


@settings(max_examples=12, deadline=None)
@given(raw=st.lists(st.lists(st.floats(0.05, 1.0), min_size=2, max_size=2), min_size=2, max_size=2),
       mass=st.floats(0.3, 0.95), budget=st.integers(1, 7))
def test_builder_finds_the_brute_force_optimum_on_small_cases(raw, mass, budget):
    table = [[x / sum(row) * mass for x in row] for row in raw]
    built = build_tree_set(table, k=2, budget=budget)
    assert built.slots <= budget
    assert built.estimate.expected_tokens == pytest.approx(brute_force_best(table, 2, 2, budget), abs=1e-9)


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 9, 17, 40, 100])
@pytest.mark.parametrize("n", [1, 2])
def test_budget_respected_and_trees_valid_for_the_decoder(budget, n):
    built = build_tree_set(TABLE, 3, budget, n=n)
    ts = built.tree_set
    assert built.slots == tree_set_slots(ts, n) <= budget
    for state, tree in enumerate(ts.trees):
        assert tree.depth <= state
        if budget >= 1 + n:  # the root can carry a prompt token: no node goes without one
            assert min(tree.prompt_counts) >= 1
    buffers = tree_set_buffers(ts, n=n)
    assert buffers.widest.slots == built.slots
    # More budget never predicts fewer tokens.
    if budget > 1:
        smaller = build_tree_set(TABLE, 3, budget - 1, n=n)
        assert built.estimate.expected_tokens >= smaller.estimate.expected_tokens - 1e-9


def test_builder_beats_a_fixed_tree_of_the_same_width():
    """All nodes carrying k prompt tokens wastes slots on nodes that rarely end a step."""
    paths = best_paths(TABLE, 12, 3)
    fixed_tree = TreeSpec.build({(): 3, **{p: 3 for p in paths}})
    fixed = TreeSet(k=3, top_k=3, trees=tuple(TreeSpec.build({p: c for p, c in zip(((),) + fixed_tree.paths,
                                                                                       fixed_tree.prompt_counts)
                                                               if len(p) <= m}) for m in range(4)))
    built = build_tree_set(TABLE, 3, tree_set_slots(fixed))
    assert built.estimate.expected_tokens > estimate(TABLE, fixed).expected_tokens + 0.01


def test_choose_budget_follows_the_latency_curve():
    budgets = [1, 2, 4, 8, 16, 32, 64]
    taus = {b: (1.0 if b == 1 else build_tree_set(TABLE, 3, b).estimate.expected_tokens) for b in budgets}

    def brute(latency):
        return max(budgets, key=lambda b: taus[b] / latency(build_tree_set(TABLE, 3, b).slots if b > 1 else 1))

    flat = lambda slots: 1.0 + 1e-4 * slots  # a GPU far from saturation: the biggest tree wins  # noqa: E731
    steep = lambda slots: 1.0 * slots  # every slot costs a full step: plain decoding wins  # noqa: E731
    knee = lambda slots: 1.0 if slots <= 8 else slots / 8  # flat, then linear: the knee wins  # noqa: E731
    for latency, expected in ((flat, 64), (steep, 1), (knee, 8)):
        choice = choose_budget(TABLE, 3, latency, budgets)
        assert choice.chosen.budget == expected == brute(latency)
        assert choice.speedup == pytest.approx(taus[expected] / latency(choice.chosen.slots) * latency(1))
    assert [s[0] for s in choose_budget(TABLE, 3, flat, budgets).sweep] == budgets


@pytest.mark.parametrize("budget", [6, 30])
def test_replay_of_ranks_reproduces_the_decoders_steps(budget):
    """Steps replayed from teacher-forced guess ranks equal the steps PPD decoding really took, row by row,
    on a tree set with several depth states (and on the fixed-size tree)."""
    from decoding import PPDDecoder, PromptTokens
    from tests.helpers_models import make_tiny_llama
    from trees.acceptance import ranks_at_every_cut, replay_decoding
    from trees.paths import fixed_size_tree_set

    model = make_tiny_llama(vocab_size=48, hidden_size=32, seed=3)
    pt = PromptTokens.from_token_embeddings(model, k=3, base_model_id="tiny", base_model_hash="0",
                                            generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(budget)
    prompts = [torch.randint(0, 48, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (5,), generator=g)]
    for tree_set in (build_tree_set(TABLE, 3, budget).tree_set, fixed_size_tree_set(TABLE, budget, 3)):
        results = PPDDecoder(model, pt, tree_set).generate(prompts, 30)
        assert sum(r.num_tokens for r in results) > sum(r.num_steps for r in results)  # some guesses accepted
        for prompt, r in zip(prompts, results):
            ranks = ranks_at_every_cut(model, pt, prompt, r.token_ids, max_rank=3)
            assert replay_decoding(ranks, tree_set, r.num_tokens) == r.num_steps
