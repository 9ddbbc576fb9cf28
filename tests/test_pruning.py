"""Early pruning (decoding/pruning.py): the keep rule and the compaction on literals, surviving slots' hidden
states equal to the unpruned pass, and greedy output unchanged while the later layers see fewer slots."""

import pytest
import torch

from decoding import PPDDecoder, TreeSpec, reference_greedy
from decoding.pruning import PruneHead, compact, compacted_attend, kept_nodes
from decoding.slot_cache import step_mask
from decoding.tree import tree_buffers, tree_set_buffers
from tests.helpers_models import make_tiny_llama
from tests.test_lossless import (
    BUILT,
    DEEP,
    MAX_NEW,
    VOCAB,
    K,
    OracleGuessDecoder,
    prefilled,
    prompt_tokens,
    ragged_prompts,
)

LAYERS, HEAD_LAYER = 4, 2
SMALL = TreeSpec.build({(): 2, (0,): 1, (1,): 0, (0, 0): 1})  # nodes: 0 root, 1 (0), 2 (1), 3 (0,0)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=LAYERS, seed=1)


def random_head(model, keep_top_k: int, seed: int = 0) -> PruneHead:
    """A head with a random (non-zero) adapter, so it disagrees with the model often: plenty of pruning."""
    head = PruneHead(model.config.hidden_size, HEAD_LAYER, rank=8, keep_top_k=keep_top_k).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return head.requires_grad_(False)


@pytest.mark.parametrize("top, expected", [
    # head top-2 at each node (rows of leaves unused); tokens: root 0, (0) 11, (1) 12, (0,0) 13
    ([[11, 12], [13, 1], [1, 1], [1, 1]], [True, True, True, True]),  # every child among its parent's top
    ([[11, 5], [13, 1], [1, 1], [1, 1]], [True, True, False, True]),  # (1) dropped
    ([[12, 5], [13, 1], [1, 1], [1, 1]], [True, False, True, False]),  # (0) dropped with its child (0,0)
    ([[11, 12], [5, 1], [1, 1], [1, 1]], [True, True, True, False]),  # a leaf dropped
    ([[5, 6], [5, 6], [1, 1], [1, 1]], [True, False, False, False]),  # only the root survives
])
def test_kept_nodes_on_literals(top, expected):
    b = tree_buffers(SMALL, k=2, top_k=4)
    kept = kept_nodes(torch.tensor([[0, 11, 12, 13]]), torch.tensor([top]), b.node_parent[None],
                      b.node_valid[None], b.ancestor_or_self[None])
    assert kept.tolist() == [expected]


def test_slot_owners_and_internal_nodes_on_literals():
    b = tree_buffers(SMALL, k=2, top_k=4)
    # slots: 4 nodes, then prompt slots: root x2, (0) x1, (0,0) x1
    assert b.slot_node.tolist() == [0, 1, 2, 3, 0, 0, 1, 3]
    assert b.internal_nodes.tolist() == [0, 1]


def test_compaction_on_literals():
    keep = torch.tensor([[True, False, True, False, True], [True, True, False, False, False]])
    c = compact(keep)
    assert c.width == 3
    assert c.order[0].tolist() == [0, 2, 4] and c.order[1, :2].tolist() == [0, 1]
    assert c.valid.tolist() == [[True, True, True], [True, True, False]]
    assert c.position.tolist() == [[0, -1, 1, -1, 2], [0, 1, -1, -1, -1]]
    attend = torch.ones(2, 5, 5, dtype=torch.bool).tril()
    mask = step_mask(torch.tensor([1, 1]), compacted_attend(attend, c), 4, torch.float32)  # [2, 1, 3, 1+3]
    visible = (mask[:, 0] == 0).tolist()
    assert visible[0] == [[True, True, False, False], [True, True, True, False], [True, True, True, True]]
    # padding: the prefix and itself
    assert visible[1] == [[True, True, False, False], [True, True, True, False], [True, False, False, True]]


def test_surviving_slots_equal_the_unpruned_pass(model):
    """Every slot that survives pruning ends with the hidden state the unpruned pass gives it."""
    pt = prompt_tokens(model)
    prompts = [[4, 8, 15, 16], [23, 42], [7]]
    ts = DEEP
    guesses = torch.randint(0, VOCAB, (3, K, 10), generator=torch.Generator().manual_seed(3))
    outs = []
    for head in (None, random_head(model, keep_top_k=12)):
        dec = PPDDecoder(model, pt, ts, prune_head=head)
        cache, kv_len = prefilled(model, prompts)
        root = torch.tensor([p[-1] for p in prompts])
        with torch.inference_mode():
            buffers = tree_set_buffers(ts)
            outs.append(dec.forward(cache, buffers, kv_len, root, guesses, torch.full((3,), K),
                                    buffers.sizes([K]), cache.capacity))
    (_, full, none, _), (_, pruned, kept, c) = outs
    assert none is None
    assert 0 < int(kept.sum()) < kept.numel()  # some nodes pruned, some kept
    survivors = c.order[c.valid]
    rows = torch.arange(3)[:, None].expand_as(c.order)[c.valid]
    torch.testing.assert_close(pruned[rows, survivors], full[rows, survivors], rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def truth(model):
    prompts = ragged_prompts(8, seed=42)
    return prompts, [reference_greedy(model, p, MAX_NEW + K + 1).token_ids for p in prompts]


@pytest.mark.parametrize("tree", ["deep", "built"])
@pytest.mark.parametrize("keep_top_k", [3, 16])
def test_pruned_decoding_is_lossless(model, truth, tree, keep_top_k):
    """Deep acceptance (oracle guesses) with a random head that prunes freely: outputs stay exact, the later
    layers see fewer tokens, and pruning costs some accepted tokens but never correctness."""
    prompts, full = truth
    ts = {"deep": DEEP, "built": BUILT}[tree]
    runs = {}
    for name, head in (("full", None), ("pruned", random_head(model, keep_top_k))):
        dec = OracleGuessDecoder(model, prompt_tokens(model), ts, truth=full, seed=5, max_rank=3, prune_head=head)
        got = dec.generate(prompts, MAX_NEW)
        assert [r.token_ids for r in got] == [t[:MAX_NEW] for t in full], name
        runs[name] = (sum(r.num_tokens for r in got) / sum(r.num_steps for r in got), dec.tokens_processed / dec.passes)
    (_, work_full), (tau_pruned, work_pruned) = runs["full"], runs["pruned"]
    assert work_pruned < work_full  # the later layers ran on fewer slots
    assert tau_pruned > 1.0  # accepted paths still got through, and their KV was kept right in both layouts


def test_a_head_that_keeps_everything_changes_nothing(model, truth):
    prompts, full = truth
    steps = {}
    for name, head in (("full", None), ("keep_all", random_head(model, keep_top_k=VOCAB))):
        dec = OracleGuessDecoder(model, prompt_tokens(model), BUILT, truth=full, seed=5, prune_head=head)
        got = dec.generate(prompts, MAX_NEW)
        assert [r.token_ids for r in got] == [t[:MAX_NEW] for t in full]
        steps[name] = [r.accepted_per_step for r in got]
    assert steps["keep_all"] == steps["full"]


def test_a_head_for_a_missing_layer_is_refused(model):
    with pytest.raises(ValueError, match="layers"):
        PPDDecoder(model, prompt_tokens(model), DEEP, prune_head=PruneHead(32, layer=LAYERS, keep_top_k=2).double())
