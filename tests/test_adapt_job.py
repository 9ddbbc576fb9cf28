"""Adaptation in the job (jobs/adapt.py) end to end on a local Ray: rows learned from, the artifact published
into the output and adopted by the worker mid-job, resume after a kill before and after publishing, a failing
training, and 'auto' deciding from the workers' latency profiles.

The tiny random model learns little, so where publishing is under test the driver is told the gate passed
(``force_gate``); the gate itself is tested in tests/test_adaptation.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs.adapt import Adaptation
from jobs.config import JobConfig
from jobs.output import read_output
from jobs.run import main
from jobs.storage import resolve
from tests.test_job import write_jsonl
from workers.artifacts import load_prompt_tokens

ROWS = [{"id": f"q{i:03d}", "prompt": f"Item {i}: write the number {i * 7} in words."} for i in range(160)]
SETTINGS = {"mode": "on", "min_rows": 10, "train_rows": 12, "held_out_rows": 4, "epochs": 1.0,
            "samples_per_step": 4, "cuts_per_sample": 8}


class KilledDriver(BaseException):
    """The driver dying at a chosen point (not an Exception: nothing in the job catches it)."""


@pytest.fixture(scope="module")
def job(ray_local, tiny_model_dir, tmp_path_factory):
    """The input, the common arguments, and plain decoding's outputs (the reference every run must equal)."""
    tmp = tmp_path_factory.mktemp("adapt-job")
    src = write_jsonl(tmp / "in.jsonl", ROWS)
    common = ["--input", str(src), "--model", str(tiny_model_dir), "--max-new-tokens", "32", "--batch-size", "2",
              "--shard-size", "8", "--profile-budget-s", "2"]
    assert main([*common, "--decoding", "vanilla", "--output", str(tmp / "plain")]) == 0
    plain = {r["id"]: r["output_token_ids"] for r in read_output(tmp / "plain").to_pylist()}
    return tmp, common, plain


def run(tmp: Path, common: list[str], name: str, settings: dict | None = None) -> dict:
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"adaptation": {**SETTINGS, **(settings or {})}}))
    assert main([*common, "--config", str(config), "--output", str(tmp / name)]) == 0
    return json.loads((tmp / name / "summary.json").read_text())


def rows_of(out: Path) -> list[dict]:
    rows = read_output(out).to_pylist()
    assert sorted(r["id"] for r in rows) == [r["id"] for r in ROWS]  # every row exactly once
    return rows


@pytest.fixture
def force_gate(monkeypatch):
    trained = Adaptation._trained

    def passed(self, result, workers):
        trained(self, {**result, "passed": True}, workers)

    monkeypatch.setattr(Adaptation, "_trained", passed)


def test_a_job_learns_from_its_first_rows_publishes_and_decodes_the_rest_with_them(job, force_gate):
    tmp, common, plain = job
    summary = run(tmp, common, "published")
    adaptation = summary["adaptation"]
    assert adaptation["state"] == "published", adaptation
    assert adaptation["rows_learned"] == 12 and adaptation["rows_held_out"] == 4
    assert [name.split()[0] for name in adaptation["adopted_by"]] == ["default/0"]  # the one worker, once
    assert not adaptation["refused_by"] + adaptation["unconfirmed_by"]
    assert {"tree_63", "worker_tree"} <= set(adaptation["tau_before"]) and adaptation["train_seconds"] > 0
    out = tmp / "published"
    record = json.loads((out / "job.json").read_text())["adapted_prompts"]
    artifact = out / record["artifact"]
    pt = load_prompt_tokens(artifact, expect_model_hash=None)  # the training artifact's format, hash checked
    assert pt.meta.extra["acceptance"] and pt.meta.extra["adaptation"]["rows_learned"] == 12
    assert adaptation["prompts_hash"] == record["prompts_hash"]
    rows = rows_of(out)
    assert {r["id"]: r["output_token_ids"] for r in rows} == plain  # before, across and after the swap
    hashes = [r["prompts_hash"] for r in sorted(rows, key=lambda r: r["started_at"])]
    assert hashes[0] is None and hashes[-1] == record["prompts_hash"]  # untrained first, the new tokens last
    assert set(hashes) == {None, record["prompts_hash"]}


def run_killed(tmp: Path, common: list[str], name: str, monkeypatch, publish_too: bool) -> None:
    """A run whose driver dies as it publishes: before anything is saved, or once the artifact is recorded."""
    from jobs import adapt

    publish = adapt.publish_artifact

    def killed(*args, **kwargs):
        if publish_too:
            publish(*args, **kwargs)
        raise KilledDriver

    with monkeypatch.context() as patch:
        patch.setattr("jobs.adapt.publish_artifact", killed)
        with pytest.raises(KilledDriver):
            run(tmp, common, name)


def test_a_driver_killed_before_publishing_trains_again_and_loses_nothing(job, force_gate, monkeypatch):
    tmp, common, plain = job
    run_killed(tmp, common, "killed-before", monkeypatch, publish_too=False)
    out = tmp / "killed-before"
    assert "adapted_prompts" not in json.loads((out / "job.json").read_text())
    summary = run(tmp, common, "killed-before")
    assert summary["adaptation"]["state"] == "published"  # learned again, from this run's first rows
    assert summary["rows_skipped"] > 0
    assert {r["id"]: r["output_token_ids"] for r in rows_of(out)} == plain


def test_a_driver_killed_after_publishing_reuses_the_artifact_and_does_not_train(job, force_gate, monkeypatch):
    tmp, common, plain = job
    run_killed(tmp, common, "killed-after", monkeypatch, publish_too=True)
    out = tmp / "killed-after"
    record = json.loads((out / "job.json").read_text())["adapted_prompts"]
    summary = run(tmp, common, "killed-after")
    adaptation = summary["adaptation"]
    assert adaptation["state"] == "reused" and "train_seconds" in adaptation  # the first run's report, kept
    assert adaptation["prompts_hash"] == record["prompts_hash"]
    rows = rows_of(out)
    assert {r["id"]: r["output_token_ids"] for r in rows} == plain
    this_run = [r for r in rows if r["prompts_hash"] == record["prompts_hash"]]
    assert len(this_run) >= summary["rows_this_run"]  # every row of the rerun decoded with the artifact


def test_a_failing_training_leaves_the_job_and_its_outputs_intact(job):
    tmp, common, plain = job
    summary = run(tmp, common, "failed", {"timeout_s": 1e-3, "epochs": 4.0})
    adaptation = summary["adaptation"]
    assert adaptation["state"] == "failed" and "deadline" in adaptation["reason"], adaptation
    out = tmp / "failed"
    assert not list(out.glob("prompt_tokens-*")) and "adapted_prompts" not in json.loads(
        (out / "job.json").read_text())
    rows = rows_of(out)
    assert {r["id"]: r["output_token_ids"] for r in rows} == plain
    assert {r["prompts_hash"] for r in rows} == {None}


def test_auto_adapts_only_where_a_profile_says_trees_pay_and_the_job_wins_the_time_back():
    class Plan:  # the part of an InputPlan the constructor reads
        shard_size = 64

        def shard_bounds(self):
            return [(0, 64)]

    cfg = JobConfig()
    adaptation = Adaptation(cfg, resolve("/nonexistent-output"), Plan(), np.zeros(64, bool), 100_000)
    cpu = {"worker": "w0", "profiled": True, "train_seconds_estimate": 300.0,
           "now": {"speedup": 1.0, "tau": 1.0, "tokens_per_s": 40.0},
           "expected": {"speedup": 0.92, "tau": 1.0, "tau_63": 2.1, "tokens_per_s": 37.0}}
    assert "trees do not pay on w0's device" in adaptation._auto_reason([cpu])
    gpu = {**cpu, "expected": {"speedup": 1.6, "tau": 1.9, "tau_63": 2.1, "tokens_per_s": 64.0}}
    assert adaptation._auto_reason([gpu]) is None
    assert adaptation._auto_reason([cpu, gpu]) is None  # some worker gains
    short = Adaptation(cfg, resolve("/nonexistent-output"), Plan(), np.zeros(64, bool), 300)
    assert "less than training" in short._auto_reason([gpu])


def test_the_rows_learned_from_are_the_first_shards_in_input_order(tmp_path):
    from jobs.adapt import first_todo_shards

    class Plan:
        def shard_bounds(self):
            return [(0, 3), (3, 6), (6, 10), (10, 12), (12, 20)]

    done = np.zeros(20, bool)
    done[0:3] = done[6:8] = True  # shard 0 written, shard 2 half written
    assert first_todo_shards(Plan(), done, 4) == [1, 2, 3]  # 3 + 2 rows reach 4, and one shard more
    assert first_todo_shards(Plan(), done, 100) == [1, 2, 3, 4]
    assert first_todo_shards(Plan(), done, 0) == []


def test_a_recorded_artifact_that_is_gone_or_damaged_is_learned_again(tmp_path):
    from jobs.adapt import publish_artifact

    class Plan:
        shard_size = 64

        def shard_bounds(self):
            return [(0, 64)]

    out = resolve(str(tmp_path / "out"))
    out.make_dir()
    (tmp_path / "out" / "job.json").write_text(json.dumps({"config_hash": "c"}))
    files = {"prompt_tokens.safetensors": b"weights", "prompt_tokens.json": b"{}"}
    where = publish_artifact(out, files, hashlib.sha256(b"weights").hexdigest(), {})
    cfg = JobConfig()
    assert Adaptation(cfg, out, Plan(), np.zeros(64, bool), 1000).state == "reused"
    (tmp_path / "out" / where.name / "prompt_tokens.safetensors").write_bytes(b"damaged")
    assert Adaptation(cfg, out, Plan(), np.zeros(64, bool), 1000).state == "undecided"
    (tmp_path / "out" / where.name / "prompt_tokens.safetensors").unlink()
    assert Adaptation(cfg, out, Plan(), np.zeros(64, bool), 1000).state == "undecided"
    off = cfg.model_copy(update={"adaptation": cfg.adaptation.model_copy(update={"mode": "off"})})
    assert Adaptation(off, out, Plan(), np.zeros(64, bool), 1000).state == "undecided"


@pytest.fixture
def training_outlasts_rows(monkeypatch):
    """The driver sees the training end only after the last row (as when it outlasts a short job's rows)."""
    poll = Adaptation.poll

    def poll_but_not_training(self, workers):
        if self.state == "training":
            self._ask_progress()
            self._collect_adoptions(timeout=0)
            return
        poll(self, workers)

    monkeypatch.setattr(Adaptation, "poll", poll_but_not_training)


def test_a_training_outlasting_the_rows_is_dropped_unless_finish_after_last_row(job, force_gate,
                                                                                training_outlasts_rows):
    tmp, common, plain = job
    dropped = run(tmp, common, "outlasted")["adaptation"]
    assert dropped["state"] == "failed" and "before the training ended" in dropped["reason"], dropped
    assert not list((tmp / "outlasted").glob("prompt_tokens-*"))

    kept = run(tmp, common, "outlasted-kept", {"finish_after_last_row": True})["adaptation"]
    assert kept["state"] == "published" and "no row of this run used it" in kept["reason"], kept
    assert kept["adopted_by"] == [] and kept["unconfirmed_by"] == []  # handed to no worker: they are done
    out = tmp / "outlasted-kept"
    record = json.loads((out / "job.json").read_text())["adapted_prompts"]
    assert load_prompt_tokens(out / record["artifact"], expect_model_hash=None).meta.extra["acceptance"]
    rows = rows_of(out)
    assert {r["prompts_hash"] for r in rows} == {None}  # every row decoded with the untrained tokens
    assert {r["id"]: r["output_token_ids"] for r in rows} == plain
