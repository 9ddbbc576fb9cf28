"""The decode worker runs every torch op of its engine in one thread: the engine is built (model load, profile)
in the thread that then steps it. On CPU, a second thread running OpenMP regions makes libgomp stop spinning
between regions, which cost a step 1.2-1.9x (workers/actor.py); the thread is what is checked here."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from workers import actor


class FakeEngine:
    has_pending_prompts = False

    def __init__(self):
        self.built_in = threading.get_ident()
        self.stepped_in: set[int] = set()
        self.steps = 0

    @property
    def idle(self) -> bool:
        return self.steps >= 3

    def step(self) -> None:
        self.stepped_in.add(threading.get_ident())
        self.steps += 1


def make_worker():
    return actor.DecodeWorker({}, {}, group="g", index=0, config_hash="h")


def test_the_engine_is_built_and_stepped_in_one_thread_not_the_callers(monkeypatch):
    monkeypatch.setattr(actor, "ModelConfig", lambda **kw: kw)
    monkeypatch.setattr(actor, "DecodingConfig", lambda **kw: kw)
    monkeypatch.setattr(actor.DecodeEngine, "from_config", classmethod(lambda cls, *a, **kw: FakeEngine()))
    worker = make_worker()
    engine = worker.engine
    with worker._work:
        worker._work.notify()  # the loop steps while the engine is not idle
    for _ in range(200):
        if engine.steps >= 3:
            break
        threading.Event().wait(0.01)
    assert engine.steps == 3
    assert engine.stepped_in == {engine.built_in}
    assert engine.built_in != threading.get_ident()


def test_a_failure_to_build_the_engine_fails_the_constructor(monkeypatch):
    def broken(cls, *args, **kwargs):
        raise ValueError("no such model")

    monkeypatch.setattr(actor, "ModelConfig", lambda **kw: kw)
    monkeypatch.setattr(actor, "DecodingConfig", lambda **kw: kw)
    monkeypatch.setattr(actor.DecodeEngine, "from_config", classmethod(broken))
    with pytest.raises(ValueError, match="no such model"):
        make_worker()


def in_thread(fn):
    """fn() in a new thread (niceness is per thread on Linux); its result and the thread's niceness after."""
    import os

    out = []

    def run():
        result = fn()
        out.append((result, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def test_the_decode_thread_takes_the_drivers_niceness_and_says_so():
    import os

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert in_thread(lambda: actor.take_niceness(mine)) == (f"niceness {mine}, the driver's", mine)
    higher = min(mine + 3, 19)  # raising niceness needs no privilege
    said, now = in_thread(lambda: actor.take_niceness(higher))
    assert now == higher and said == f"niceness {higher}, the driver's (Ray started the worker at {mine})"
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the caller's thread is untouched


def test_a_refused_niceness_is_reported_with_what_to_do(monkeypatch):
    import os

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    said, now = in_thread(lambda: actor.take_niceness(mine - 1))
    assert now == mine and "refused (Operation not permitted)" in said and "RAY_worker_niceness" in said


def test_workers_take_the_drivers_niceness_or_0_under_a_submitted_job(monkeypatch):
    import os

    from jobs.pool import RAY_JOB_ENTRYPOINT_ENV, worker_niceness

    monkeypatch.delenv(RAY_JOB_ENTRYPOINT_ENV, raising=False)
    assert worker_niceness() == os.nice(0)
    monkeypatch.setenv(RAY_JOB_ENTRYPOINT_ENV, "{}")  # ray job submit's entrypoint runs at Ray's 15
    assert worker_niceness() == 0


class FinishedShard:
    """What DecodeEngine.add_shard returns, already done: one output per row."""

    def __init__(self, rows):
        from workers.engine import StepClock
        from workers.records import RowOutput

        self.done, self.error, self.occupancy = threading.Event(), None, None
        self.clock = StepClock(steps=3, wall_s=0.25, thread_cpu_s=0.2)  # its steps since the previous shard
        self.outputs = [RowOutput(id=row["id"], output_text=row["prompt"]) for row in rows]
        self.done.set()


def test_a_worker_reads_its_shard_and_publishes_its_part_or_says_why_it_cannot(monkeypatch, tmp_path):
    """Given where its shard lies (jobs.inputs.ShardRead) and a writer, the worker reads the rows itself and
    returns only the part's name, size and summary; an input changed since the plan, or an output it cannot
    publish to, comes back as the reason (the driver stops the job on it), never as a retryable failure."""
    from jobs.inputs import plan_shards, scan_input
    from jobs.output import PartWriter, read_output
    from tests.test_job import write_jsonl

    engine = FakeEngine()
    engine.add_shard = FinishedShard
    engine.batch = type("Batch", (), {"graph_stats": lambda self: None})()
    monkeypatch.setattr(actor, "ModelConfig", lambda **kw: kw)
    monkeypatch.setattr(actor, "DecodingConfig", lambda **kw: kw)
    monkeypatch.setattr(actor.DecodeEngine, "from_config", classmethod(lambda cls, *a, **kw: engine))
    worker = make_worker()
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"p{i}"} for i in "abcd"])
    shards = list(plan_shards(scan_input(str(src), shard_size=2)))
    writer = PartWriter(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    result = worker.process(shards[1].read, writer, shards[1].index)
    assert result["records"] is None and result["part"].summary["ids"] == ["c", "d"]
    assert result["clock"] == {"steps": 3, "wall_s": 0.25, "thread_cpu_s": 0.2}  # the driver's decode_loop
    assert read_output(tmp_path / "out", columns=["id", "output_text"]).to_pylist() == [
        {"id": "c", "output_text": "pc"}, {"id": "d", "output_text": "pd"}]
    kept = worker.process(shards[0].read, writer, shards[0].index, keep_records=True)
    assert [r["id"] for r in kept["rows"]] == ["a", "b"] and [r["id"] for r in kept["records"]] == ["a", "b"]

    # A writer for another node's disk (this actor restarted elsewhere since the driver looked): rows come back.
    monkeypatch.setattr(actor.DecodeWorker, "node_id", property(lambda self: "this-node"))
    elsewhere = worker.process(shards[0].read, dataclasses.replace(writer, node_id="driver-node"), 0)
    assert "part" not in elsewhere and [r["id"] for r in elsewhere["records"]] == ["a", "b"]
    assert len(list((tmp_path / "out").iterdir())) == 2  # the two parts above, no third

    write_jsonl(src, [{"id": i, "prompt": f"p{i}"} for i in "abxd"])  # the same bytes but one id
    changed = worker.process(shards[1].read, writer, 1)["input_error"]
    assert "changed while the job ran: shard 1's rows are not those planned" in changed
    write_jsonl(src, [{"id": i, "prompt": "a longer prompt"} for i in "abcd"])  # shard 1's bytes hold other lines
    assert "shard 1 no longer reads as planned" in worker.process(shards[1].read, writer, 1)["input_error"]
    write_jsonl(src, [{"id": i, "prompt": f"p{i}"} for i in "abcd"])  # as planned again
    (tmp_path / "file").write_text("")
    blocked = worker.process(shards[0].read, PartWriter(str(tmp_path / "file" / "out")), 0)
    assert blocked["output_error"].startswith("g/0 pid") and "cannot publish its part to" in blocked["output_error"]
