"""The numeric path through the job: workers of one job on one machine compute with one set of kernels, job.json
records the decision, and a resumed run takes it from there (workers/numerics.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs.output import read_output
from jobs.run import main
from tests.helpers_models import save_tiny_llama_dir
from tests.test_job import write_jsonl
from workers.numerics import decision_path, read_decision

PROMPTS = ["The sea is", "1, 2, 3,", "def add(a, b):\n"]


@pytest.fixture(scope="module")
def measured_model_dir(tmp_path_factory, default_tokenizer) -> Path:
    """A random Llama with the default tokenizer whose untied lm_head alone (49152 x 192 float32, 38 MB) is above
    the floor under which cpu_linear=auto does not measure: its linear kernel is decided by timing."""
    return save_tiny_llama_dir(tmp_path_factory.mktemp("measured-llama"), default_tokenizer, hidden_size=192)


def _run(tmp_path: Path, name: str, model_dir: Path, rows: list[dict], cache_dir: Path, **group) -> dict:
    config = {
        "input": str(write_jsonl(tmp_path / f"{name}.jsonl", rows)),
        "output": str(tmp_path / name),
        "shard_size": 1,
        "wait_for_workers": True,
        "model": {"model": str(model_dir), "cache_dir": str(cache_dir)},
        "decoding": {"method": "vanilla", "max_new_tokens": 8},
        "workers": [{"batch_size": 1, **group}],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path)]) == 0
    return json.loads((tmp_path / name / "summary.json").read_text())


def test_two_workers_on_one_machine_share_one_numeric_path(ray_local, measured_model_dir, tmp_path):
    rows = [{"id": f"r{i:02d}", "prompt": PROMPTS[i // 4]} for i in range(12)]  # 4 copies of each prompt
    summary = _run(tmp_path, "out", measured_model_dir, rows, tmp_path / "cache", count=2, num_cpus=1)
    first, second = summary["workers"]
    assert first["numeric_path"] == second["numeric_path"]
    assert first["linear_decision"]["key"] == second["linear_decision"]["key"]
    assert first["linear_decision"]["rows_below"] == second["linear_decision"]["rows_below"]
    # Decided once, with an empty cache: one worker measured, the other took the job's (or the disk's) decision.
    adopted, measured = sorted(w["linear_decision"]["source"] for w in (first, second))
    assert measured == "measured" and adopted in ("cache", "job")

    table = read_output(tmp_path / "out").to_pylist()
    assert {r["numeric_path"] for r in table} == {first["numeric_path"]}
    # Shards 0 and 1 (the first prompt's copies) went to different workers: both were idle when shards began.
    assert len({r["worker"] for r in table[:4]}) == 2
    for copies in (table[0:4], table[4:8], table[8:12]):
        assert len({tuple(r["output_token_ids"]) for r in copies}) == 1, copies
        assert all(r["error"] is None and r["num_output_tokens"] == 8 for r in copies)

    manifest = json.loads((tmp_path / "out" / "job.json").read_text())
    assert manifest["numerics"] == {first["linear_decision"]["key"]: {
        "rows_below": first["linear_decision"]["rows_below"], "machine": first["device"],
        "numeric_path": first["numeric_path"]}}


def test_a_resumed_run_takes_the_decision_job_json_records(ray_local, measured_model_dir, tmp_path):
    rows = [{"id": f"r{i:02d}", "prompt": PROMPTS[i % 3]} for i in range(4)]
    cache = tmp_path / "cache"
    summary = _run(tmp_path, "out", measured_model_dir, rows[:2], cache)
    (worker,) = summary["workers"]
    key, decided = worker["linear_decision"]["key"], worker["linear_decision"]["rows_below"]
    manifest_path = tmp_path / "out" / "job.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["numerics"][key]["rows_below"] == decided
    assert read_decision(decision_path(cache, key)) == decided

    # The job recorded a decision that this machine's cache no longer holds, and that its timing may not choose
    # again: the resumed run takes the job's, and leaves it in the cache.
    recorded = 3 if decided != 3 else 5
    manifest["numerics"][key]["rows_below"] = recorded
    manifest_path.write_text(json.dumps(manifest))
    decision_path(cache, key).unlink()
    summary = _run(tmp_path, "out", measured_model_dir, rows, cache)
    (worker,) = summary["workers"]
    assert worker["linear_decision"] == {"key": key, "rows_below": recorded, "source": "job"}
    assert summary["rows_skipped"] == 2 and summary["rows_this_run"] == 2
    new_rows = [r for r in read_output(tmp_path / "out").to_pylist() if r["id"] in ("r02", "r03")]
    assert {r["numeric_path"] for r in new_rows} == {f"cpu float32 attn=sdpa linear=weight_stationary<{recorded}"}
    assert read_decision(decision_path(cache, key)) == recorded

    # A new job on this machine takes the cached decision.
    summary = _run(tmp_path, "again", measured_model_dir, rows[:1], cache)
    assert summary["workers"][0]["linear_decision"] == {"key": key, "rows_below": recorded, "source": "cache"}
