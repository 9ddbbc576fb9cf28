"""Sampling is exact: the filters and the inverse-CDF draw on synthetic logits, the tree walk on hand-built
trees, PPD's sampled output equal to plain sampling's token for token for a seed, and, over many draws, the
distribution of the first tokens equal to the model's own (a chi-square test that typical acceptance fails).
"""

import math

import pytest
import torch

from decoding import (
    PPDDecoder,
    PromptTokens,
    SamplingParams,
    VanillaDecoder,
    chain_tree_set,
    completion_seed,
    default_tree_set,
    reference_greedy,
    reference_sample,
)
from decoding.sampling import Filters, kept_threshold, sample_accept, sample_tokens, uniform_stream
from tests.helpers_models import make_tiny_llama

VOCAB, K = 64, 3


def probs_logits(*probs: float) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def draw_one(logits, u, temperature=1.0, top_k=0, top_p=1.0) -> int:
    return int(sample_tokens(logits[None], torch.tensor([temperature]), torch.tensor([top_k]),
                             torch.tensor([top_p]), torch.tensor([u]))[0])


# -- sample_tokens on synthetic logits ----------------------------------------------------------------------------

def test_inverse_cdf_in_vocabulary_order():
    logits = probs_logits(0.1, 0.2, 0.3, 0.4)  # cdf 0.1, 0.3, 0.6, 1.0
    assert [draw_one(logits, u) for u in (0.0, 0.05, 0.1, 0.15, 0.29, 0.31, 0.59, 0.61, 0.999)] == [
        0, 0, 1, 1, 1, 2, 2, 3, 3]


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([-math.inf, 0.0, -math.inf, 0.0, -math.inf], dtype=torch.float64)
    assert {draw_one(logits, u) for u in (0.0, 1e-12, 0.5, 1 - 1e-12)} == {1, 3}


def test_top_k_and_top_p_keep_the_most_probable_tokens():
    logits = probs_logits(0.1, 0.2, 0.3, 0.4)
    # top_k 2: tokens 2 and 3, renormalised to 3/7 and 4/7
    assert [draw_one(logits, u, top_k=2) for u in (0.0, 0.42, 0.43, 0.99)] == [2, 2, 3, 3]
    # top_p 0.5: 0.4 alone is short of 0.5, so token 2 joins it; 0.35: token 3 alone
    assert [draw_one(logits, u, top_p=0.5) for u in (0.0, 0.42, 0.43, 0.99)] == [2, 2, 3, 3]
    assert {draw_one(logits, u, top_p=0.35) for u in (0.0, 0.5, 0.99)} == {3}
    # top_k first, then top_p over what is left: top_k 3 -> 0.2/0.9, 0.3/0.9, 0.4/0.9; top_p 0.7 keeps 3 and 2
    assert {draw_one(logits, u, top_k=3, top_p=0.7) for u in torch.linspace(0, 0.999, 50).tolist()} == {2, 3}


def test_ties_at_a_cut_off_are_all_kept():
    logits = torch.tensor([1.0, 2.0, 0.0, 2.0, 2.0], dtype=torch.float64)
    assert {draw_one(logits, u, top_k=1) for u in torch.linspace(0, 0.999, 30).tolist()} == {1, 3, 4}
    assert {draw_one(logits, u, top_p=0.1) for u in torch.linspace(0, 0.999, 30).tolist()} == {1, 3, 4}


def test_the_top_p_cut_is_found_however_deep_it_lies():
    g = torch.Generator().manual_seed(1)
    scaled = torch.randn(3, 5000, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [2.0], [8.0]])
    top_k = torch.tensor([0, 0, 300])
    top_p = torch.tensor([0.9, 0.5, 0.99], dtype=torch.float64)
    threshold = kept_threshold(scaled, top_k, top_p, first_look=4)  # row 0 needs the whole vocabulary
    for b in range(3):
        values = scaled[b].sort(descending=True).values[: int(top_k[b]) or None]
        probs = values.softmax(-1)
        last = int(((probs.cumsum(-1) - probs) < top_p[b]).sum()) - 1  # the last token of the smallest prefix
        assert threshold[b] == values[last]


def test_temperature_sharpens_and_zero_is_the_argmax():
    logits = probs_logits(0.1, 0.2, 0.3, 0.4)
    # temperature 0.5 squares the probabilities: 1, 4, 9, 16 over 30; cdf 1/30, 5/30, 14/30, 1
    assert [draw_one(logits, u, temperature=0.5) for u in (0.03, 0.04, 0.16, 0.17, 0.46, 0.47)] == [
        0, 1, 1, 2, 2, 3]
    assert {draw_one(logits, u, temperature=0.0) for u in (0.0, 0.5, 0.99)} == {3}


def test_a_row_draws_the_same_whatever_its_neighbours_ask_for():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g, dtype=torch.float64)
    u = torch.rand(6, generator=g, dtype=torch.float64)
    temperature = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.9, 1.0], dtype=torch.float64)
    top_k = torch.tensor([0, 5, 0, 0, 3, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.8, 1.0, 0.95], dtype=torch.float64)
    together = sample_tokens(logits, temperature, top_k, top_p, u)
    alone = [int(sample_tokens(logits[b:b + 1], temperature[b:b + 1], top_k[b:b + 1], top_p[b:b + 1], u[b:b + 1]))
             for b in range(6)]
    assert together.tolist() == alone
    assert together[2] == logits[2].argmax()


def test_uniform_stream_is_a_prefix_of_itself_and_seeds_differ():
    assert torch.equal(uniform_stream(5, 1000)[:300], uniform_stream(5, 300))
    assert not torch.equal(uniform_stream(5, 10), uniform_stream(6, 10))
    seeds = {completion_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=math.nan), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_k=-1)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# -- the tree walk on a hand-built tree ---------------------------------------------------------------------------

def test_sample_accept_follows_the_drawn_tokens_down_the_tree():
    # node: 0 root, 1 and 2 its children holding tokens 7 and 8, 3 a child of 1 holding 9, 4 a child of 2 (5)
    node_tokens = torch.tensor([[0, 7, 8, 9, 5]] * 4)
    node_parent = torch.tensor([[0, 0, 0, 1, 2]] * 4)
    node_valid = torch.ones(4, 5, dtype=torch.bool)
    node_valid[3, 2] = False  # row 3: node 2 was pruned
    # draws per row and depth (depth 0 at the root, 1 below it, 2 at the leaves)
    script = torch.tensor([[8, 5, 11], [7, 4, 12], [3, 1, 1], [8, 5, 6]])
    seen = []

    def logits_at(node, rows):
        seen.append(list(zip(rows.tolist(), node.tolist())))
        return torch.zeros(len(rows), 16)

    def draw(logits, depth, rows):
        return script[rows, depth]

    best, tokens, accepted = sample_accept(node_tokens, node_parent, node_valid, logits_at, draw, max_depth=2)
    assert accepted.tolist() == [2, 1, 0, 0]
    assert best.tolist() == [4, 1, 0, 0]
    assert [tokens[b, : accepted[b] + 1].tolist() for b in range(4)] == [[8, 5, 11], [7, 4], [3], [8]]
    # (row, node) drawn at per depth: every row at the root, then only the rows still in the tree
    assert seen == [[(0, 0), (1, 0), (2, 0), (3, 0)], [(0, 2), (1, 1)], [(0, 4)]]


# -- exactness against plain sampling, token for token ------------------------------------------------------------

def tiny(seed=0, vocab=VOCAB):
    return make_tiny_llama(vocab_size=vocab, hidden_size=32, seed=seed)


def untrained(model, k=K):
    return PromptTokens.from_token_embeddings(model, k=k, n=1, base_model_id="tiny", base_model_hash="0",
                                              generator=torch.Generator().manual_seed(0))


def prompts_for(batch, seed, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 12, (batch,), generator=g)]


PARAMS = [SamplingParams(0.7), SamplingParams(1.0, top_p=0.9), SamplingParams(1.0, top_k=5), SamplingParams(0.0),
          SamplingParams(1.3, top_p=0.8, top_k=10), SamplingParams(0.5)]


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.mark.parametrize("tree_set", [default_tree_set(K), chain_tree_set(K)], ids=["default", "chain"])
def test_ppd_sampling_is_plain_sampling_token_for_token(model, tree_set):
    prompts = prompts_for(6, 1)
    params = [SamplingParams(p.temperature, p.top_p, p.top_k, seed=completion_seed(7, i)) for i, p in enumerate(PARAMS)]
    limits = [20, 5, 20, 13, 20, 1]
    eos = [3]
    expected = [reference_sample(model, p, n, s, eos) for p, n, s in zip(prompts, limits, params)]
    decoder = PPDDecoder(model, untrained(model), tree_set=tree_set, eos_token_ids=eos)
    got = decoder.generate(prompts, limits, sampling=params)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in expected]
    assert sum(r.num_tokens for r in got) > sum(r.num_steps for r in got), "no guess was ever accepted"
    vanilla = VanillaDecoder(model, eos_token_ids=eos).generate(prompts, limits, sampling=params)
    assert [r.token_ids for r in vanilla] == [r.token_ids for r in expected]
    # the greedy row is greedy decoding
    assert got[3].token_ids == reference_greedy(model, prompts[3], limits[3], eos).token_ids


def test_propd_switching_trees_every_step_samples_exactly(model):
    from decoding.propd import ProPDDecoder
    from tests.test_propd import BUDGETS, TABLE, FlipFlopLatency
    from trees.builder import tree_family

    prompts = prompts_for(5, 6)
    params = [SamplingParams(0.8, top_p=0.95, seed=completion_seed(3, i)) for i in range(5)]
    decoder = ProPDDecoder(model, untrained(model), tree_family(K, BUDGETS), TABLE, FlipFlopLatency(),
                           rebuild_every=4)
    got = decoder.generate(prompts, 20, sampling=params)
    assert [r.token_ids for r in got] == [reference_sample(model, p, 20, s).token_ids for p, s in zip(prompts, params)]
    sizes = [slots for _, slots in decoder.choices]
    assert 1 in sizes and max(sizes) > 16  # plain steps and big trees both ran


def test_early_pruning_keeps_sampling_exact():
    from tests.test_pruning import LAYERS, random_head

    model = make_tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=LAYERS, seed=1)
    prompts = prompts_for(6, 7)
    params = [SamplingParams(1.0, seed=completion_seed(4, i)) for i in range(6)]
    expected = [reference_sample(model, p, 20, s).token_ids for p, s in zip(prompts, params)]
    work = {}
    for name, head in (("full", None), ("pruned", random_head(model, 3))):
        decoder = PPDDecoder(model, untrained(model), tree_set=default_tree_set(K), prune_head=head)
        got = decoder.generate(prompts, 20, sampling=params)
        assert [r.token_ids for r in got] == expected, name
        work[name] = decoder.tokens_processed / decoder.passes
    assert work["pruned"] < work["full"]  # the later layers ran on fewer slots


def test_a_seed_gives_the_same_tokens_alone_or_in_any_batch(model):
    prompts = prompts_for(5, 2)
    params = [SamplingParams(1.0, seed=completion_seed(11, i)) for i in range(5)]
    decoder = PPDDecoder(model, untrained(model), tree_set=default_tree_set(K))
    together = [r.token_ids for r in decoder.generate(prompts, 16, sampling=params)]
    alone = [decoder.generate([p], 16, sampling=[s])[0].token_ids for p, s in zip(prompts, params)]
    reordered = decoder.generate(prompts[::-1], 16, sampling=params[::-1])
    assert together == alone == [r.token_ids for r in reordered][::-1]
    again = [r.token_ids for r in decoder.generate(prompts, 16, sampling=params)]
    assert again == together


def test_sample_indices_give_distinct_completions(model):
    prompt = prompts_for(1, 3)[0]
    decoder = PPDDecoder(model, untrained(model), tree_set=default_tree_set(K))
    params = [SamplingParams(1.0, seed=completion_seed(5, i)) for i in range(8)]
    outputs = [tuple(r.token_ids) for r in decoder.generate([prompt] * 8, 12, sampling=params)]
    assert len(set(outputs)) == 8


def test_all_greedy_sampling_is_greedy_decoding(model):
    prompts = prompts_for(4, 4)
    decoder = PPDDecoder(model, untrained(model), tree_set=default_tree_set(K))
    greedy = [r.token_ids for r in decoder.generate(prompts, 16)]
    greedy_params = [SamplingParams(0.0, seed=s) for s in range(4)]
    zero = [r.token_ids for r in decoder.generate(prompts, 16, sampling=greedy_params)]
    assert greedy == zero == [reference_greedy(model, p, 16).token_ids for p in prompts]


def test_stop_checks_cut_the_row_where_they_say(model):
    prompts = prompts_for(2, 5)
    params = [SamplingParams(1.0, seed=1), SamplingParams(1.0, seed=2)]
    full = reference_sample(model, prompts[0], 16, params[0]).token_ids

    def stop_after(n):  # a stop "string" completed by the n-th token
        return lambda ids, start: (n, "<stop>") if len(ids) >= n else None

    decoder = PPDDecoder(model, untrained(model), tree_set=default_tree_set(K))
    got = decoder.generate(prompts, 16, sampling=params, stop=[stop_after(5), None])
    assert got[0].token_ids == full[:5] and got[0].stop_reason == "<stop>" and got[0].finish_reason.value == "stop"
    assert got[1].token_ids == reference_sample(model, prompts[1], 16, params[1]).token_ids


# -- the distribution, over many draws ----------------------------------------------------------------------------

STAT_VOCAB, STAT_TOKENS, STAT_DRAWS = 16, 3, 12_000


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The target distribution, written out plainly (independent of sample_tokens): logits [V] -> probs [V]."""
    probs = (logits.double() / p.temperature).softmax(-1)
    order = sorted(range(len(probs)), key=lambda i: (-float(logits[i]), i))
    keep, mass = set(), 0.0
    for rank, i in enumerate(order):
        if (p.top_k and rank >= p.top_k) or mass >= p.top_p:
            break
        keep.add(i)
        mass += float(probs[i])
    out = torch.tensor([float(probs[i]) if i in keep else 0.0 for i in range(len(probs))], dtype=torch.float64)
    return out / out.sum()


def exact_joint(model, prompt, p: SamplingParams, n_tokens: int) -> dict[tuple, float]:
    """P(first n_tokens tokens) under plain sampling, by enumerating every prefix."""
    joint = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for prefix, mass in joint.items():
            logits = model(input_ids=torch.tensor([prompt + list(prefix)])).logits[0, -1]
            for token, q in enumerate(filtered_probs(logits, p).tolist()):
                if q > 0:
                    nxt[prefix + (token,)] = mass * q
        joint = nxt
    return joint


def chi_square(counts: dict[tuple, int], expected_probs: dict[tuple, float], draws: int) -> tuple[float, int]:
    """Pearson's statistic with cells of expectation < 5 pooled into one; (statistic, degrees of freedom).
    Infinite when a sequence the model gives no probability was drawn."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key, q in expected_probs.items():
        e, o = q * draws, counts.get(key, 0)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
        else:
            stat, cells = stat + (o - e) ** 2 / e, cells + 1
    if pooled_exp > 0:
        stat, cells = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, cells + 1
    if not set(counts) <= set(expected_probs):
        stat = math.inf
    return stat, cells - 1


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """The upper 1e-4 quantile of chi-square(df) (Wilson-Hilferty; z is the normal's 1e-4 quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


class TypicalAcceptancePPD(PPDDecoder):
    """A wrong scheme, for the test's power: Medusa's typical acceptance takes the first child whose token
    has probability above min(0.09, 0.3 exp(-entropy)) at its parent, and samples only where none does."""

    def accept_sampled(self, node_tokens, node_parent, node_valid, logits_at, draw, max_depth):
        B = node_tokens.shape[0]
        node = torch.zeros(B, dtype=torch.long)
        walking = torch.ones(B, dtype=torch.bool)
        accepted = torch.zeros(B, dtype=torch.long)
        tokens = torch.zeros(B, max_depth + 1, dtype=torch.long)
        every = torch.arange(B)
        for depth in range(max_depth + 1):
            logits = logits_at(node, every)
            drawn = draw(logits, depth, every)
            probs = logits.double().softmax(-1)
            threshold = torch.minimum(torch.full((B,), 0.09, dtype=torch.float64),
                                      0.3 * torch.exp((probs * probs.clamp_min(1e-30).log()).sum(-1)))
            child = (node_parent == node[:, None]) & node_valid
            child[:, 0] = False
            good = child & (probs.gather(1, node_tokens) > threshold[:, None])
            found = good.any(1) & walking & (depth < max_depth)
            pick = good.long().argmax(1)
            tokens[:, depth] = torch.where(found, node_tokens.gather(1, pick[:, None]).squeeze(1),
                                           torch.where(walking, drawn, tokens[:, depth]))
            node = torch.where(found, pick, node)
            accepted += found.long()
            walking &= found
        return node, tokens, accepted


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_p=0.9), SamplingParams(1.0, top_k=4)],
                         ids=["t1.0", "t0.7-p0.9", "t1.0-k4"])
def test_sampled_distribution_matches_plain_sampling(params):
    model = tiny(seed=3, vocab=STAT_VOCAB)
    prompt = [1, 5, 2]
    expected = exact_joint(model, prompt, params, STAT_TOKENS)

    def counts_of(decoder_cls):
        decoder = decoder_cls(model, untrained(model, k=2), tree_set=default_tree_set(2))
        counts: dict[tuple, int] = {}
        walked = 0  # rows whose second step accepted a guess: tokens 2 and 3 came from one tree
        for start in range(0, STAT_DRAWS, 3000):
            rows = [SamplingParams(params.temperature, params.top_p, params.top_k, seed=completion_seed(99, i))
                    for i in range(start, start + 3000)]
            for r in decoder.generate([prompt] * len(rows), STAT_TOKENS + 2, sampling=rows):
                key = tuple(r.token_ids[:STAT_TOKENS])
                counts[key] = counts.get(key, 0) + 1
                walked += len(r.accepted_per_step) > 1 and r.accepted_per_step[1] > 1
        return counts, walked / STAT_DRAWS

    counts, walked = counts_of(PPDDecoder)
    assert set(counts) <= set(expected), "drew a sequence the model gives no probability"
    assert walked > 0.15, f"the trees accepted too little to test the walk ({walked:.0%} of rows)"
    stat, df = chi_square(counts, expected, STAT_DRAWS)
    assert stat < chi_square_critical(df), f"chi-square {stat:.1f} on {df} degrees of freedom"

    wrong, _ = counts_of(TypicalAcceptancePPD)
    wrong_stat, wrong_df = chi_square(wrong, expected, STAT_DRAWS)
    assert wrong_stat > 3 * chi_square_critical(wrong_df), f"typical acceptance passed: {wrong_stat:.1f} on {wrong_df}"


def test_completions_of_one_prompt_are_independent():
    """Pairs of neighbouring completions (sample indices 2j and 2j+1 of one seed) have the joint distribution
    of two independent draws: their first tokens' joint counts against the product of the exact marginals."""
    model = tiny(seed=3, vocab=STAT_VOCAB)
    prompt = [4, 9]
    params = SamplingParams(1.0)
    marginal = {key[0]: q for key, q in exact_joint(model, prompt, params, 1).items()}
    pairs = 4000
    rows = [SamplingParams(1.0, seed=completion_seed(17, i)) for i in range(2 * pairs)]
    first = [r.token_ids[0] for r in VanillaDecoder(model).generate([prompt] * len(rows), 1, sampling=rows)]
    counts: dict[tuple, int] = {}
    for j in range(pairs):
        key = (first[2 * j], first[2 * j + 1])
        counts[key] = counts.get(key, 0) + 1
    expected = {(a, b): qa * qb for a, qa in marginal.items() for b, qb in marginal.items()}
    stat, df = chi_square(counts, expected, pairs)
    assert stat < chi_square_critical(df), f"chi-square {stat:.1f} on {df} degrees of freedom"
    # the test has power: pairing a completion with itself is as dependent as it gets
    same = {}
    for j in range(pairs):
        same[(first[j], first[j])] = same.get((first[j], first[j]), 0) + 1
    assert chi_square(same, expected, pairs)[0] > 3 * chi_square_critical(df)


@pytest.mark.parametrize("method", ["ppd", "propd", "pruned", "vanilla"])
def test_completions_of_one_prompt_share_its_prefill_and_stay_exact(method):
    from decoding.propd import ProPDDecoder
    from tests.test_propd import BUDGETS, TABLE, FlipFlopLatency
    from tests.test_pruning import LAYERS, random_head
    from trees.builder import tree_family

    model = make_tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=LAYERS, seed=1)
    a, b, c = prompts_for(2, 8) + [[7]]  # c: one token, so nothing to prefill
    prompts = [a, b, a, c, a, c, b]
    params = [SamplingParams(1.0, seed=completion_seed(6, i)) for i in range(6)] + [SamplingParams(0.0)]
    decoder = {
        "ppd": lambda: PPDDecoder(model, untrained(model), tree_set=default_tree_set(K)),
        "propd": lambda: ProPDDecoder(model, untrained(model), tree_family(K, BUDGETS), TABLE, FlipFlopLatency()),
        "pruned": lambda: PPDDecoder(model, untrained(model), tree_set=default_tree_set(K),
                                     prune_head=random_head(model, 3)),
        "vanilla": lambda: VanillaDecoder(model),
    }[method]()
    widths = []  # input tokens per row of each forward of the decoder stack
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(
            (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[:2]),
        with_kwargs=True)
    try:
        got = decoder.generate(prompts, 12, sampling=params)
    finally:
        hook.remove()
    assert [r.token_ids for r in got] == [reference_sample(model, p, 12, s).token_ids for p, s in zip(prompts, params)]
    # One forward ran the distinct prompts alone (3 rows, the longest prompt minus its last token, the first root).
    prefill_len = max(len(a), len(b)) - 1
    assert tuple(widths[0]) == (3, prefill_len)
    assert len({tuple(r.token_ids) for r, p in zip(got, prompts) if p == a}) == 3  # distinct completions


@pytest.mark.parametrize("seed", range(4))
def test_the_fixed_shape_walk_draws_what_the_row_sized_walk_draws(seed):
    """sample_accept's two algorithms (decoding/draws.py picks one per step mode) on random trees and logits,
    with top_k and top_p filters: the same deepest node, emitted tokens and counts. The fixed-shape walk also
    finds top_p's cut over the whole sorted vocabulary, the row-sized one among the most probable first."""
    g = torch.Generator().manual_seed(seed)
    B, C, V, D = 6, 9, 300, 3
    parent = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 6])  # depth 1: nodes 1, 2; 2: 3, 4, 5; 3: 6, 7; 4: 8
    depth_of = [0, 1, 1, 2, 2, 2, 3, 3, 4]
    logits = torch.randn(B, C, V, generator=g, dtype=torch.float64) * 3  # [B, C, V]
    probs = logits.softmax(-1)
    tokens = torch.zeros(B, C, dtype=torch.long)
    for b in range(B):  # a node holds a likely token at its parent, siblings distinct
        for parent_node in range(C):
            children = [c for c in range(1, C) if int(parent[c]) == parent_node]
            likely = probs[b, parent_node].topk(len(children)).indices.tolist() if children else []
            for child, token in zip(children, likely):
                tokens[b, child] = token
    node_parent, node_valid = parent.expand(B, C).clone(), torch.ones(B, C, dtype=torch.bool)
    node_valid[0, 8] = False
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.9, 1.0, 0.0], dtype=torch.float64)
    top_k, top_p = torch.tensor([0, 5, 0, 40, 0, 0]), torch.tensor([1.0, 1.0, 0.8, 0.95, 0.5, 1.0], dtype=torch.float64)
    uniforms = torch.rand(B, D + 1, generator=g, dtype=torch.float64)
    max_depth = min(D, max(depth_of))

    def run(all_rows: bool):
        filters = Filters(max_top_k=40, top_p=True, exhaustive=all_rows)

        def draw(node_logits, depth, rows):
            return sample_tokens(node_logits, temperature[rows], top_k[rows], top_p[rows], uniforms[rows, depth],
                                 filters)

        return sample_accept(tokens, node_parent, node_valid, lambda node, rows: logits[rows, node], draw,
                             max_depth, all_rows=all_rows)

    (best, drawn, accepted), (best2, drawn2, accepted2) = run(False), run(True)
    assert torch.equal(best, best2) and torch.equal(accepted, accepted2)
    assert int(accepted.max()) >= 2  # the trees were walked deep
    for b in range(B):
        n = int(accepted[b]) + 1
        assert drawn[b, :n].tolist() == drawn2[b, :n].tolist()
