"""The README's `ray job submit` recipe, run for real: `ray start --head` (token auth on), submit
`jobs/run.py` with `--working-dir .`, read the results the job wrote beside us, `ray stop`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.output import read_output

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_a_local_head(tiny_model_dir, tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    bin_dir = Path(sys.executable).parent
    ray_cli = bin_dir / "ray"
    if not ray_cli.exists():
        pytest.skip("no `ray` command beside this Python")
    # The job's `python` is whichever the head's PATH finds: this venv's, as when `ray start` runs from it.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    start = subprocess.run(
        [str(ray_cli), "start", "--head", "--num-cpus", "2", "--port", str(_free_port()), "--dashboard-port",
         str(dashboard), "--dashboard-host", "127.0.0.1", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        src = tmp_path / "in.jsonl"
        src.write_text('{"id": "a", "prompt": "1, 2, 3,"}\n{"id": "b", "prompt": ""}\n')
        out = tmp_path / "submitted"
        submit = subprocess.run(
            [str(ray_cli), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".",
             "--", "python", "jobs/run.py", "--input", str(src), "--model", str(tiny_model_dir),
             "--max-new-tokens", "4", "--output", str(out)],
            cwd=REPO, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=600)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        assert "succeeded" in submit.stdout
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)
    rows = {r["id"]: r for r in read_output(out).to_pylist()}
    assert rows["a"]["error"] is None and 1 <= rows["a"]["num_output_tokens"] <= 4
    assert rows["b"]["error"]["code"] == "empty_prompt"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 2
    # The entrypoint runs at Ray's worker niceness; the workers aim for 0 all the same (jobs/pool.worker_niceness)
    priority = summary["workers"][0]["priority"]
    assert priority.startswith("niceness 0") or "the driver's 0 was refused" in priority, priority
