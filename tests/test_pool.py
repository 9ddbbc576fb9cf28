"""The shard pool on real Ray actors that die on purpose (no model): requeue, restarts, give-up."""

from __future__ import annotations

import pytest

from jobs.inputs import Shard
from jobs.pool import AllWorkersFailed, Worker, run_shards
from tests.scripted_worker import ScriptedWorker


def make_shards(rows: list[dict], shard_size: int) -> list[Shard]:
    """In-memory rows cut in order every ``shard_size`` rows (a job streams its input: jobs/inputs.iter_shards)."""
    return [Shard(i, rows[start:start + shard_size]) for i, start in enumerate(range(0, len(rows), shard_size))]


def _pool(ray, tmp_path, n: int, *, max_restarts: int, **behaviour) -> list[Worker]:
    cls = ray.remote(num_cpus=0.5, max_restarts=max_restarts, max_task_retries=0)(ScriptedWorker)
    return [Worker(cls.remote(f"w{i}", str(tmp_path), **behaviour), "g", i) for i in range(n)]


def _run(workers, rows, shard_size=2, max_attempts=3, startup_timeout_s=600.0, prefetch=0):
    ready = []
    results = [(shard, result["records"], w) for shard, result, w in run_shards(
        workers, make_shards(rows, shard_size), max_attempts=max_attempts, config_hash="c",
        on_ready=lambda w: ready.append(w.info["worker"]), startup_timeout_s=startup_timeout_s, prefetch=prefetch)]
    return results, ready


ROWS = [{"id": f"r{i:02d}", "prompt": "x"} for i in range(10)]


def test_a_shard_whose_worker_dies_runs_again_elsewhere(ray_local, tmp_path):
    workers = _pool(ray_local, tmp_path, 2, max_restarts=1, die_once={"r05"})
    results, ready = _run(workers, ROWS)
    records = [r for _, recs, _ in results for r in recs]
    assert sorted(r["id"] for r in records) == [r["id"] for r in ROWS]  # every row exactly once
    assert all(r["error"] is None for r in records)
    ((retried, retried_records, _),) = [result for result in results if result[0].attempts]
    assert retried.ids == ["r04", "r05"] and retried.attempts == 1
    # It ran again in another process: the other worker, or the dead one restarted by Ray.
    (died,) = retried.deaths
    assert {r["worker"] for r in retried_records}.isdisjoint({died.split(":")[0]})
    assert len(ready) >= 2


def test_a_dead_worker_hands_back_every_shard_it_held(ray_local, tmp_path):
    """With a shard fetched ahead, the worker holds two; it dies on the first, and the one it held next (not
    begun) goes back to the queue too, counted as that worker's: every row is still written exactly once."""
    (worker,) = _pool(ray_local, tmp_path, 1, max_restarts=1, die_once={"r01"})
    results, ready = _run([worker], ROWS, prefetch=1)
    records = [r for _, recs, _ in results for r in recs]
    assert sorted(r["id"] for r in records) == [r["id"] for r in ROWS] and all(r["error"] is None for r in records)
    attempts = {shard.index: shard.attempts for shard, _, _ in results}
    assert attempts == {0: 1, 1: 1, 2: 0, 3: 0, 4: 0}  # shards 0 and 1 were held when it died
    assert len(ready) == 2  # the first start and the restart


def test_a_shard_that_kills_every_worker_is_given_up_with_a_row_error(ray_local, tmp_path):
    workers = _pool(ray_local, tmp_path, 2, max_restarts=3, die_always={"r03"})
    results, _ = _run(workers, ROWS, max_attempts=2)
    records = {r["id"]: r for _, recs, _ in results for r in recs}
    assert sorted(records) == [r["id"] for r in ROWS]
    for row_id in ("r02", "r03"):
        assert records[row_id]["error"]["code"] == "worker_died"
        assert "failed on 2 workers" in records[row_id]["error"]["message"]
    assert all(r["error"] is None for i, r in records.items() if i not in ("r02", "r03"))


def test_when_every_worker_is_gone_the_job_fails_clearly(ray_local, tmp_path):
    workers = _pool(ray_local, tmp_path, 2, max_restarts=0, die_always={"r00", "r02"})
    with pytest.raises(AllWorkersFailed, match="every worker has died"):
        _run(workers, ROWS)
    broken = _pool(ray_local, tmp_path, 1, max_restarts=0, fail_init=True)
    with pytest.raises(AllWorkersFailed, match="cannot load its model"):
        _run(broken, ROWS)


def test_waiting_for_every_worker_gives_each_a_shard(ray_local, tmp_path):
    workers = _pool(ray_local, tmp_path, 2, max_restarts=0)
    results = list(run_shards(workers, make_shards(ROWS, 5), max_attempts=1, config_hash="c", on_ready=lambda w: None,
                              startup_timeout_s=600.0, wait_for_all=True))
    assert sorted(w.index for _, _, w in results) == [0, 1]  # two shards, one each
