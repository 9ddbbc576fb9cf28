"""ProPD dynamic tree sizing: the online statistics on hand-written cases, the per-step choice, and
losslessness while the tree changes from step to step."""

import pytest
import torch

from decoding import VanillaDecoder
from decoding.online_stats import AcceptanceTracker, LatencyModel
from decoding.propd import ProPDDecoder, TreeOption
from profiling.tree_builder import tree_family
from tests.test_lossless import K, MAX_NEW, OracleGuessDecoder, model, prompt_tokens, ragged_prompts, truth  # noqa: F401 (fixtures)

TABLE = [[0.5, 0.2, 0.1] + [0.02] * 7, [0.4, 0.2, 0.05] + [0.02] * 7, [0.3, 0.1, 0.1] + [0.02] * 7]
BUDGETS = (4, 8, 16, 32, 64)


# ------------------------------------------------------------------------------------------------------------
# Online acceptance


def test_every_guess_is_scored_once_its_answer_is_committed():
    tracker = AcceptanceTracker([[0.0] * 3] * 2, k=2, top_k=3, prior_weight=0.0)
    # Row 7 has 4 tokens; its guesses for output positions 4 and 5.
    tracker.record([7], [4], torch.tensor([[[10, 11, 12], [20, 21, 22]]]), [2])
    tracker.resolve(7, [1, 2, 3, 4, 11], finished=False)  # position 4 is known, position 5 not yet: wait
    assert tracker.scored == [0, 0]
    # Position 5 holds 22. Guess 1 is scored although guess 0 ranked second: a rejected path still counts.
    tracker.resolve(7, [1, 2, 3, 4, 11, 22], finished=False)
    assert tracker.scored == [1, 1] and tracker.hits == [[0, 1, 0], [0, 0, 1]]
    # A miss, and a row that ends before its last guess's answer: only the known guess is scored.
    tracker.record([7], [6], torch.tensor([[[30, 31, 32], [40, 41, 42]]]), [2])
    tracker.resolve(7, [1, 2, 3, 4, 11, 22, 99], finished=True)
    assert tracker.scored == [2, 1] and tracker.hits == [[0, 1, 0], [0, 0, 1]]
    assert tracker.table() == [[0.0, 0.5, 0.0], [0.0, 0.0, 1.0]]
    assert 7 not in tracker.pending


def test_the_prior_weighs_as_many_observations_as_asked():
    tracker = AcceptanceTracker([[0.5, 0.0]], k=1, top_k=2, prior_weight=3.0)
    tracker.record([0], [1], torch.tensor([[[5, 6]]]), [1])
    tracker.resolve(0, [9, 6], finished=True)  # rank 1
    assert tracker.table() == [[pytest.approx(1.5 / 4), pytest.approx(1 / 4)]]


def test_acceptance_converges_to_the_true_rank_distribution(model, truth):
    """The oracle puts the true token at rank 0, 1 or 2 (each with probability 0.85 / 3) or nowhere."""
    prompts, full = truth

    class OracleProPD(OracleGuessDecoder, ProPDDecoder):
        pass

    flat = LatencyModel([(1, 1, 0.0, 1.0), (8, 512, 0.0, 1.0)])  # slots are free: the biggest tree every step
    dec = OracleProPD(model, prompt_tokens(model), tree_family(K, BUDGETS), TABLE, flat, truth=full, seed=3)
    dec.acceptance.prior_weight = 0.0
    got = dec.generate(prompts, MAX_NEW)
    assert [r.token_ids for r in got] == [t[:MAX_NEW] for t in full]
    tracker = dec.acceptance
    scored = sum(tracker.scored)
    assert min(tracker.scored) > 30 and scored > 150, tracker.scored
    pooled = [sum(hits[r] for hits in tracker.hits) / scored for r in range(10)]  # over the k prompt tokens
    assert pooled[:3] == pytest.approx([0.85 / 3] * 3, abs=0.07), pooled  # binomial sd ~0.035
    assert sum(pooled[3:]) == 0.0


# ------------------------------------------------------------------------------------------------------------
# Online latency


def test_latency_fit_predicts_unseen_sizes_and_follows_recent_steps():
    def true(batch, slots):
        return 0.01 + 0.001 * batch * slots + 0.002 * batch

    profiled = [(b, s) for b in (1, 4) for s in (1, 8, 32)]
    model = LatencyModel([(b, s, 100.0, true(b, s)) for b, s in profiled])
    assert model.predict(4, 8, 100.0) == pytest.approx(true(4, 8))  # a profiled pair: the profile
    assert model.predict(2, 16, 100.0) == pytest.approx(true(2, 16), rel=1e-3)  # elsewhere: the fit
    # The real steps run twice as slow as profiled. After a few steps of one pair only, the profiled pairs
    # not run yet are scaled too; the fit follows as the recent steps outweigh the profile.
    for _ in range(40):
        model.observe(4, 8, 100.0, 2 * true(4, 8))
    assert model.predict(4, 8, 100.0) == pytest.approx(2 * true(4, 8), rel=1e-3)
    assert model.predict(1, 32, 100.0) == pytest.approx(2 * true(1, 32), rel=0.02)
    for _ in range(200):
        for b, s in profiled:
            model.observe(b, s, 100.0, 2 * true(b, s))
    assert model.predict(2, 16, 100.0) == pytest.approx(2 * true(2, 16), rel=0.05)
    # Each profiled pair is corrected by the nearest pair that has run (the 1-token step and trees differ).
    shaped = LatencyModel([(1, s, 0.0, 0.1 * s) for s in (1, 2, 8, 32)])
    shaped.observe(1, 1, 0.0, 0.12)
    shaped.observe(1, 8, 0.0, 1.08)
    assert shaped.predict(1, 2, 0.0) == pytest.approx(0.2 * 1.2)
    assert shaped.predict(1, 32, 0.0) == pytest.approx(3.2 * 1.35)
    # Never below a known step that did no more work.
    cheap = LatencyModel([(1, 1, 0.0, 0.05), (1, 2, 0.0, 0.01), (8, 8, 0.0, 0.02)])
    assert cheap.predict(1, 4, 0.0) >= 0.05


def test_the_tree_shrinks_as_the_batch_grows(model):
    # A fixed cost per step plus a cost per token processed: big trees pay off only for small batches.
    latency = LatencyModel([(b, s, 64.0, 0.05 + 0.0005 * b * s) for b in (1, 8, 64) for s in (1, 4, 16, 64, 256)])
    dec = ProPDDecoder(model, prompt_tokens(model), tree_family(K, BUDGETS), TABLE, latency)
    slots = []
    for batch in (1, 4, 16, 64):
        slots.append(dec.widest[dec.choose(batch, 64.0)])
    assert slots == sorted(slots, reverse=True) and slots[0] >= 16 and slots[-1] == 1, slots


# ------------------------------------------------------------------------------------------------------------
# Lossless while switching


class FlipFlopLatency(LatencyModel):
    """Slots are free on one step and dear on the next: the chosen tree changes every step."""

    def __init__(self):
        super().__init__()
        self.cheap = True

    def observe(self, batch, slots, context, seconds):
        self.cheap = not self.cheap

    def predict(self, batch, slots, context):
        return 1.0 if self.cheap else float(batch * slots)


@pytest.mark.parametrize("batch", [1, 5])
def test_switching_trees_every_step_is_lossless(model, truth, batch):
    prompts, full = truth

    class OracleProPD(OracleGuessDecoder, ProPDDecoder):
        pass

    dec = OracleProPD(model, prompt_tokens(model), tree_family(K, BUDGETS), TABLE, FlipFlopLatency(), truth=full,
                      seed=batch, rebuild_every=4)
    got = dec.generate(prompts[:batch], MAX_NEW)
    assert [r.token_ids for r in got] == [t[:MAX_NEW] for t in full[:batch]]
    sizes = [slots for _, slots in dec.choices]
    assert 1 in sizes and max(sizes) > 16  # both plain steps and big trees ran


def test_propd_with_its_own_guesses_equals_plain_decoding(model):
    prompts = ragged_prompts(6, seed=11)
    eos = [5]
    expected = VanillaDecoder(model, eos_token_ids=eos).generate(prompts, MAX_NEW)
    dec = ProPDDecoder(model, prompt_tokens(model), tree_family(K, BUDGETS), TABLE, eos_token_ids=eos)
    got = dec.generate(prompts, MAX_NEW)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert len(dec.choices) == max(r.num_steps for r in got)


def test_an_empty_family_is_refused(model):
    with pytest.raises(ValueError, match="no tree set"):
        ProPDDecoder(model, prompt_tokens(model), lambda table: [], TABLE)
    assert TreeOption  # the family's element type is part of the module's interface
