"""Every row exactly once when the workers publish their own parts (jobs/job_output.py): a worker killed after
publishing and before reporting, one shard published twice, a driver killed between a worker's publish and
its index. Scripted workers, no model."""

from __future__ import annotations

import pytest

from jobs.config import build_config
from jobs.inputs import iter_shards, scan_input
from jobs.job_output import JobOutput
from jobs.output import is_index, parts, read_output, read_part_summary
from jobs.pool import Worker, run_shards
from tests.scripted_worker import ScriptedWorker
from tests.test_job import write_jsonl
from workers.records import RowOutput

ROW_IDS = [f"r{i:02d}" for i in range(10)]


def _job(tmp_path, shard_size: int = 2):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "x"} for i in ROW_IDS])
    cfg = build_config(None, {"input": str(src), "output": str(tmp_path / "out"), "shard_size": shard_size})
    return cfg, scan_input(str(src), shard_size)


def _ids_and_workers(output: JobOutput) -> list[tuple[str, str]]:
    return [(r["id"], r["worker"]) for r in read_output(output.location, columns=["id", "worker"]).to_pylist()]


def test_a_worker_killed_after_publishing_its_part_costs_only_time(ray_local, tmp_path):
    """The part it published and never reported is found at the run's last scan, and the shard's second part
    (the retry's, which the driver accepted) is the one kept: every row once."""
    cfg, plan = _job(tmp_path)
    output = JobOutput(cfg)
    assert not output.open(plan).done.any()
    cls = ray_local.remote(num_cpus=0.5, max_restarts=1, max_task_retries=0)(ScriptedWorker)
    workers = [Worker(cls.remote(f"w{i}", str(tmp_path), die_after_publishing={"r05"}), "g", i) for i in range(2)]
    accepted = {}
    for shard, result, _ in run_shards(
            workers, iter_shards(plan), max_attempts=3, config_hash="c", on_ready=lambda w: None,
            startup_timeout_s=600.0, submit=lambda w, s: w.handle.process.remote(s.rows, output.writer, s.index)):
        assert result["records"] is None  # the rows stayed with the worker: only the part's summary came back
        accepted[shard.index] = (output.take(shard.index, result).name, shard.attempts)
    output.flush()
    assert accepted[2][1] == 1 and len(parts(output.location)) == 6  # shard 2 ran twice: two parts of it
    final = output.final_scan(plan)
    assert final.done.all() and final.duplicates == 1
    assert sorted(p.name for p in parts(output.location)) == sorted(name for name, _ in accepted.values())
    assert [i for i, _ in _ids_and_workers(output)] == ROW_IDS


def test_a_shard_published_twice_keeps_one_part_however_the_scan_meets_them(tmp_path):
    """Two workers finished the same shard: the driver accepted one part (it is kept), or none (then the first
    by name is kept, on every scan alike); a part holding only some of the other's rows keeps the rest."""
    cfg, plan = _job(tmp_path)
    output = JobOutput(cfg)
    output.open(plan)
    rows = [RowOutput(id="r00", worker="slow").to_dict(), RowOutput(id="r01", worker="slow").to_dict()]
    first = output.writer.write(0, rows)  # by a worker presumed dead, never reported
    second = output.write(0, [{**r, "worker": "retry"} for r in rows])  # the retry's, accepted
    output.flush()
    look = output.look(plan)  # read-only: counted once, nothing changed
    assert look.done.tolist()[:2] == [True, True] and look.rows == 2 and len(parts(output.location)) == 2
    assert output.final_scan(plan).duplicates == 1
    assert [p.name for p in parts(output.location)] == [second.name]
    assert first.name != second.name and _ids_and_workers(output) == [("r00", "retry"), ("r01", "retry")]

    # Neither accepted (a driver killed before both reports): the first by name is kept, on every scan.
    for index in [f for f in output.location.files() if is_index(f.name)]:
        index.delete()
    names = sorted([second.name, output.writer.write(0, [{**r, "worker": "other"} for r in rows]).name])
    assert output.look(plan).rows == 2
    output.final_scan(plan)
    assert [p.name for p in parts(output.location)] == names[:1]

    # Shard 1's rows, one part holding r02 (accepted), an unreported one holding r02 and r03: r03 is kept.
    output.write(1, [RowOutput(id="r02", worker="a").to_dict()])
    output.flush()
    output.writer.write(1, [RowOutput(id="r02", worker="b").to_dict(), RowOutput(id="r03", worker="b").to_dict()])
    final = output.final_scan(plan)
    assert final.done.tolist()[:4] == [True] * 4 and final.duplicates == 1 and final.rows == 4
    assert [(i, w) for i, w in _ids_and_workers(output) if i in ("r02", "r03")] == [("r02", "a"), ("r03", "b")]


def test_a_driver_killed_between_a_workers_publish_and_the_index(tmp_path, monkeypatch):
    """Shards 0-3 published by a worker; the driver accepted and indexed 0 and 1, accepted 2 and died before
    its index flush, and never heard of 3. The next run skips all four, reading two footers, and decodes shard
    4 only: every row once."""
    import jobs.resume

    cfg, plan = _job(tmp_path)
    output = JobOutput(cfg)
    output.open(plan)
    worker = ScriptedWorker("w0", str(tmp_path))
    shards = list(iter_shards(plan))
    results = [worker.process(s.rows, output.writer, s.index) for s in shards[:4]]
    for shard, result in zip(shards[:2], results):
        output.take(shard.index, result)
    output.flush()
    output.take(2, results[2])  # the driver is killed here: its index holds parts 0 and 1 only

    footers = []
    real = jobs.resume.read_part_summary
    monkeypatch.setattr(jobs.resume, "read_part_summary", lambda part: footers.append(part.name) or real(part))
    again = JobOutput(cfg)
    written = again.open(plan)
    assert written.done.tolist() == [True] * 8 + [False] * 2
    assert sorted(footers) == sorted(r["part"].name for r in results[2:])
    (rest,) = iter_shards(plan, written.done)
    again.take(rest.index, worker.process(rest.rows, again.writer, rest.index))
    again.flush()
    assert again.final_scan(plan).done.all()
    assert [i for i, _ in _ids_and_workers(again)] == ROW_IDS
    assert {read_part_summary(p)["writer"] for p in parts(again.location)} == {results[0]["part"].summary["writer"]}


@pytest.mark.parametrize("node, expected", [("driver-node", "writes its own parts (on the driver's node)"),
                                            ("other-node", "returns its rows")])
def test_a_local_output_is_written_by_the_workers_on_the_drivers_node_only(tmp_path, node, expected):
    cfg, _ = _job(tmp_path)
    writer, why = JobOutput(cfg).writer_for(node, "driver-node")
    assert why.startswith(expected) and (writer is None) == (node == "other-node")
    if writer is not None:
        assert writer.where == str(tmp_path / "out")  # absolute: a worker's working directory is its own
        assert writer.node_id == "driver-node"  # a worker restarted on another node will not write with it
