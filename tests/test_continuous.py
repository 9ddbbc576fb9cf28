"""Continuous batching (decoding/slots.py): a finished row's slot is refilled at the next step, and a row's tokens
do not depend on which rows share its steps or on when it joined.

Tiny random models in float64. Rows join a batch already in flight at every step offset, greedy and sampled,
for plain decoding, PPD, ProPD (its tree switched every step) and pruned PPD. Guesses come from an oracle that
knows each row's true continuation (at random ranks, sometimes missing), so trees accept deep paths and the
rows' depth states differ when a newcomer arrives. Each row must equal the naive reference of that row alone.
"""

from __future__ import annotations

import pytest
import torch

from decoding import PPDDecoder, SamplingParams, VanillaDecoder, default_tree_set, reference_sample
from decoding.propd import ProPDDecoder
from decoding.sampling import GREEDY
from decoding.slot_cache import CAPACITY_BUCKET
from decoding.slots import Request, SlotBatch
from tests.helpers_models import make_tiny_llama
from tests.test_propd import BUDGETS, TABLE, FlipFlopLatency
from tests.test_pruning import LAYERS, random_head
from tests.test_sampling import VOCAB, K, prompts_for, untrained
from trees.builder import tree_family

LONG, SHORT, LATE = 14, 6, 4  # max_new_tokens of the row in flight, the newcomer, and a row queued behind it


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=LAYERS, seed=3)


class OracleGuesses:
    """Mixed into a decoder: guesses hold each row's true continuation (``truth[row id]``) at random ranks, or
    miss it. Row ids are given in admission order, so the test knows them."""

    truth: list[list[int]]
    g: torch.Generator

    def finish_step(self, plan, report):
        """Rewrites the surviving rows' guesses (slots 0..A-1 of [slots, k, top_k]; the model's are filler), on the
        device and the host, before the decoder learns from them."""
        rows, guesses = report.after, report.guesses
        top_k = guesses.shape[2]
        for b, (row, result) in enumerate(zip(rows.ids, rows.results)):
            done = len(result.token_ids)
            for d in range(guesses.shape[1]):
                true = self.truth[row][done + d]
                filler = [t for t in guesses[b, d].tolist() if t != true]
                if torch.rand(1, generator=self.g).item() >= 0.2:
                    filler.insert(int(torch.randint(0, 3, (1,), generator=self.g)), true)
                pad = [t for t in range(VOCAB) if t not in filler]
                guesses[b, d] = torch.tensor((filler + pad)[:top_k])
                rows.guesses[b][d * top_k : (d + 1) * top_k] = guesses[b, d].tolist()
        super().finish_step(plan, report)


def make_decoder(method: str, model, truth):
    build = {
        "vanilla": lambda cls: cls(model),
        "ppd": lambda cls: cls(model, untrained(model), tree_set=default_tree_set(K)),
        "propd": lambda cls: cls(model, untrained(model), tree_family(K, BUDGETS), TABLE, FlipFlopLatency()),
        "pruned": lambda cls: cls(model, untrained(model), tree_set=default_tree_set(K),
                                  prune_head=random_head(model, 4)),
    }[method]
    base = {"vanilla": VanillaDecoder, "propd": ProPDDecoder}.get(method, PPDDecoder)
    if method == "vanilla":
        return build(base)
    decoder = build(type(f"Oracle{base.__name__}", (OracleGuesses, base), {}))
    decoder.truth, decoder.g = truth, torch.Generator().manual_seed(11)
    return decoder


@pytest.fixture(scope="module")
def rows(model):
    """Three rows (in flight, newcomer, queued), greedy and sampled: (prompt, limit, params, reference tokens)."""
    prompts = prompts_for(3, seed=21)
    out = {}
    for sampled in (False, True):
        params = [SamplingParams(0.8, top_p=0.9, seed=s) if sampled else GREEDY for s in (1, 2, 3)]
        out[sampled] = [(p, n, s, reference_sample(model, p, n + K + 1, s).token_ids)
                        for p, n, s in zip(prompts, (LONG, SHORT, LATE), params)]
    return out


@pytest.mark.parametrize("method", ["vanilla", "ppd", "propd", "pruned"])
@pytest.mark.parametrize("sampled", [False, True])
def test_rows_joining_at_every_step_offset_equal_each_row_decoded_alone(model, rows, method, sampled):
    (p0, n0, s0, t0), (p1, n1, s1, t1), (p2, n2, s2, t2) = rows[sampled]
    truth = [t0, t1, t2]  # by row id: the order rows take slots
    for offset in range(LONG):
        decoder = make_decoder(method, model, truth)
        batch = SlotBatch(decoder, num_slots=2)
        batch.add(Request(p0, n0, s0, tag=0))
        finished = []
        for _ in range(offset):
            finished += batch.step()
        batch.add([Request(p1, n1, s1, tag=1), Request(p2, n2, s2, tag=2)])  # row 2 waits for a free slot
        finished += batch.run()
        got = {req.tag: res.token_ids for req, res in finished}
        assert got == {0: t0[:n0], 1: t1[:n1], 2: t2[:n2]}, f"offset {offset}"


def test_a_finished_rows_slot_is_refilled_at_the_next_step(model):
    """Two slots, rows of 1, 4 and 3 tokens (plain decoding: one token a step). Continuous: the third row takes
    the first's slot at step 2, and every step runs both slots. Static: it waits for both rows to finish."""
    prompts = prompts_for(3, seed=5)
    busy = {}
    for refill in ("continuous", "when_empty"):
        batch = SlotBatch(VanillaDecoder(model), num_slots=2, refill=refill)
        batch.add([Request(p, n) for p, n in zip(prompts, (1, 4, 3))])
        busy[refill] = []
        while not batch.idle:
            batch.step()
            busy[refill].append(batch.occupancy.busy - sum(busy[refill]))
        occ = batch.occupancy
        if refill == "continuous":
            assert busy[refill] == [2, 2, 2, 2]
            assert (occ.steps, occ.steps_waiting, occ.busy_waiting) == (4, 2, 4) and occ.while_waiting == 1.0
        else:
            assert busy[refill] == [2, 1, 1, 1, 1, 1, 1]  # the third row runs after the second is done
            # Steps 1-5 began with it waiting (it takes a slot at the start of step 5).
            assert (occ.steps, occ.steps_waiting, occ.busy_waiting) == (7, 5, 6) and occ.while_waiting == 6 / 10


def test_slot_kv_is_written_in_place_and_grown_by_doubling(model):
    """Rows come and go over a persistent batch without its KV being reallocated; a row longer than the
    capacity grows it (once, doubling it) and still decodes exactly."""
    decoder = make_decoder("vanilla", model, [])
    batch = SlotBatch(decoder, num_slots=2)
    prompts = prompts_for(4, seed=8)
    batch.add([Request(p, n) for p, n in zip(prompts, (3, 7, 2, 5))])
    batch.step()
    keys = [layer.keys.data_ptr() for layer in batch.cache.layers]
    done = batch.run()
    assert len(done) == 4 and [layer.keys.data_ptr() for layer in batch.cache.layers] == keys
    assert batch.cache.capacity == CAPACITY_BUCKET
    long_prompt = torch.randint(0, VOCAB, (CAPACITY_BUCKET - 3,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(1.0, seed=4)
    batch.add([Request(long_prompt, 6, params), Request(prompts[0], 3)])
    got = {tuple(req.prompt): res.token_ids for req, res in batch.run()}
    assert batch.cache.capacity == 2 * CAPACITY_BUCKET
    assert got[tuple(long_prompt)] == reference_sample(model, long_prompt, 6, params).token_ids
    assert got[tuple(prompts[0])] == reference_sample(model, prompts[0], 3, GREEDY).token_ids


def test_rows_with_no_new_tokens_finish_at_admission(model):
    batch = SlotBatch(VanillaDecoder(model), num_slots=1)
    batch.add([Request([1, 2], 0, tag="empty"), Request([3], 2, tag="two")])
    finished = batch.step()  # the empty row takes no slot and no step
    assert [(req.tag, res.token_ids, res.num_steps) for req, res in finished] == [("empty", [], 0)]
    assert batch.busy == 1 and [req.tag for req, _ in batch.run()] == ["two"]


def test_the_jobs_occupancy_pools_every_shards_slot_counters():
    """summary.json's occupancy: busy slot-steps over offered slot-steps, summed over shards and workers of any
    slot count (steps that began with no row waiting do not count)."""
    from jobs.progress import Progress, device_table

    progress = Progress(3, 0, interval_s=1e9)
    def part(row_id):  # a part's summary (jobs/output.part_summary): one row, 3 tokens in 3 steps
        return {"ids": [row_id], "rows": 1, "failed": 0, "retry": [],
                "tally": {"output_tokens": 3, "steps": 3, "batch_fallback": 0}}

    progress.add_part(part("a"), group="g", device="cpu: X", seconds=1.0,
                      slots={"slots": 4, "steps": 10, "busy": 30, "steps_waiting": 5, "busy_waiting": 20})
    progress.add_part(part("b"), group="g", device="cpu: X", seconds=1.0,
                      slots={"slots": 2, "steps": 8, "busy": 9, "steps_waiting": 5, "busy_waiting": 6})
    progress.add_part(part("c"), group="g", device="gpu: Y", seconds=1.0, slots=None)
    assert progress.total.occupancy == (20 + 6) / (5 * 4 + 5 * 2)
    by_device = {device: {"workers": 1, **tally.as_dict()} for device, tally in progress.devices.items()}
    assert by_device["cpu: X"]["slot_occupancy"] == progress.total.occupancy
    assert by_device["gpu: Y"]["slot_occupancy"] is None
    header, cpu, gpu = device_table(by_device).splitlines()
    assert "slot occupancy" in header and cpu.split()[-2] == "0.867" and gpu.split()[-2] == "-"
    assert "slots 87% busy" in progress.line()


def test_engine_shards_share_the_slots_and_an_empty_shard_closes_at_once(tiny_model_dir):
    """A worker's engine takes a shard while another is decoding: both share the slots, each closes when its own
    rows are done, with the rows static batching gives; a shard with nothing to decode closes at once; the
    slot counters handed out with the shards add up to the engine's."""
    from workers.configs import DecodingConfig, ModelConfig
    from workers.engine import DecodeEngine
    from workers.models import load_model

    loaded = load_model(ModelConfig(model=str(tiny_model_dir)))
    first_rows = [{"id": "a", "prompt": "The sea is"}, {"id": "b", "prompt": "1, 2, 3,"}, {"id": "c", "prompt": "Once"}]
    second_rows = [{"id": "d", "prompt": "x y z"}]
    engine = DecodeEngine(loaded, DecodingConfig(method="vanilla", max_new_tokens=6), batch_size=2)
    first = engine.add_shard(first_rows)
    engine.step()
    empty = engine.add_shard([{"id": "e"}])  # neither prompt nor messages: a row error, nothing to decode
    assert empty.done.is_set() and empty.outputs[0].error is not None
    second = engine.add_shard(second_rows)
    while not (first.done.is_set() and second.done.is_set()):
        engine.step()
    static = DecodeEngine(loaded, DecodingConfig(method="vanilla", max_new_tokens=6, batching="static"), batch_size=2)
    for job, rows in ((first, first_rows), (second, second_rows)):
        assert [o.id for o in job.outputs] == [r["id"] for r in rows] and all(o.error is None for o in job.outputs)
        assert [o.output_token_ids for o in job.outputs] == [o.output_token_ids for o in static.run_rows(rows)]
    assert sum(job.occupancy["steps"] for job in (first, empty, second)) == engine.batch.occupancy.steps


def test_the_progress_line_counts_rows_as_they_complete_and_never_twice(tiny_model_dir):
    """A shard's completions count as they finish (the engine's open_progress, the driver's in_flight), and once
    the shard is written they count from its part's summary alone."""
    import pyarrow as pa

    from jobs.output import OUTPUT_SCHEMA, part_summary
    from jobs.progress import Progress
    from workers.configs import DecodingConfig, ModelConfig
    from workers.engine import DecodeEngine
    from workers.models import load_model

    engine = DecodeEngine(load_model(ModelConfig(model=str(tiny_model_dir))),
                          DecodingConfig(method="vanilla", max_new_tokens=6), batch_size=1)
    rows = [{"id": "a", "prompt": "The sea is"}, {"id": "b", "prompt": "1, 2, 3,"}, {"id": "c", "prompt": "Once"}]
    job = engine.add_shard(rows)
    progress = Progress(3, 0, interval_s=1e9)
    assert engine.open_progress() == {"a": (0, 0)}
    while job.outputs[0].num_output_tokens == 0 or job.remaining == 3:  # the first row done, not the others
        engine.step()
    done, tokens = engine.open_progress()["a"]
    assert done == 3 - job.remaining >= 1 and tokens == sum(o.num_output_tokens for o in job.outputs)
    progress.in_flight(engine.open_progress())
    assert progress.line().startswith(f"rows {done}/3")
    while not job.done.is_set():
        engine.step()
    assert engine.open_progress() == {}
    records = pa.Table.from_pylist([o.to_dict() for o in job.outputs], schema=OUTPUT_SCHEMA)
    progress.add_part(part_summary(records), group="g", device="cpu", seconds=1.0)
    progress.in_flight({"a": (1, 5)})  # a late answer about the shard just written
    assert progress.line().startswith("rows 3/3") and progress.open == {}

    sampled = {"temperature": 1.0, "n": 3}  # three completions a row: a row is done when all three are
    job = engine.add_shard([{"id": "s", "prompt": "The sea is", "sampling_params": sampled},
                            {"id": "t", "prompt": "Once", "sampling_params": sampled}])
    seen = set()
    while not job.done.is_set():
        rows_done, tokens = engine.open_progress()["s"]
        finished = [o for o in job.outputs if o.finished_at is not None]
        assert rows_done == sum(all(o.finished_at for o in job.outputs if o.id == i) for i in ("s", "t")) <= 2
        assert tokens == sum(o.num_output_tokens for o in finished)
        seen.add(rows_done)
        engine.step()
    assert seen >= {0, 1}  # the first row finished before the second (one slot)


def test_the_driver_asks_for_open_progress_only_ahead_of_a_line(monkeypatch):
    """Each ask runs on the worker beside its decode loop: the driver sends one only when the next line is due
    within its lead, one at a time per worker, and feeds the answers that have come back to the line."""
    import ray

    from jobs.pool import Worker
    from jobs.progress import Progress
    from jobs.run import ask_open_progress

    now = [100.0]
    monkeypatch.setattr("jobs.progress.time.perf_counter", lambda: now[0])
    answered: set[str] = set()
    monkeypatch.setattr(ray, "wait", lambda refs, timeout: ([r for r in refs if r in answered], []))
    monkeypatch.setattr(ray, "get", lambda ref: {ref.split("#")[0]: (2, 9)})

    class Handle:
        def __init__(self, name: str):
            self.name, self.asks = name, 0
            self.open_progress = self

        def remote(self) -> str:
            self.asks += 1
            return f"{self.name}#{self.asks}"

    workers = [Worker(Handle("a"), "g", 0, joined=True), Worker(Handle("b"), "g", 1, joined=False)]
    progress, asked = Progress(4, 0, interval_s=10.0), {}
    progress.show(force=True)  # a line at t=100: the next is due at 110
    now[0] = 105.0
    assert not progress.due(ahead_s=2.0)
    ask_open_progress(workers, asked, progress, send=progress.due(ahead_s=2.0))
    assert workers[0].handle.asks == 0 and asked == {}
    now[0] = 108.5
    ask_open_progress(workers, asked, progress, send=progress.due(ahead_s=2.0))
    ask_open_progress(workers, asked, progress, send=True)  # still in flight: not asked again
    assert (workers[0].handle.asks, workers[1].handle.asks) == (1, 0)  # a worker not in the pool is not asked
    answered.add("a#1")
    ask_open_progress(workers, asked, progress, send=False)  # the answer is taken, no new ask
    assert progress.open == {"a": (2, 9)} and asked == {} and workers[0].handle.asks == 1
    now[0] = 110.0
    assert progress.due() and progress.line().startswith("rows 2/4")
