#!/usr/bin/env python3
"""`make gpu-check`: the checks a GPU session runs, as one prepared command, each part under its own timeout and
the whole within MAX_SECONDS (a device session lends 10 minutes a command).

    python3 -m jobs.bench.gpu_check --out artifacts/measurements/gpu-check     # on a CUDA machine
    python -m jobs.bench.gpu_check --smoke --out /tmp/smoke                    # every part, tiny, on a CPU (CI)

It first writes the machine (`nvidia-smi`, the torch and CUDA versions, free memory) to ``environment.json``, then
runs the parts below, each writing its JSON into ``--out``: the CUDA tests (graph replays equal each row decoded
alone), the step benchmark on random models of the default's shape (eager, fixed shapes, CUDA graphs, and
transformers' generate), and the real-size runs (jobs/bench/real_size.py) on the default's shape and on
Llama-3.1-8B's. ``--smoke`` runs each part's command on tiny shapes on a CPU, so that a renamed flag or a missing
import fails the test suite (tests/test_gpu_check.py) instead of a GPU session. ``summary.json`` says how each
part ended. It needs Python with torch (a CUDA build), transformers and pytest; nothing else.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

MAX_SECONDS = 540  # 9 minutes, whatever the parts' own timeouts


def parts(out: Path, smoke: bool) -> list[tuple[str, list[str], float]]:
    """(name, command, timeout seconds) of each part, in order."""
    py = [sys.executable]
    if smoke:
        bench = [*py, "-m", "jobs.bench.overhead", "--random-shape", "tiny", "--device", "cpu", "--dtype", "float32",
                 "--new-tokens", "4", "--rows-per-slot", "1", "--rounds", "1"]
        return [
            ("cuda_tests", [*py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "-m", "cuda",
                            "tests/test_fixed_step.py", "tests/test_checked_replay.py"], 120),
            ("overhead", [*bench, "--batch-sizes", "1", "2", "--modes", "eager", "fixed", "hf_eager",
                          "--json", str(out / "bench_overhead-smoke.json")], 120),
            ("real_size", [*py, "-m", "jobs.bench.real_size", "--smoke", "--json", str(out / "real_size-tiny.json")],
             120),
        ]
    bench = [*py, "-m", "jobs.bench.overhead", "--random-default", "--device", "cuda"]
    real = [*py, "-m", "jobs.bench.real_size", "--device", "cuda", "--dtype", "bfloat16"]
    return [
        ("cuda_tests", [*py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                        "tests/test_fixed_step.py"], 100),
        ("overhead_b1_16", [*bench, "--dtype", "bfloat16", "--batch-sizes", "1", "16", "--modes", "eager",
                            "cuda_graphs", "hf_eager", "hf_static", "--json",
                            str(out / "bench_overhead-bfloat16-b1-16.json")], 110),
        ("real_size_llama_8b", [*real, "--shape", "llama-8b", "--json", str(out / "real_size-llama-8b.json")], 170),
        ("real_size_default", [*real, "--shape", "default", "--json", str(out / "real_size-default.json")], 100),
        ("overhead_b64_256", [*bench, "--dtype", "bfloat16", "--batch-sizes", "64", "256", "--modes", "eager",
                              "cuda_graphs", "--rows-per-slot", "1", "--json",
                              str(out / "bench_overhead-bfloat16-b64-256.json")], 60),
    ]


def environment() -> dict:
    """The machine: nvidia-smi's report, torch's and CUDA's versions, each device's free and total memory."""
    import torch

    info: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError as exc:
        info["transformers"] = f"missing: {exc}"
    smi = shutil.which("nvidia-smi")
    info["nvidia_smi"] = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout if smi else None
    if torch.cuda.is_available():
        info["devices"] = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            info["devices"].append({"name": torch.cuda.get_device_name(i), "free_gib": round(free / 2**30, 2),
                                    "total_gib": round(total / 2**30, 2)})
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where the JSON goes (make gpu-check: $GPU_OUT)")
    p.add_argument("--smoke", action="store_true", help="every part on tiny shapes on a CPU, in seconds")
    p.add_argument("--only", nargs="+", help="run only these parts")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = environment()
    print(env.pop("nvidia_smi") or "nvidia-smi: not found", flush=True)
    print(json.dumps(env), flush=True)
    (args.out / "environment.json").write_text(json.dumps(env, indent=1))
    if not args.smoke and not env["cuda_available"]:
        print("no CUDA device: run with --smoke for the CPU variant", file=sys.stderr)
        return 2
    summary = {}
    for name, command, timeout in parts(args.out, args.smoke):
        if args.only and name not in args.only:
            continue
        left = MAX_SECONDS - (time.monotonic() - started)
        if left < 10:
            summary[name] = {"state": "skipped", "reason": "out of time"}
            continue
        print(f"== {name}: {' '.join(command)} (timeout {min(timeout, left):.0f} s)", flush=True)
        part_started = time.monotonic()
        try:
            rc = subprocess.run(command, timeout=min(timeout, left)).returncode
            state = "passed" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            state = "timed out"
        summary[name] = {"state": state, "seconds": round(time.monotonic() - part_started, 1)}
        print(f"== {name}: {state} in {summary[name]['seconds']} s", flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    failed = [name for name, s in summary.items() if s["state"] != "passed"]
    print(f"gpu-check: {len(summary) - len(failed)} of {len(summary)} parts passed"
          + (f"; not: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
