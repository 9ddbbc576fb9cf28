"""The tree shapes a latency profile times (profiling/latency.py): for a slot count per row, a tree set whose
widest state has that many input slots, shaped like a built tree. Only their size matters: a step's latency
depends on its input slots, not on which paths they hold."""

from __future__ import annotations

from decoding.tree import TreeSet, TreeSpec
from trees.paths import best_paths


def max_tree_slots(k: int, top_k: int, n: int = 1) -> int:
    """Every path of ranks < top_k down to depth k, every node with k prompt tokens."""
    nodes = sum(top_k**d for d in range(k + 1))
    return nodes + n * k * nodes


def synthetic_tree_set(k: int, top_k: int, slots: int, n: int = 1) -> TreeSet:
    """A tree set whose state-k tree has ``slots`` inputs per row, shaped like a built tree (about one prompt
    token per node). Only its size matters for timing. With ensembles (n > 1) a few sizes cannot be made
    exactly (every prompt token takes n slots); those get the largest size below that can."""
    if not 1 <= slots <= max_tree_slots(k, top_k, n):
        raise ValueError(f"no tree of k={k}, top_k={top_k} has {slots} slots")
    max_candidates = max_tree_slots(k, top_k, 0) - 1
    target = (slots - 1 - n) / (1 + n)
    # The candidate count C nearest the target whose prompt tokens fill the most of the rest (all of it, if
    # some C can).
    best = None
    for C in sorted(range(min(max_candidates, slots - 1) + 1), key=lambda c: (abs(c - target), c)):
        prompts = min(k * (C + 1), (slots - 1 - C) // n)
        size = 1 + C + n * prompts
        if best is None or size > best[0]:
            best = (size, C, prompts)
        if size == slots:
            break
    _, C, prompt_count = best
    rest = n * prompt_count
    uniform = [[1.0 / (r + 1) for r in range(top_k)] for _ in range(k)]
    nodes = [()] + best_paths(uniform, C, k)
    counts = {node: 0 for node in nodes}
    for i in range(rest // n):  # round-robin, root first
        counts[nodes[i % len(nodes)]] += 1
    tree = TreeSpec.build(counts)
    return TreeSet(k=k, top_k=top_k, trees=(TreeSpec.build({(): 0}),) * k + (tree,))
