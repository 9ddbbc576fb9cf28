"""Greedy PPD is lossless: token for token equal to transformers' greedy generate and to the naive oracle.

Tiny random Llama models in float64 (no near-tie flips between different matmul shapes). Untrained prompt
tokens rarely guess right, so a second proposer feeds the true continuation at chosen ranks (sometimes not
at all): that forces deep acceptance, KV compaction of long accepted paths, and depth-state changes.
"""

import pytest
import torch

from decoding import (
    FinishReason,
    PPDDecoder,
    PromptTokens,
    PromptTokensMeta,
    TreeSet,
    TreeSpec,
    VanillaDecoder,
    chain_tree_set,
    default_tree_set,
    reference_greedy,
    vanilla_tree_set,
)
from decoding.batch import new_cache
from decoding.ppd import greedy_accept, top_k_guesses, verify_greedy
from decoding.slot_cache import SlotCache, step_mask
from decoding.slots import one_step, prefill_slots
from decoding.tree import tree_buffers, tree_set_buffers
from tests.helpers_models import make_tiny_llama
from trees.builder import build_tree_set

VOCAB, K = 64, 3
MAX_NEW = 24


def tiny_llama(seed: int = 0):
    return make_tiny_llama(vocab_size=VOCAB, hidden_size=32, seed=seed)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def ragged_prompts(batch: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 13, (batch,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt, max_new_tokens, eos) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None,
                         pad_token_id=0, top_k=None, top_p=None, temperature=None)
    return out[0, len(prompt):].tolist()


def prefilled(model, prompts):
    """A slot cache holding each prompt but its last token, from column 0, and those lengths [B]."""
    cache = SlotCache.for_model(model, len(prompts))
    prefill_slots(model, cache, 0, [p[:-1] for p in prompts])
    return cache, torch.tensor([len(p) - 1 for p in prompts])


def prompt_tokens(model, n=1, seed=0):
    return PromptTokens.from_token_embeddings(model, k=K, n=n, base_model_id="tiny", base_model_hash="0",
                                              generator=torch.Generator().manual_seed(seed))


class OracleGuessDecoder(PPDDecoder):
    """Guesses the true continuation (from the oracle) at random ranks, or misses it on purpose."""

    def __init__(self, *args, truth, seed=0, miss_prob=0.15, max_rank=3, **kwargs):
        super().__init__(*args, **kwargs)
        self.truth = truth
        self.g = torch.Generator().manual_seed(seed)
        self.miss_prob, self.max_rank = miss_prob, max_rank

    def finish_step(self, plan, report):
        """Rewrites the surviving rows' guesses (slots 0..A-1 of [slots, k, top_k]; the model's are filler), on the
        device and the host, before the decoder learns from them."""
        rows, guesses = report.after, report.guesses
        top_k = guesses.shape[2]
        for b, (row, result) in enumerate(zip(rows.ids, rows.results)):
            done = len(result.token_ids)
            for d in range(guesses.shape[1]):
                true = self.truth[row][done + d]  # the token at depth d+1 beyond the next root
                filler = [t for t in guesses[b, d].tolist() if t != true]
                if torch.rand(1, generator=self.g).item() >= self.miss_prob:
                    rank = int(torch.randint(0, self.max_rank, (1,), generator=self.g))
                    filler.insert(rank, true)
                guesses[b, d] = torch.tensor(filler[:top_k] + [t for t in range(VOCAB)
                                             if t not in filler][: max(0, top_k - len(filler))])
                rows.guesses[b][d * top_k : (d + 1) * top_k] = guesses[b, d].tolist()
        super().finish_step(plan, report)


WIDE = TreeSet(k=K, top_k=10, trees=tuple(
    TreeSpec.build({(): K, **({(r,): K for r in range(8)} if m else {})}) for m in range(K + 1)))
DEEP = TreeSet(k=K, top_k=10, trees=tuple(TreeSpec.build(
    {p: c for p, c in {(): K, (0,): K, (1,): 1, (0, 0): K, (0, 1): 2, (0, 0, 0): K, (0, 0, 1): 1,
                       (1, 0): 2}.items() if len(p) <= m}) for m in range(K + 1)))
# A hardware-aware tree: several depth states, nodes with 1..k prompt tokens.
BUILT = build_tree_set([[0.5, 0.2, 0.1, 0.05], [0.4, 0.2, 0.05, 0.05], [0.3, 0.1, 0.1, 0.05]], K, 40).tree_set
TREES = {"chain": chain_tree_set(K), "wide": WIDE, "deep": DEEP, "default": default_tree_set(K),
         "root_only": vanilla_tree_set(K), "built": BUILT}


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_ppd_matches_transformers_generate(model, tree, batch):
    prompts = ragged_prompts(batch, seed=batch)
    eos = [5]
    expected = [hf_greedy(model, p, MAX_NEW, eos) for p in prompts]
    dec = PPDDecoder(model, prompt_tokens(model), TREES[tree], eos_token_ids=eos)
    got = dec.generate(prompts, MAX_NEW)
    assert [r.token_ids for r in got] == expected


@pytest.fixture(scope="module")
def truth(model):
    """Oracle continuations long enough for any guess (no EOS: guesses may look past one)."""
    prompts = ragged_prompts(8, seed=42)
    return prompts, [reference_greedy(model, p, MAX_NEW + K + 1).token_ids for p in prompts]


@pytest.mark.parametrize("tree", ["chain", "deep", "default", "wide", "built"])
@pytest.mark.parametrize("n", [1, 2])
def test_deep_acceptance_stays_lossless(model, truth, tree, n):
    prompts, full = truth
    max_rank = 1 if tree == "chain" else 3  # a chain holds rank 0 only
    dec = OracleGuessDecoder(model, prompt_tokens(model, n=n), TREES[tree], truth=full, seed=n, max_rank=max_rank)
    got = dec.generate(prompts, MAX_NEW)
    assert [r.token_ids for r in got] == [t[:MAX_NEW] for t in full]
    total_tokens, total_steps = sum(r.num_tokens for r in got), sum(r.num_steps for r in got)
    # The oracle makes deep trees accept several tokens per step; a wide tree accepts at most 2.
    assert total_tokens / total_steps > (1.5 if tree != "wide" else 1.3)
    assert all(sum(r.accepted_per_step) == r.num_tokens for r in got)



@pytest.mark.parametrize("merged_logits_rows", [0, 10**6])
def test_one_lm_head_call_over_every_slot_or_two_give_the_same_tokens(model, truth, merged_logits_rows):
    """The lm_head over all slots at once (small steps) or over the nodes and then the best node's prompt
    slots: the same tokens as plain greedy decoding."""
    prompts, full = truth
    dec = OracleGuessDecoder(model, prompt_tokens(model, n=2), BUILT, truth=full, seed=1,
                             merged_logits_rows=merged_logits_rows)
    got = dec.generate(prompts, MAX_NEW)
    assert [r.token_ids for r in got] == [t[:MAX_NEW] for t in full]


def test_one_lm_head_call_over_every_slot_gives_the_steps_outputs_of_two(model, truth):
    """One step, both ways, on the same cache and guesses: the same tokens, next state, and prompt-token
    logits (the next guesses), to float64 rounding."""
    prompts, full = truth
    pt = prompt_tokens(model, n=2)
    guesses = torch.randint(0, VOCAB, (3, K, 10), generator=torch.Generator().manual_seed(4))
    guesses[:, 0, 1] = torch.tensor([t[1] for t in full[:3]])  # rank 1 of the first guess is right: depth >= 1
    outs = []
    for rows in (0, 10**6):
        dec = PPDDecoder(model, pt, DEEP, merged_logits_rows=rows)
        cache, kv_len = prefilled(model, prompts[:3])
        root = torch.tensor([t[0] for t in full[:3]])  # as if the prompt's last token had been the step before
        with torch.inference_mode():
            _, counts, root, _, _, _ = one_step(dec, cache, tree_set_buffers(DEEP, n=2), kv_len,
                                                torch.tensor([p[-1] for p in prompts[:3]]), guesses,
                                                torch.zeros(3, dtype=torch.long))
            kv_len = kv_len + counts
            outs.append(one_step(dec, cache, tree_set_buffers(DEEP, n=2), kv_len, root, guesses, torch.full((3,), K)))
    (tokens, counts, bonus, next_guesses, state, _), (tokens2, counts2, bonus2, next_guesses2, state2, _) = outs
    assert counts.tolist() == counts2.tolist() and min(counts.tolist()) >= 2
    assert torch.equal(tokens, tokens2) and torch.equal(bonus, bonus2) and torch.equal(state, state2)
    assert int(state.min()) > 0 and torch.equal(next_guesses, next_guesses2)

def test_eos_mid_generation_and_per_row_limits(model, truth):
    prompts, full = truth
    eos = full[0][6]  # a token row 0 emits mid-way: every row stops at its first occurrence of it
    limits = [MAX_NEW, 1, 0, 7, MAX_NEW, 2, MAX_NEW, 13]
    dec = OracleGuessDecoder(model, prompt_tokens(model), default_tree_set(K), truth=full,
                             eos_token_ids=[eos])
    got = dec.generate(prompts, limits)
    for r, t, limit in zip(got, full, limits):
        cut = t[: t.index(eos) + 1] if eos in t[:limit] else t[:limit]
        assert r.token_ids == cut
        assert r.finish_reason == (FinishReason.STOP if eos in t[:limit] else FinishReason.LENGTH)
        assert r.num_steps == (0 if limit == 0 else r.num_steps) and (limit == 0) == (r.num_steps == 0)
    assert got[0].finish_reason == FinishReason.STOP and len(got[0].token_ids) <= 7


def test_max_new_tokens_one_and_single_token_prompts(model):
    prompts = [[3], [7], [1, 2, 3]]
    expected = [hf_greedy(model, p, 1, []) for p in prompts]
    for dec in (PPDDecoder(model, prompt_tokens(model), default_tree_set(K)), VanillaDecoder(model)):
        got = dec.generate(prompts, 1)
        assert [r.token_ids for r in got] == expected
        assert all(r.num_steps == 1 and r.finish_reason == FinishReason.LENGTH for r in got)


@pytest.mark.parametrize("batch", [1, 5])
def test_vanilla_matches_oracle(model, batch):
    prompts = ragged_prompts(batch, seed=7)
    got = VanillaDecoder(model, eos_token_ids=[9]).generate(prompts, MAX_NEW)
    for r, p in zip(got, prompts):
        ref = reference_greedy(model, p, MAX_NEW, [9])
        assert r.token_ids == ref.token_ids and r.finish_reason == ref.finish_reason
        assert r.num_steps == r.num_tokens  # tau is exactly 1


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="empty"):
        VanillaDecoder(model).generate([[1], []], 3)


def test_prompt_tokens_for_another_model_are_refused(model):
    # Hidden size 16 against the model's 32: made for another model.
    meta = PromptTokensMeta(base_model_id="x", base_model_hash="1", k=K, n=1)
    with pytest.raises(ValueError, match="another model"):
        PPDDecoder(model, PromptTokens(torch.zeros(K, 1, 16, dtype=torch.float64), meta))


def test_tree_node_outputs_equal_the_chain_over_their_root_path(model):
    """Each node's hidden state from one tree pass equals a sequential pass over its root path; each prompt
    slot's equals a sequential pass over the path followed by its own chain of prompt tokens."""
    tree = TreeSpec.build({(): 2, (0,): 2, (1,): 1, (0, 0): 1, (0, 1): 0, (1, 0): 2, (0, 0, 0): 1})
    ts = TreeSet(k=K, top_k=4, trees=(TreeSpec.build({(): 1}), TreeSpec.build({(): 1}),
                                      TreeSpec.build({(): 1}), tree))
    n = 2
    pt = prompt_tokens(model, n=n)
    dec = PPDDecoder(model, pt, ts)
    prompts = [[4, 8, 15, 16], [23, 42]]
    g = torch.Generator().manual_seed(3)
    guesses = torch.randint(0, VOCAB, (2, K, 4), generator=g)
    cache, kv_len = prefilled(model, prompts)
    root = torch.tensor([p[-1] for p in prompts])
    buffers = tree_set_buffers(ts, n=n)
    with torch.inference_mode():
        ids, hidden, kept, compaction = dec.forward(cache, buffers, kv_len, root, guesses, torch.full((2,), K),
                                                    buffers.sizes([K]), cache.capacity)
    assert kept is None and compaction is None
    b = tree_buffers(tree, k=K, top_k=4, n=n)
    nodes = [()] + list(tree.paths)
    embed = model.get_input_embeddings()
    for row, prompt in enumerate(prompts):
        for i, path in enumerate(nodes):
            slots = b.node_path[i, : len(path) + 1].tolist()
            seq = embed(torch.tensor(prompt[:-1] + ids[row, slots].tolist()))  # prefix, root, path
            with torch.inference_mode():
                ref = model.get_decoder()(inputs_embeds=seq[None]).last_hidden_state[0]
            torch.testing.assert_close(hidden[row, i], ref[-1], rtol=0, atol=1e-9)
            for j in range(tree.prompt_counts[i]):
                for e in range(n):
                    chain = torch.stack([pt.embeddings[jj, e] for jj in range(j + 1)])
                    with torch.inference_mode():
                        ref_p = model.get_decoder()(inputs_embeds=torch.cat([seq, chain])[None]).last_hidden_state[0]
                    s = int(b.node_prompt_slots[i, j, e])
                    torch.testing.assert_close(hidden[row, s], ref_p[-1], rtol=0, atol=1e-9)


def test_kept_kv_equals_a_sequential_prefill(model, truth):
    """After a step that accepts a deep path, each row's kept KV (columns 0..kv_len-1 of its slot) equals a fresh
    prefill of the same tokens. The root-only step before it writes each root at its row's own column and
    moves nothing; the deep path is then moved to sit right after the root."""
    prompts, full = truth
    prompts, full = prompts[:3], full[:3]
    ts = DEEP
    dec = OracleGuessDecoder(model, prompt_tokens(model), ts, truth=full, miss_prob=0.0, max_rank=1)
    cache, kv_len = prefilled(model, prompts)
    root = torch.tensor([p[-1] for p in prompts])
    # Guesses: the true next K tokens at rank 0 for every row.
    guesses = torch.zeros(3, K, 10, dtype=torch.long)
    for b, t in enumerate(full):
        guesses[b, :, 0] = torch.tensor(t[1: K + 1])
        guesses[b, :, 1:] = torch.tensor([x for x in range(VOCAB) if x not in t[1: K + 1]][:9])
    first = torch.tensor([t[0] for t in full])  # the first new token plays the root here
    with torch.inference_mode():
        # Put each row's prompt last token into the cache first (a root-only step), so the root is `first`.
        _, counts0, root, _, _, _ = one_step(dec, cache, tree_set_buffers(ts), kv_len, root, guesses,
                                             torch.zeros(3, dtype=torch.long))
        assert torch.equal(root, first) and counts0.tolist() == [1, 1, 1]
        kv_len = kv_len + counts0
        assert kv_len.tolist() == [len(p) for p in prompts]
        tokens, counts, _, _, _, _ = one_step(dec, cache, tree_set_buffers(ts), kv_len, root, guesses,
                                              torch.full((3,), K))
    assert counts.tolist() == [K + 1] * 3  # three accepted candidates plus the bonus
    kv_len = kv_len + counts
    for b, (p, t) in enumerate(zip(prompts, full)):
        assert tokens[b].tolist() == t[1: K + 2]
        kept = p + t[: K + 1]  # prompt, the root t[0], the accepted t[1..K] (the bonus is the next root)
        assert int(kv_len[b]) == len(kept)
        ref = new_cache(model)
        with torch.inference_mode():
            model(input_ids=torch.tensor([kept]), cache=ref, use_cache=True)
        for layer, ref_layer in zip(cache.layers, ref.layers):
            torch.testing.assert_close(layer.keys[b, :, : len(kept)], ref_layer.keys[0], rtol=0, atol=1e-9)
            torch.testing.assert_close(layer.values[b, :, : len(kept)], ref_layer.values[0], rtol=0, atol=1e-9)


def test_step_mask_places_each_rows_tree_at_its_kv_length():
    """Literal masks: row 0 holds 2 columns, row 1 holds 0; a 2-slot tree (slot 1 sees slot 0) over 5 columns."""
    attend = torch.tensor([[True, False], [True, True]]).expand(2, 2, 2)
    mask = step_mask(torch.tensor([2, 0]), attend, 5, torch.float32)  # [2, 1, 2, 5]
    visible = (mask[:, 0] == 0).int().tolist()
    assert visible == [[[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]],
                       [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]]
    assert mask.dtype == torch.float32 and mask.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("plain_every", [1, 3])
def test_root_only_steps_move_no_kv_and_stay_lossless(model, truth, monkeypatch, plain_every):
    """Plain decoding through PPD (root-only trees) leaves each new column where the model wrote it: not one KV
    move. With DEEP in between (every third step root-only: DEEP's state 0, then its deep state, then plain),
    the output is still plain greedy decoding's."""
    moved = []
    move_columns = SlotCache.move_columns
    monkeypatch.setattr(SlotCache, "move_columns", lambda self, src, dst, layers=slice(None): (
        moved.append(src.shape[1]), move_columns(self, src, dst, layers)))
    plain_buffers, deep_buffers = tree_set_buffers(vanilla_tree_set(K)), tree_set_buffers(DEEP)

    class Alternating(OracleGuessDecoder):
        steps = 0

        def plan_step(self, rows):
            self.steps += 1
            return self.plan_for(plain_buffers if self.steps % plain_every == 0 else deep_buffers, rows)

    prompts, full = truth
    dec = Alternating(model, prompt_tokens(model), DEEP, truth=full, miss_prob=0.3, max_rank=1, seed=5)
    got = dec.generate(prompts[:5], MAX_NEW)
    assert [r.token_ids for r in got] == [t[:MAX_NEW] for t in full[:5]]
    if plain_every == 1:
        assert moved == []
    else:
        assert 0 < len(moved) <= dec.steps // 3 + 1  # DEEP's deep steps alone moved KV


@pytest.mark.parametrize("sampled", [False, True])
def test_the_root_only_step_is_the_general_steps_shortcut(model, truth, monkeypatch, sampled):
    """A root-only tree set takes a shortcut through the step (decoding/vanilla.root_only_step); with it
    turned off, the general path gives the same rows (tokens and steps, greedy and sampled alike), the same
    pass and token counts, and the same tokens when rows end at different steps (EOS, per-row limits)."""
    from decoding import SamplingParams
    from decoding.tree import TreeSet as TreeSetClass

    prompts, full = truth
    eos = [full[0][10]]  # row 0's 11th greedy token: greedy row 0 ends there, before its limit
    limits = [MAX_NEW, 5, 1, MAX_NEW, 9, MAX_NEW, 2, 13]
    sampling = [SamplingParams(temperature=0.9, top_p=0.95, seed=i) for i in range(len(prompts))] if sampled else None

    def run():
        dec = PPDDecoder(model, prompt_tokens(model), vanilla_tree_set(K), eos_token_ids=eos)
        rows = dec.generate(prompts, limits, sampling=sampling)
        return [(r.token_ids, r.accepted_per_step) for r in rows], dec.passes, dec.tokens_processed

    shortcut = run()
    monkeypatch.setattr(TreeSetClass, "root_only", property(lambda self: False))
    assert not vanilla_tree_set(K).root_only  # the general path from here on
    assert run() == shortcut
    if not sampled:
        assert len(shortcut[0][0][0]) <= 11 < limits[0]
        assert [tokens for tokens, _ in shortcut[0]] == [VanillaDecoder(model, eos_token_ids=eos).generate(
            [p], n)[0].token_ids for p, n in zip(prompts, limits)]


def test_only_plain_decodings_tree_set_is_root_only():
    assert vanilla_tree_set(K).root_only
    assert not any(TREES[name].root_only for name in ("chain", "wide", "deep", "default", "built"))
    # Prompt tokens at the root alone are a tree: the step must run them to make guesses.
    assert not TreeSet(k=1, top_k=2, trees=(TreeSpec.build({(): 1}), TreeSpec.build({(): 0}))).root_only


SMALL = TreeSpec.build({(): 2, (0,): 1, (1,): 0, (0, 0): 1})


@pytest.mark.parametrize("argmax, tokens, expected", [
    # nodes: 0 root, 1 (0), 2 (1), 3 (0,0); argmax is the model's choice after each node
    ([10, 99, 99, 99], [0, 11, 12, 13], 0),  # nothing matches: root only
    ([12, 99, 99, 99], [0, 11, 12, 13], 2),  # rank-1 child accepted
    ([11, 13, 99, 99], [0, 11, 12, 13], 3),  # chain (0) -> (0,0)
    ([12, 13, 99, 99], [0, 11, 12, 13], 2),  # (0,0) would match under (0), but (0) itself is rejected
    ([11, 77, 99, 99], [0, 11, 12, 13], 1),  # (0) accepted, (0,0) rejected
])
def test_greedy_accept_on_synthetic_logits(argmax, tokens, expected):
    b = tree_buffers(SMALL, k=2, top_k=4)
    best = greedy_accept(torch.tensor([tokens]), torch.tensor([argmax]), b.node_parent[None], b.node_valid[None],
                         b.ancestor_or_self[None], b.node_depth[None])
    assert best.tolist() == [expected]


def test_greedy_accept_ignores_padded_nodes():
    b = tree_buffers(SMALL, k=2, top_k=4)
    valid = b.node_valid.clone()
    valid[3] = False  # a padded node, even when its token happens to match, is never accepted
    best = greedy_accept(torch.tensor([[0, 11, 12, 13]]), torch.tensor([[11, 13, 99, 99]]), b.node_parent[None],
                         valid[None], b.ancestor_or_self[None], b.node_depth[None])
    assert best.tolist() == [1]


@pytest.mark.parametrize("argmax, emitted", [
    # nodes: 0 root, 1 (0) holding 11, 2 (1) holding 12, 3 (0,0) holding 13; the row emits the accepted
    # candidates, then the argmax at the deepest accepted node (what lies past them is not emitted)
    ([10, 99, 99, 99], [10]),  # nothing accepted: the root's argmax alone
    ([12, 99, 98, 99], [12, 98]),  # rank-1 child accepted, then its argmax
    ([11, 13, 99, 42], [11, 13, 42]),  # the chain (0) -> (0,0), then the argmax at (0,0)
])
def test_greedy_verification_emits_the_accepted_path_then_the_bonus(argmax, emitted):
    b = tree_buffers(SMALL, k=2, top_k=4)
    v = verify_greedy(torch.tensor([[0, 11, 12, 13]]), torch.tensor([argmax]), b.node_parent[None],
                      b.node_valid[None], b.ancestor_or_self[None], b.node_depth[None], b.node_path[None, :, :3])
    assert int(v.accepted[0]) + 1 == len(emitted) and v.tokens.shape == (1, 3)
    assert v.tokens[0, : len(emitted)].tolist() == emitted
    assert v.path[0].tolist() == b.node_path[int(v.best[0]), :3].tolist()


def test_the_next_guesses_are_each_prompt_tokens_top_k_then_zeros():
    logits = torch.tensor([[[0.1, 0.9, 0.5, 0.0], [0.7, 0.2, 0.3, 0.8]]])  # [1, m=2, V=4]
    guesses = top_k_guesses(logits, k=3, top_k=2)
    assert guesses.tolist() == [[[1, 2], [3, 0], [0, 0]]]  # the third prompt token is not attached: zeros
    assert top_k_guesses(logits[:, :0], k=3, top_k=2).tolist() == [[[0, 0]] * 3]
