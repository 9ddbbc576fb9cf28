"""The job on a simulated heterogeneous cluster (`ray.cluster_utils.Cluster`): two fake nodes, each with its
own custom accelerator resource, and a worker group per node planning with that device's latency profile.

Covered: every row exactly once; trees differ where profiles differ; a driver killed mid-job and run
again gives the uninterrupted run's output; a worker killed mid-shard costs nothing but time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from jobs.output import parts as output_parts
from jobs.output import read_json, read_output, read_part_summary
from jobs.run import main
from jobs.storage import resolve
from tests.test_job import BAD_ROWS, write_jsonl

REPO = Path(__file__).resolve().parents[1]
# The output of a row, as opposed to how it was produced (steps and tau depend on the worker's tree).
RESULT_COLUMNS = ["id", "output_token_ids", "output_text", "num_output_tokens", "finish_reason", "error"]


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Two nodes, started after the loopback S3's credentials are in the environment: their workers read and
    write the bucket themselves, with the store's standard environment, as a real cluster's nodes do."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"fast_accel": 1},
                                                      "include_dashboard": False})
    c.add_node(num_cpus=1, resources={"slow_accel": 1})
    ray.init(address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _profile(path: Path, model_hash: str, seconds_per_slot: float, base: float) -> Path:
    """A made-up latency profile: `base` + `seconds_per_slot` x slots, at batch 1 and 2."""
    import torch

    from profiling.device import identify
    from profiling.latency import DEFAULT_SLOTS, LatencyPoint, LatencyProfile

    points = [LatencyPoint(batch=b, slots=s, seconds=b * (base + seconds_per_slot * s), repeats=1)
              for b in (1, 2) for s in DEFAULT_SLOTS]
    profile = LatencyProfile(device=identify(torch.device("cpu"), torch.float32), model_hash=model_hash, k=3,
                             ensemble=1, context_len=256, points=points, profile_seconds=0.0,
                             measured_at=datetime.now(UTC).isoformat())
    path.write_text(profile.model_dump_json())
    return path


@pytest.fixture(scope="module")
def job_files(tiny_model_dir, tmp_path_factory):
    """A trained-style artifact for the tiny model, one profile per simulated device, the input, and a config
    with one worker group per node."""
    from tests.helpers_models import save_trained_artifact
    from workers.configs import ModelConfig
    from workers.models import load_model

    tmp = tmp_path_factory.mktemp("cluster-job")
    loaded = load_model(ModelConfig(model=str(tiny_model_dir)))
    artifact = save_trained_artifact(loaded, tmp / "prompts", model_hash=loaded.content_hash)
    fast = _profile(tmp / "fast.json", loaded.content_hash, seconds_per_slot=1e-5, base=0.01)  # slots ~free
    slow = _profile(tmp / "slow.json", loaded.content_hash, seconds_per_slot=0.01, base=0.0)  # pay per slot
    good = [{"id": f"g{i:02d}", "prompt": f"{i} {i + 1} {i + 2}"} for i in range(14)]
    src = write_jsonl(tmp / "in.jsonl", good + BAD_ROWS)
    config = {
        "input": str(src),
        "shard_size": 2,
        "wait_for_workers": True,  # both devices get work, however their start-ups race
        "model": {"model": str(tiny_model_dir)},
        "decoding": {"max_new_tokens": 16, "prompts": str(artifact)},
        "workers": [
            {"name": "fast", "num_cpus": 1, "resources": {"fast_accel": 1}, "batch_size": 2,
             "latency_profile": str(fast)},
            {"name": "slow", "num_cpus": 1, "resources": {"slow_accel": 1}, "batch_size": 2,
             "latency_profile": str(slow)},
        ],
    }
    cfg_path = tmp / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    return {"config": cfg_path, "rows": good + BAD_ROWS, "tmp": tmp}


@pytest.fixture(scope="module")
def uninterrupted(cluster, job_files):
    out = job_files["tmp"] / "uninterrupted"
    assert main(["--config", str(job_files["config"]), "--output", str(out)]) == 0
    return out


def test_every_row_once_and_each_device_its_own_tree(uninterrupted, job_files):
    table = read_output(uninterrupted).to_pylist()
    assert [r["id"] for r in table] == sorted(r["id"] for r in job_files["rows"])
    summary = json.loads((uninterrupted / "summary.json").read_text())
    workers = {w["group"]: w for w in summary["workers"]}
    assert set(workers) == {"fast", "slow"}
    # A local output: the worker on the driver's node (the head) publishes its own parts; the other node's worker
    # returns its rows, which the driver writes (a local path there would be another disk).
    assert workers["fast"]["output"] == "writes its own parts (on the driver's node)"
    assert workers["slow"]["output"].startswith("returns its rows, which the driver writes")
    assert workers["fast"]["input"] == "reads its own shards"
    assert workers["slow"]["input"].startswith("gets its rows from the driver")
    # Cheap slots buy a big tree; slots paid one by one make plain decoding (a 1-slot tree) the fastest.
    assert workers["fast"]["tree_slots"] > 50 and workers["slow"]["tree_slots"] == 1
    assert workers["fast"]["tree_hash"] != workers["slow"]["tree_hash"]
    decoded = [r for r in table if r["error"] is None]
    assert {r["worker_group"] for r in decoded} == {"fast", "slow"}  # both pulled work
    for r in decoded:
        assert r["tree_hash"] == workers[r["worker_group"]]["tree_hash"]
    assert all(r["num_steps"] == r["num_output_tokens"] for r in decoded if r["worker_group"] == "slow")
    assert sum(summary["by_device"][d]["rows"] for d in summary["by_device"]) == len(table)


def test_outputs_do_not_depend_on_the_worker(uninterrupted, job_files, tiny_model_dir):
    """Every decoded row equals plain greedy decoding of that row alone."""
    from workers.configs import DecodingConfig, ModelConfig
    from workers.engine import DecodeEngine
    from workers.models import load_model

    engine = DecodeEngine(load_model(ModelConfig(model=str(tiny_model_dir))),
                          DecodingConfig(method="vanilla", max_new_tokens=16))
    table = {r["id"]: r for r in read_output(uninterrupted).to_pylist()}
    for row in job_files["rows"]:
        (reference,) = engine.run_rows([row])
        assert table[row["id"]]["output_token_ids"] == reference.output_token_ids, row["id"]


def _driver(config: Path, out: Path | str, address: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address}
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "run.py"), "--config", str(config), "--output",
                             str(out), "--progress-interval-s", "1", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_parts(out: Path | str, at_least: int, proc: subprocess.Popen, timeout_s: float = 180) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parts = len(output_parts(resolve(out))) if resolve(out).exists() else 0
        if parts >= at_least:
            return parts
        if proc.poll() is not None:
            pytest.fail(f"the driver ended before writing {at_least} parts:\n{proc.stdout.read()}")
        time.sleep(0.05)
    pytest.fail("timed out waiting for the driver to write parts")


def _results(out: Path | str) -> list[dict]:
    return read_output(out, columns=RESULT_COLUMNS).to_pylist()


def test_a_killed_driver_run_again_gives_the_uninterrupted_output(cluster, job_files, uninterrupted):
    out = job_files["tmp"] / "killed-driver"
    proc = _driver(job_files["config"], out, cluster.address)
    written = _wait_for_parts(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert written < 10  # 10 shards in all: the kill came mid-job
    assert main(["--config", str(job_files["config"]), "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_skipped"] >= 2 * written and summary["rows"] == len(job_files["rows"])
    assert _results(out) == _results(uninterrupted)


def test_a_job_in_object_storage_killed_and_run_again_gives_the_local_output(cluster, job_files, uninterrupted,
                                                                           s3_server):
    """Input from a bucket, parts to a bucket (moto's S3 server), the driver killed mid-job and run again: every
    row exactly once, the same as the uninterrupted run on local disk; no credential in what it writes."""
    src, out = "s3://jobs-in/cluster/in.jsonl", "s3://jobs-out/killed-driver"
    resolve(src).write_bytes_atomically((job_files["tmp"] / "in.jsonl").read_bytes())
    proc = _driver(job_files["config"], out, cluster.address, "--input", src)
    written = _wait_for_parts(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    printed, _ = proc.communicate()
    assert written < 10  # 10 shards in all: the kill came mid-job
    assert main(["--config", str(job_files["config"]), "--input", src, "--output", out]) == 0
    summary = read_json(resolve(out).child("summary.json"))
    # Both nodes' workers published their own parts to the bucket; neither driver wrote one.
    assert {(w["input"], w["output"]) for w in summary["workers"]} == {("reads its own shards", "writes its own parts")}
    writers = {read_part_summary(p)["writer"].split(" on ")[0] for p in output_parts(resolve(out))}
    assert writers and not writers & {f"pid {os.getpid()}", f"pid {proc.pid}"}
    assert summary["rows_skipped"] >= 2 * written and summary["rows"] == len(job_files["rows"])
    assert (summary["input"], summary["output_dir"]) == (src, out)
    assert _results(out) == _results(uninterrupted)
    written_text = printed + json.dumps(summary) + json.dumps(read_json(resolve(out).child("job.json")))
    assert s3_server["AWS_SECRET_ACCESS_KEY"] not in written_text
    assert s3_server["AWS_ACCESS_KEY_ID"] not in written_text


def test_a_worker_killed_mid_shard_costs_only_time(cluster, job_files, uninterrupted):
    out = job_files["tmp"] / "killed-worker"
    proc = _driver(job_files["config"], out, cluster.address)
    pids = []
    while len(pids) < 2:  # the driver prints one line per worker once it is ready
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "the driver ended early"
        if line.startswith("worker "):
            pids.append(int(line.split(" pid ")[1].split()[0]))
    _wait_for_parts(out, 1, proc)
    os.kill(pids[1], signal.SIGKILL)  # both workers are busy: shards are still queued
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shard_retries"] >= 1, output
    assert _results(out) == _results(uninterrupted)
