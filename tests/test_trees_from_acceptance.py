"""The fixed-size tree from an acceptance table: the most probable paths, checked by brute force."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decoding.tree import tree_set_buffers
from trees.paths import best_paths, fixed_size_tree_set, path_probability

TABLE = [[0.5, 0.2, 0.1], [0.4, 0.2, 0.05], [0.3, 0.1, 0.1]]


def test_best_paths_literal():
    # P: (0)=.5 (0,0)=.2 (1)=.2 (0,1)=.1 (0,0,0)=.06 (2)=.1 ...
    assert best_paths(TABLE, 4, 3) == [(0,), (0, 0), (1,), (0, 1)]
    assert best_paths(TABLE, 3, 1) == [(0,), (1,), (2,)]
    assert best_paths(TABLE, 5, 0) == []


@settings(max_examples=50, deadline=None)
@given(table=st.lists(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3), min_size=2, max_size=2)
       .map(lambda t: [[x / sum(row) * 0.9 for x in row] for row in t]),
       n=st.integers(1, 12))
def test_best_paths_maximise_expected_tokens_by_brute_force(table, n):
    """No other prefix-closed set of n paths has a larger expected number of accepted tokens."""
    paths = best_paths(table, n, max_depth=2)
    assert len(paths) == min(n, 3 + 9)
    assert all(p[:-1] in paths or len(p) == 1 for p in paths)  # a tree
    all_paths = [(r,) for r in range(3)] + [(a, b) for a in range(3) for b in range(3)]
    best = max(
        sum(path_probability(table, p) for p in subset)
        for subset in itertools.combinations(all_paths, len(paths))
        if all(len(p) == 1 or p[:-1] in subset for p in subset)
    )
    assert sum(path_probability(table, p) for p in paths) == pytest.approx(best)


def test_fixed_size_tree_set_is_valid_for_the_decoder():
    ts = fixed_size_tree_set(TABLE, num_nodes=5, k=3)
    assert [len(t.paths) for t in ts.trees] == [0, 3, 5, 5]
    assert all(set(t.prompt_counts) == {3} for t in ts.trees)
    assert ts.trees[1].depth == 1
    assert ts.trees[3].paths == tuple(sorted(best_paths(TABLE, 5, 3), key=lambda p: (len(p), p)))
    tree_set_buffers(ts, n=2)
    with pytest.raises(ValueError, match="covers 3 prompt tokens"):
        fixed_size_tree_set(TABLE, 5, k=4)
