"""Graph-safe state, checked on a CPU (decoding/runners.CheckedReplayStep): every step of a recorded shape
must read the tensors its first step read, at the same addresses, shapes, strides and dtypes, as a CUDA graph's
replay would. Continuous batching, sampling, ProPD with its family rebuilt again and again, and prompt tokens
swapped mid-run all run under it; the graphs a long run holds stay within the cap."""

from __future__ import annotations

import gc

import pytest

from decoding import VanillaDecoder, default_tree_set
from decoding.propd import ProPDDecoder
from decoding.runners import StaleReplay
from decoding.slots import Request, SlotBatch
from decoding.tree import tree_set_buffers
from tests.test_adaptation import other_tokens
from tests.test_continuous import make_decoder, model, rows  # noqa: F401 - fixtures
from tests.test_fixed_step import run_joining
from tests.test_propd import BUDGETS, TABLE, FlipFlopLatency
from tests.test_sampling import K, prompts_for, untrained
from trees.builder import tree_family
from trees.paths import fixed_size_tree_set


@pytest.mark.parametrize("method", ["vanilla", "ppd", "propd"])
@pytest.mark.parametrize("sampled", [False, True])
def test_rows_joining_at_any_step_replay_what_they_recorded(model, rows, method, sampled):  # noqa: F811
    for offset in (0, 2, 5):
        got, want = run_joining(model, rows, method, sampled, offset, step_mode="checked_replay")
        assert got == dict(enumerate(want)), f"offset {offset}"


def test_a_tensor_rebound_between_steps_is_caught(model, rows):  # noqa: F811
    (p0, n0, s0, t0), (p1, n1, s1, t1), _ = rows[False]
    batch = SlotBatch(make_decoder("ppd", model, [t0, t1]), num_slots=2, step_mode="checked_replay")
    batch.add([Request(p0, n0, s0), Request(p1, n1, s1)])
    batch.step()
    batch.step()  # the same shape: replayed, and checked
    assert batch.graph_stats()["captures"] < 2 + 1
    batch.root = batch.root.clone()  # what a CUDA graph would not see: it reads the old root
    with pytest.raises(StaleReplay, match="recorded"):
        batch.step()


def test_a_prompt_table_replaced_rather_than_overwritten_is_caught(model, rows):  # noqa: F811
    (p0, n0, s0, t0), (p1, n1, s1, t1), _ = rows[False]
    decoder = make_decoder("ppd", model, [t0, t1])
    batch = SlotBatch(decoder, num_slots=2, step_mode="checked_replay")
    batch.add([Request(p0, n0, s0), Request(p1, n1, s1)])
    batch.step()
    batch.step()
    decoder.adopt_prompt_tokens(other_tokens(model, 3))  # in place: replays stay valid
    batch.step()
    decoder.prompt_table = decoder.prompt_table.clone()
    with pytest.raises(StaleReplay):
        for _ in range(3):
            batch.step()


def test_a_tree_set_held_by_a_record_keeps_its_buffers_however_many_sets_pass():
    held = tree_set_buffers(default_tree_set(K))
    address = held.stacked.attend.data_ptr()
    for nodes in range(1, 100):  # more sets than the recent-use cache keeps
        tree_set_buffers(fixed_size_tree_set(TABLE, nodes, K))
    gc.collect()
    again = tree_set_buffers(default_tree_set(K))
    assert again is held and again.stacked.attend.data_ptr() == address


class ChangingFamily:
    """A family builder whose sets change at every rebuild, cycling through families of a few budget lists (some
    sets shared between them), built once: a build this cheap never holds ProPD back from rebuilding."""

    def __init__(self):
        self.calls = 0
        variants = [BUDGETS, BUDGETS[:3], [1, 3, 7, 20], [1, 5, 9], BUDGETS[1:]]
        self.families = [list(tree_family(K, budgets)(TABLE)) for budgets in variants]

    def __call__(self, table):
        self.calls += 1
        return self.families[self.calls % len(self.families)]


class EveryTree(ProPDDecoder):
    """ProPD whose choice walks through its family, a set a step: every tree set meets every slot bucket."""

    walked = 0

    def choose(self, batch: int, context: float) -> int:
        self.walked += 1
        return self.walked % len(self.family)


def test_a_long_propd_run_with_forced_rebuilds_holds_at_most_the_cap(model):  # noqa: F811
    """2,000 steps of ProPD whose family is rebuilt every 8 steps (rebuild_drift below 0: always) and whose every
    set is run in turn, under checked_replay with a cap of 6 records (fewer than the shapes met): every replay
    checked, the records held
    never past the cap, and every row equal to plain decoding."""
    family = ChangingFamily()
    decoder = EveryTree(model, untrained(model), family, TABLE, FlipFlopLatency(), rebuild_every=8,
                        rebuild_drift=-1.0)
    batch = SlotBatch(decoder, num_slots=4, step_mode="checked_replay", max_shapes=6)
    prompts = prompts_for(1200, seed=5)
    limits = [3 + (7 * i) % 17 for i in range(len(prompts))]
    batch.add([Request(p, n, tag=i) for i, (p, n) in enumerate(zip(prompts, limits))])
    finished, steps, held = [], 0, []
    while not batch.idle and steps < 2000:
        finished += batch.step()
        steps += 1
        held.append(batch.graph_stats()["held"])
    stats = batch.graph_stats()
    assert steps == 2000 and family.calls >= 200  # rebuilt all along
    assert max(held) <= 6 and stats["evicted"] > 0 and stats["captures"] == stats["held"] + stats["evicted"]
    reference = VanillaDecoder(model).generate([prompts[req.tag] for req, _ in finished],
                                               [limits[req.tag] for req, _ in finished])
    assert [res.token_ids for _, res in finished] == [r.token_ids for r in reference]
    print(f"2000 ProPD steps, {family.calls} rebuilds: {stats}")  # the note's figure (pytest -s)


def test_a_rebuild_that_keeps_its_tree_sets_keeps_their_records(model):  # noqa: F811
    """A family rebuilt every 4 steps into the same sets captures no more than the same run never rebuilt: the
    records made before a rebuild serve after it (same tree hashes, the same buffers at the same addresses)."""
    family = list(tree_family(K, BUDGETS)(TABLE))
    runs = {}
    for rebuild_every in (4, 10**9):
        calls = []

        def same_family(table, calls=calls):
            calls.append(1)
            return family

        decoder = EveryTree(model, untrained(model), same_family, TABLE, FlipFlopLatency(),
                            rebuild_every=rebuild_every, rebuild_drift=-1.0)
        batch = SlotBatch(decoder, num_slots=2, step_mode="checked_replay")
        batch.add([Request(p, 6 + i % 5) for i, p in enumerate(prompts_for(60, seed=9))])
        batch.run()
        runs[rebuild_every] = (len(calls), batch.graph_stats())
    (rebuilds, rebuilt), (_, never) = runs[4], runs[10**9]
    assert rebuilds >= 20 + 1 and runs[10**9][0] == 1  # the constructor's build, then the rebuilds
    assert rebuilt["captures"] == never["captures"] and rebuilt["evicted"] == never["evicted"] == 0
