"""`make gpu-check` kept working by CI: every part of jobs/bench/gpu_check.py runs its command on tiny shapes on a
CPU, so a renamed flag or a missing import fails here, not in a GPU session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_part_of_the_gpu_check_runs_as_a_smoke(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.bench.gpu_check", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"cuda_tests", "overhead", "real_size"}
    assert all(part["state"] == "passed" for part in summary.values()), summary
    assert json.loads((tmp_path / "environment.json").read_text())["torch"]
    bench = json.loads((tmp_path / "bench_overhead-smoke.json").read_text())
    assert {row["mode"] for row in bench} == {"eager", "fixed", "hf_eager"}
    real = json.loads((tmp_path / "real_size-tiny.json").read_text())
    assert real["memory"]["auto"]["slots"] >= 1 and real["step_ms"]["1"]["1"] > 0
    assert [row["batch"] for row in real["by_batch"]] == [1, 2]
    assert all(row["plain_tokens_per_s_decoded"] > 0 for row in real["by_batch"])
    assert real["hf_generate_b1"]["tokens_per_s"] > 0
