"""Trees from an acceptance table a[i][r] = P(the true token at distance i+2 is exactly rank r of prompt token
i's guesses), with depths assumed independent (as in the PPD paper).

This module holds the fixed-size tree (``--tree-nodes N``): the N most probable candidate paths, every node
carrying k prompt tokens, so every step after the first runs in depth state k. Choosing the size and the
prompt-token counts per device is the hardware-aware builder's job (trees/builder.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from decoding.tree import TreeSet, TreeSpec

Path = tuple[int, ...]


def path_probability(acceptance: Sequence[Sequence[float]], path: Path) -> float:
    p = 1.0
    for depth, rank in enumerate(path):
        p *= acceptance[depth][rank]
    return p


def best_paths(acceptance: Sequence[Sequence[float]], num_nodes: int, max_depth: int) -> list[Path]:
    """The ``num_nodes`` most probable paths of depth <= max_depth, best first.

    A child is never more probable than its parent, and is only considered once its parent is taken, so the
    result is always a tree (every prefix present).
    """
    top_k = len(acceptance[0])
    heap = [(-acceptance[0][r], (r,)) for r in range(top_k)] if max_depth >= 1 else []
    heapq.heapify(heap)
    taken: list[Path] = []
    while heap and len(taken) < num_nodes:
        neg_p, path = heapq.heappop(heap)
        taken.append(path)
        if len(path) < max_depth:
            for r in range(len(acceptance[len(path)])):
                heapq.heappush(heap, (neg_p * acceptance[len(path)][r], path + (r,)))
    return taken


def fixed_size_tree_set(acceptance: Sequence[Sequence[float]], num_nodes: int, k: int,
                        top_k: int | None = None) -> TreeSet:
    """State m gets the ``num_nodes`` most probable paths of depth <= m; every node carries k prompt tokens."""
    if len(acceptance) < k:
        raise ValueError(f"the acceptance table covers {len(acceptance)} prompt tokens, the tree needs k={k}")
    top_k = top_k or len(acceptance[0])
    table = [list(row[:top_k]) for row in acceptance[:k]]
    trees = tuple(TreeSpec.build({(): k, **{p: k for p in best_paths(table, num_nodes, m)}}) for m in range(k + 1))
    return TreeSet(k=k, top_k=top_k, trees=trees)
