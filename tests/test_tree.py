"""Tree specs and buffers: hand-written literals for a small tree, invariants on random trees."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoding.tree import (
    CANDIDATE,
    PAD,
    PROMPT,
    ROOT,
    TreeSet,
    TreeSpec,
    chain_tree_set,
    default_tree_set,
    tree_buffers,
    tree_set_buffers,
    vanilla_tree_set,
)

# Root carries 2 prompt tokens; (0) carries 1; (1) carries none; (0,0) carries 1.
SMALL = TreeSpec.build({(): 2, (0,): 1, (1,): 0, (0, 0): 1})


def test_small_tree_buffers_match_literals():
    b = tree_buffers(SMALL, k=2, top_k=4, n=1)
    # Slots: 0 root, 1 (0), 2 (1), 3 (0,0), 4 root.p0, 5 root.p1, 6 (0).p0, 7 (0,0).p0
    assert b.slot_kind.tolist() == [ROOT, CANDIDATE, CANDIDATE, CANDIDATE, PROMPT, PROMPT, PROMPT, PROMPT]
    assert b.position_offsets.tolist() == [0, 1, 1, 2, 1, 2, 2, 3]
    assert b.guess_index.tolist() == [0, 0, 1, 4 + 0, 0, 0, 0, 0]  # (depth-1)*top_k + rank
    assert b.prompt_index.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    expected_attend = [
        # r  0  1  00 rp0 rp1 0p0 00p0
        [1, 0, 0, 0, 0, 0, 0, 0],  # root
        [1, 1, 0, 0, 0, 0, 0, 0],  # (0)
        [1, 0, 1, 0, 0, 0, 0, 0],  # (1)
        [1, 1, 0, 1, 0, 0, 0, 0],  # (0,0)
        [1, 0, 0, 0, 1, 0, 0, 0],  # root prompt 0
        [1, 0, 0, 0, 1, 1, 0, 0],  # root prompt 1
        [1, 1, 0, 0, 0, 0, 1, 0],  # (0) prompt 0
        [1, 1, 0, 1, 0, 0, 0, 1],  # (0,0) prompt 0
    ]
    assert b.attend.int().tolist() == expected_attend
    assert b.node_parent.tolist() == [0, 0, 0, 1]
    assert b.node_depth.tolist() == [0, 1, 1, 2]
    assert b.node_path.tolist() == [[0, 0, 0], [0, 1, 1], [0, 2, 2], [0, 1, 3]]
    assert b.node_prompt_count.tolist() == [2, 1, 0, 1]
    assert b.node_prompt_slots[:, :, 0].tolist() == [[4, 5], [6, 0], [0, 0], [7, 0]]


def test_ensemble_copies_share_positions_and_see_only_their_own_chain():
    b = tree_buffers(TreeSpec.build({(): 2}), k=2, top_k=4, n=2)
    # Slots: 0 root, then token 0 copies 0/1, token 1 copies 0/1.
    assert b.position_offsets.tolist() == [0, 1, 1, 2, 2]
    assert b.prompt_index.tolist() == [0, 0, 1, 2, 3]
    assert b.attend.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],  # token 1 copy 0 sees token 0 copy 0
        [1, 0, 1, 0, 1],  # token 1 copy 1 sees token 0 copy 1
    ]
    assert b.node_prompt_slots.tolist() == [[[1, 2], [3, 4]]]


@pytest.mark.parametrize("bad, message", [
    ({(0,): 1}, "root"),
    ({(): 1, (0, 0): 1}, "no parent"),
    ({(): 1, (-1,): 1}, "negative"),
    ({(): -1}, ">= 0"),
])
def test_invalid_specs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        TreeSpec.build(bad)


def test_tree_set_validates_depth_rank_and_counts():
    ok = TreeSpec.build({(): 1})
    with pytest.raises(ValueError, match="deep"):
        TreeSet(k=1, top_k=2, trees=(TreeSpec.build({(): 1, (0,): 1}), ok))
    with pytest.raises(ValueError, match="top_k"):
        TreeSet(k=1, top_k=2, trees=(ok, TreeSpec.build({(): 1, (2,): 1})))
    with pytest.raises(ValueError, match="more than k"):
        TreeSet(k=1, top_k=2, trees=(ok, TreeSpec.build({(): 2})))
    with pytest.raises(ValueError, match="one tree per depth state"):
        TreeSet(k=2, top_k=2, trees=(ok,))


def test_json_round_trip_and_hash():
    ts = default_tree_set(k=3)
    again = TreeSet.from_json(ts.to_json())
    assert again == ts and again.tree_hash == ts.tree_hash
    assert chain_tree_set(3).tree_hash != ts.tree_hash


def test_named_tree_sets_are_valid():
    for ts in (default_tree_set(3), chain_tree_set(3), vanilla_tree_set(3), default_tree_set(2), chain_tree_set(1)):
        tree_set_buffers(ts, n=2)  # builds without error
    assert default_tree_set(3).trees[3].num_nodes - 1 == 14


@st.composite
def tree_specs(draw, k=3, top_k=4):
    counts = {(): draw(st.integers(0, k))}
    frontier = [()]
    while frontier:
        parent = frontier.pop()
        if len(parent) == k:
            continue
        for r in range(draw(st.integers(0, 3 if len(parent) == 0 else 2))):
            child = parent + (r,)
            counts[child] = draw(st.integers(0, k))
            frontier.append(child)
    return TreeSpec.build(counts)


@settings(max_examples=60, deadline=None)
@given(tree=tree_specs(), n=st.integers(1, 3))
def test_random_tree_buffers_invariants(tree, n):
    k, top_k = 3, 4
    b = tree_buffers(tree, k=k, top_k=top_k, n=n)
    nodes = [()] + list(tree.paths)
    C = len(nodes)
    N = b.attend.shape[0]
    assert N == C + n * sum(tree.prompt_counts)
    assert bool(b.attend.diagonal().all())
    assert not bool(b.attend.triu(1).any())  # slots only see earlier slots: the layout is topological
    # Candidates never see prompt tokens (that would break losslessness).
    assert not bool(b.attend[:C, C:].any())
    for i, p in enumerate(nodes):
        seen = {nodes[j] for j in range(C) if b.attend[i, j]}
        assert seen == {p[:d] for d in range(len(p) + 1)}  # exactly its ancestors and itself
        assert b.position_offsets[i] == len(p)
        path = b.node_path[i].tolist()
        assert [nodes[s] for s in path[: len(p) + 1]] == [p[:d] for d in range(len(p) + 1)]
        for j in range(tree.prompt_counts[i]):
            for e in range(n):
                s = int(b.node_prompt_slots[i, j, e])
                assert b.slot_kind[s] == PROMPT and b.position_offsets[s] == len(p) + j + 1
                assert b.prompt_index[s] == j * n + e
                sees = set(b.attend[s].nonzero().squeeze(1).tolist())
                own_chain = {int(b.node_prompt_slots[i, jj, e]) for jj in range(j + 1)}
                assert sees == {nodes.index(p[:d]) for d in range(len(p) + 1)} | own_chain


@settings(max_examples=30, deadline=None)
@given(trees=st.lists(tree_specs(k=2), min_size=3, max_size=3))
def test_stacked_buffers_pad_without_changing_any_state(trees):
    # Trees may be too deep for their state: keep each within its depth by truncation.
    fixed = [TreeSpec.build({p: c for p, c in zip(((),) + t.paths, t.prompt_counts) if len(p) <= m})
             for m, t in enumerate(trees)]
    ts = TreeSet(k=2, top_k=4, trees=tuple(fixed))
    sb = tree_set_buffers(ts, n=1)
    for m, tree in enumerate(fixed):
        own = tree_buffers(tree, k=2, top_k=4, n=1, max_depth=sb.widest.depth)
        N, C = own.attend.shape[0], own.node_depth.shape[0]
        assert sb.state_sizes[m].slots == N and sb.state_sizes[m].nodes == C
        assert torch.equal(sb.stacked.attend[m, :N, :N], own.attend)
        assert torch.equal(sb.stacked.node_path[m, :C], own.node_path)
        assert not bool(sb.stacked.node_valid[m, C:].any())
        assert bool((sb.stacked.slot_kind[m, N:] == PAD).all())
        pad_attend = sb.stacked.attend[m, N:]
        assert bool((pad_attend.sum(-1) == 1).all())  # padding sees only itself
