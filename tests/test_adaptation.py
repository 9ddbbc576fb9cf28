"""Prompt tokens replaced mid-job (decoders, engine) and learned from a job's own rows (training, the gate).

Lossless across a swap: rows decoded before, across and after new prompt tokens are adopted equal plain
decoding, greedy and sampled, with continuous batching and with a compiled step (float64 tiny models)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from decoding import PPDDecoder, PromptTokens, default_tree_set, reference_sample
from decoding.propd import ProPDDecoder
from decoding.sampling import GREEDY
from decoding.slots import Request, SlotBatch
from tests.helpers_models import make_tiny_llama, tiny_loaded_model
from tests.test_continuous import model, rows  # noqa: F401 - fixtures: three rows, the third waits for a slot
from tests.test_propd import BUDGETS, TABLE, FlipFlopLatency
from tests.test_sampling import K, prompts_for, untrained
from trees.acceptance import replay_decoding
from trees.builder import tree_family
from workers.adaptation import acceptance_table, adapt_prompt_tokens, rank_tables
from workers.configs import AdaptationConfig, DecodingConfig
from workers.engine import DecodeEngine, empty_acceptance_table


def other_tokens(model, seed: int, table=TABLE) -> PromptTokens:
    """Prompt tokens unlike ``untrained``'s: random embeddings, with an acceptance table."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(K, 1, model.config.hidden_size, generator=g, dtype=torch.float64)
    pt = untrained(model)
    pt.embeddings.data.copy_(emb)
    pt.meta.extra["acceptance"] = table
    return pt


def make(method: str, model):
    if method == "ppd":
        return PPDDecoder(model, untrained(model), tree_set=default_tree_set(K))
    return ProPDDecoder(model, untrained(model), tree_family(K, BUDGETS), TABLE, FlipFlopLatency())


def run_with_swap(decoder, rows, swap_at: int, new: PromptTokens, after_swap=None,
                  **batch_options):
    batch = SlotBatch(decoder, num_slots=2, **batch_options)
    table = decoder.prompt_table
    batch.add([Request(p, n, s, tag=i) for i, (p, n, s, _) in enumerate(rows)])
    finished = []
    for _ in range(swap_at):
        finished += batch.step()
    decoder.adopt_prompt_tokens(new)
    assert decoder.prompt_table is table and torch.equal(table, new.flat(table.dtype))  # in place
    with after_swap or contextlib.nullcontext():  # around the first step after the swap
        finished += batch.step()
    finished += batch.run()
    return batch, {req.tag: res for req, res in finished}


def tokens(results) -> dict:
    return {tag: res.token_ids for tag, res in results.items()}


TABLE2 = [[0.7, 0.1] + [0.02] * 8, [0.6, 0.1] + [0.02] * 8, [0.5, 0.1] + [0.02] * 8]


@pytest.mark.parametrize("method", ["ppd", "propd"])
@pytest.mark.parametrize("sampled", [False, True])
def test_rows_before_across_and_after_a_swap_equal_plain_decoding(model, rows, method, sampled):  # noqa: F811
    want = {i: t[:n] for i, (_, n, _, t) in enumerate(rows[sampled])}
    for swap_at in (0, 1, 4, 9, 30):  # before any step, early, mid-row, as the third row joins, after all
        decoder = make(method, model)
        _, got = run_with_swap(decoder, rows[sampled], swap_at, other_tokens(model, swap_at, TABLE2))
        assert tokens(got) == want, f"swap at step {swap_at}"
        if method == "propd":  # the family was rebuilt from the new table
            assert decoder.built_from == TABLE2 and decoder.initial_family == tuple(decoder.family)


def test_after_a_swap_the_steps_are_those_of_the_new_tokens(model, rows):  # noqa: F811
    """Swapped in before the first step, new tokens decode exactly as a decoder built with them: the same
    accepted tokens at every step (and not those of the tokens swapped out)."""
    new = other_tokens(model, 3)
    _, swapped = run_with_swap(make("ppd", model), rows[False], 0, new)
    built = SlotBatch(PPDDecoder(model, new, tree_set=default_tree_set(K)), num_slots=2)
    built.add([Request(p, n, s, tag=i) for i, (p, n, s, _) in enumerate(rows[False])])
    direct = {req.tag: res for req, res in built.run()}
    assert {t: r.accepted_per_step for t, r in swapped.items()} == {t: r.accepted_per_step for t, r in direct.items()}
    old = SlotBatch(make("ppd", model), num_slots=2)
    old.add([Request(p, n, s, tag=i) for i, (p, n, s, _) in enumerate(rows[False])])
    assert {req.tag: res.accepted_per_step for req, res in old.run()} != {
        t: r.accepted_per_step for t, r in direct.items()}, "the two sets of tokens guess alike: a weak test"


def test_the_decoders_prompt_token_table_is_allocated_once(model, rows):  # noqa: F811
    """A second batch on the decoder (the engine's fallback decodes rows alone) and a swap both write the table a
    first batch's compiled or captured steps read, never a new one."""
    decoder = make("ppd", model)
    SlotBatch(decoder, num_slots=2)
    table = decoder.prompt_table
    decoder.generate([rows[False][0][0]], 3)  # a new SlotBatch begins, in inference mode
    assert decoder.prompt_table is table
    new = other_tokens(model, 4)
    decoder.adopt_prompt_tokens(new)
    assert decoder.prompt_table is table and torch.equal(table, new.flat(table.dtype))


def test_propd_adopts_the_new_tokens_table_and_starts_its_statistics_again(model, rows):  # noqa: F811
    decoder = make("propd", model)
    _, _ = run_with_swap(decoder, rows[False], 3, other_tokens(model, 5))
    new_table = [[0.9] + [0.01] * 9, [0.8] + [0.01] * 9, [0.7] + [0.01] * 9]
    decoder.adopt_prompt_tokens(other_tokens(model, 6, new_table))
    assert sum(decoder.acceptance.table(), []) == pytest.approx(sum(new_table, []))
    assert decoder.built_from == new_table
    with pytest.raises(ValueError, match="acceptance table"):
        decoder.adopt_prompt_tokens(other_tokens(model, 7, table=None))
    with pytest.raises(ValueError, match="new prompt tokens are"):
        PPDDecoder(model, untrained(model)).adopt_prompt_tokens(untrained(model, k=2))


def test_a_compiled_step_reads_the_new_tokens_without_compiling_again(model, rows):  # noqa: F811
    """torch.compile (inductor, float64): a swap between steps changes the table's values in place, so the step
    after it runs the compiled shape as it was (no recompilation), reads the new values, and the rows still equal
    plain decoding."""
    torch._dynamo.reset()
    (p0, _, _, _), (p1, _, _, _), _ = rows[False]
    t0, t1 = (reference_sample(model, p, 8, GREEDY).token_ids for p in (p0, p1))
    same_length = [(p0, 8, GREEDY, t0), (p1, 8, GREEDY, t1)]
    decoder = make("ppd", model)
    no_recompiling = torch._dynamo.config.patch(error_on_recompile=True)
    batch, got = run_with_swap(decoder, same_length, 3, other_tokens(model, 1), no_recompiling, step_mode="compile")
    assert tokens(got) == {0: t0, 1: t1}
    # The compiled step read the new values: it accepted what the eager fixed-shape step does with the same swap.
    _, eager = run_with_swap(make("ppd", model), same_length, 3, other_tokens(model, 1), step_mode="fixed")
    assert {t: r.accepted_per_step for t, r in got.items()} == {t: r.accepted_per_step for t, r in eager.items()}


# -- the engine -----------------------------------------------------------------------------------------------
def tiny_rows(count: int, seed: int = 5) -> list[dict]:
    prompts = prompts_for(count, seed=seed, vocab=64)
    return [{"id": str(i), "prompt": " ".join(map(str, p))} for i, p in enumerate(prompts)]


class IdsEngine(DecodeEngine):
    """Rows' prompts are token ids written out (the tiny model's stub tokenizer encodes nothing)."""

    def _encode(self, row: dict) -> list[int]:
        return [int(t) for t in row["prompt"].split()]


def test_the_engine_swaps_between_steps_and_rows_name_the_tokens_that_decoded_them():
    loaded = tiny_loaded_model()
    config = DecodingConfig(max_new_tokens=12)
    plain = IdsEngine(loaded, config.model_copy(update={"method": "vanilla"}), batch_size=2)
    want = [out.output_token_ids for out in plain.run_rows(tiny_rows(6))]
    engine = IdsEngine(loaded, config, batch_size=2, adaptable=True)
    assert isinstance(engine.decoder, ProPDDecoder)  # untrained tokens, an empty table: plain decoding planned
    assert engine.decoder.prompt_tokens.meta.extra["acceptance"] == empty_acceptance_table(3)
    job = engine.add_shard(tiny_rows(6))
    for _ in range(3):
        engine.step()
    in_flight = {r.request.tag[1].output.id for r in engine.batch.rows}
    new = other_tokens(loaded.model, 2)
    new = PromptTokens(new.embeddings.float(), new.meta.__class__(**{**vars(new.meta), "base_model_hash": "tinyhash"}))
    pending = engine.request_prompt_tokens(new, "newhash", "test")
    while not job.done.is_set():
        engine.step()
    assert pending.done.is_set() and pending.error is None and engine.adoptions == 1
    assert [out.output_token_ids for out in job.outputs] == want
    names = {out.id: out.prompts_hash for out in job.outputs}
    assert in_flight and all(names[i] is None for i in in_flight)  # admitted with the untrained tokens
    assert {names[i] for i in names if i not in in_flight} == {"newhash"}
    assert engine.describe()["prompts_hash"] == "newhash"


def test_the_engine_keeps_its_tokens_when_new_ones_are_for_another_model():
    loaded = tiny_loaded_model()
    engine = IdsEngine(loaded, DecodingConfig(max_new_tokens=4), batch_size=2, adaptable=True)
    pending = engine.request_prompt_tokens(other_tokens(loaded.model, 3), "x", "test")  # base_model_hash "0"
    engine.step()
    assert pending.done.is_set() and "made for model" in str(pending.error)
    assert engine.prompts_hash is None and engine.adoptions == 0


# -- training and the gate ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repeating():
    """A one-layer float32 model over 16 tokens, whose greedy outputs fall into short cycles (structure prompt
    tokens can learn), and 48 rows of its own outputs."""
    tiny = make_tiny_llama(vocab_size=16, hidden_size=32, num_layers=1, seed=3, dtype=torch.float32)
    prompts = prompts_for(48, seed=8, vocab=16)
    return tiny, [(p, reference_sample(tiny, p, 32, GREEDY).token_ids) for p in prompts]


SETTINGS = AdaptationConfig(epochs=8, lr=3e-2)


def test_adaptation_raises_replay_tau_and_the_gate_refuses_worse_tokens(repeating):
    tiny, seqs = repeating
    train, held = seqs[:36], seqs[36:]
    start = PromptTokens.from_token_embeddings(tiny, k=K, base_model_id="tiny", base_model_hash="0")
    outcome = adapt_prompt_tokens(tiny, start, train, held, SETTINGS, lambda table: default_tree_set(K))
    report = outcome.report
    assert outcome.passed, report
    assert report["tau_after"]["tree_63"] > report["tau_before"]["tree_63"] + 0.2, report
    assert report["tau_after"]["worker_tree"] > report["tau_before"]["worker_tree"] + 0.5, report
    table = outcome.prompt_tokens.meta.extra["acceptance"]
    assert table == acceptance_table(rank_tables(tiny, outcome.prompt_tokens, held), K)
    assert outcome.prompt_tokens.meta.extra["adaptation"]["rows_learned"] == 36
    # Deterministic for a seed.
    again = adapt_prompt_tokens(tiny, start, train, held, SETTINGS, lambda table: default_tree_set(K))
    assert torch.equal(again.prompt_tokens.embeddings, outcome.prompt_tokens.embeddings)
    # From the trained tokens, a step far too large spoils them: refused.
    worse = adapt_prompt_tokens(tiny, outcome.prompt_tokens, train, held,
                                SETTINGS.model_copy(update={"lr": 50.0, "epochs": 1}),
                                lambda table: default_tree_set(K))
    assert not worse.passed, worse.report
    assert worse.report["tau_after"]["tree_63"] <= worse.report["tau_before"]["tree_63"]


def test_the_gate_replays_the_decoding_of_each_held_back_rows_first_gate_tokens(repeating):
    tiny, seqs = repeating
    train, held = seqs[:36], seqs[36:]
    start = PromptTokens.from_token_embeddings(tiny, k=K, base_model_id="tiny", base_model_hash="0")
    settings = SETTINGS.model_copy(update={"gate_tokens": 12})
    outcome = adapt_prompt_tokens(tiny, start, train, held, settings, lambda table: default_tree_set(K))
    cut = [(p, r[:12]) for p, r in held]
    assert outcome.report["gate_tokens"] == 12 * len(held) < sum(len(r) for _, r in held)
    ranks = rank_tables(tiny, outcome.prompt_tokens, cut)
    table = acceptance_table(ranks, K)
    assert outcome.prompt_tokens.meta.extra["acceptance"] == table
    steps = sum(replay_decoding(rk, default_tree_set(K), 12) for rk in ranks)
    assert outcome.report["tau_after"]["worker_tree"] == round(12 * len(held) / steps, 4)
    # The whole rows give another replay: the cut is real.
    whole = acceptance_table(rank_tables(tiny, outcome.prompt_tokens, held), K)
    assert whole != table


def test_training_stops_at_its_time_limit(repeating):
    tiny, seqs = repeating
    start = PromptTokens.from_token_embeddings(tiny, k=K, base_model_id="tiny", base_model_hash="0")
    with pytest.raises(TimeoutError, match="deadline"):
        adapt_prompt_tokens(tiny, start, seqs[:36], seqs[36:], SETTINGS.model_copy(update={"timeout_s": 1e-6}),
                            lambda table: default_tree_set(K))


def test_acceptance_tables_count_only_targets_inside_the_row():
    ranks = torch.tensor([[0, 1], [2, 10], [10, 0]])  # R = 3 cuts, k = 2
    table = acceptance_table([ranks], 2)
    # token 0: cuts 0, 1 (targets 1, 2) ranked 0 and 2; token 1: cut 0 (target 2) ranked 1
    assert table[0][0] == 0.5 and table[0][2] == 0.5 and table[1][1] == 1.0
