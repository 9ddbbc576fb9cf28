#!/usr/bin/env python3
"""The job at its engine's speed, on a quiet machine and beside a background process; compile where it pays.

    python -m jobs.bench.job_speed                                   # batch 1 and 8, plain and ProPD, 5 rounds
    python -m jobs.bench.job_speed --rounds 3 --compile-rows 500 --json outputs/bench_job_speed.json

The rows: ``--rows`` public prompts (../shared/data: GPTeacher roleplay, Code Alpaca and GSM8K train, each read
from its end, interleaved), the default model, ``--max-new-tokens`` each, greedy. For each batch size, rounds
interleave (every other round in reverse order):
- in-process: ``DecodeEngine`` over the rows (prefill included; one warm-up batch first), in a process of its own,
  plain decoding (vanilla) and ProPD (ppd with the shipped prompt tokens);
- the same rows as a job, run as a user runs it (``python jobs/run.py``, its own local Ray, adaptation off,
  compile off): summary.json's ``tokens_per_s`` (first worker ready to last row: start-up is not counted), plain and
  ProPD, on a quiet machine and beside ``nice -n 19 python3 -c 'while True: pass'`` (one core's busy loop).
Reported per batch size: medians over the rounds, the job against in-process (quiet), loaded against quiet, ProPD
against plain (each round's pair, then the median), and each ProPD job's start-up plan (its tree, batch size and
where its profile came from): a stable plan is the same in every round.

``--compile-rows N``: then a job of N rows at batch 8, plain decoding, with ``--compile off``, ``on``, ``auto``
and ``off`` again (the compile cache emptied before ``on``, so it pays a first compile; ``auto`` finds the records
of both and the warm cache, as a later job would), wall time compile included. ``auto`` should be within 5% of
the better of ``on`` and the two ``off`` runs' median.

Ratios only, every number measured in this one run; timings on a shared VM drift by +-20% between runs. Before
and after the rounds a fixed CPU burst is timed 8 times (``host_pulse``): a spread above 1.05 says the host's
speed swings, and the ratios carry its swings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from jobs.train.data import DEFAULT_DATA_DIR, instruction_text, read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]
LOAD_COMMAND = ["nice", "-n", "19", sys.executable, "-c", "while True: pass"]
METHODS = {"plain": "vanilla", "propd": "ppd"}


def bench_rows(count: int, data_dir: Path) -> list[dict]:
    """``count`` prompts, chat, code and math in turn."""
    chat, code, math = (read_jsonl(data_dir / name) for name in
                        ("gpteacher_roleplay.jsonl", "code_alpaca_2k.jsonl", "gsm8k_train.jsonl"))
    prompts = []
    for i in range(count):
        kind = i % 3
        if kind == 2:
            text = math[-1 - i // 3]["question"]
        else:
            r = (chat, code)[kind][-1 - i // 3]
            text = instruction_text(r["instruction"], r.get("input"))
        prompts.append({"id": f"speed-{i}", "messages": [{"role": "user", "content": text}]})
    return prompts


def in_process(rows_file: Path, batch: int, method: str, max_new_tokens: int) -> dict:
    """Decode the rows with the engine in this process (the child of ``measure_in_process``)."""
    from jobs.inputs import read_rows
    from workers.configs import DecodingConfig, ModelConfig
    from workers.engine import DecodeEngine

    rows = read_rows(str(rows_file))
    engine = DecodeEngine.from_config(ModelConfig(), DecodingConfig(method=method, max_new_tokens=max_new_tokens,
                                                                    compile="off"), batch_size=batch)
    engine.run_rows(rows[:batch])  # warm-up: the first steps' allocations, as a job's warm-up does
    clock = engine.clock.copy()
    started = time.perf_counter()
    outputs = engine.run_rows(rows)
    seconds = time.perf_counter() - started
    clock = engine.clock.since(clock)
    tokens = sum(o.num_output_tokens for o in outputs)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, **loop_figures(
        seconds, clock.steps, clock.wall_s, clock.thread_cpu_s)}


def loop_figures(seconds: float, steps: int, step_s: float, thread_cpu_s: float) -> dict:
    """Where a decode's time went: the share of it spent inside steps, a step's mean wall time, and the share of a
    step the stepping thread ran (the rest it waited: on its OpenMP team, a preempted core)."""
    return {"steps": steps, "in_steps": round(step_s / seconds, 4) if seconds else None,
            "step_ms": round(1000 * step_s / steps, 3) if steps else None,
            "thread_ran": round(thread_cpu_s / step_s, 4) if step_s else None}


def measure_in_process(rows_file: Path, batch: int, method: str, max_new_tokens: int) -> dict:
    command = [sys.executable, "-m", "jobs.bench.job_speed", "--in-process", str(rows_file), "--batch-sizes",
               str(batch), "--method", method, "--max-new-tokens", str(max_new_tokens)]
    done = subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# One fixed CPU burst, timed: matmuls of a decode step's shape at batch 8 (the default model's MLP), on the threads
# a worker uses. Printed: the milliseconds of each burst, one a second.
PULSE_CODE = """
import json, sys, time, torch
bursts, matmuls = int(sys.argv[1]), int(sys.argv[2])
a, w, ms = torch.randn(8, 576), torch.randn(576, 1536), []
for i in range(bursts):
    started = time.perf_counter()
    for _ in range(matmuls):
        a @ w
    ms.append(round(1000 * (time.perf_counter() - started), 1))
    if i + 1 < bursts:
        time.sleep(1.0)
print(json.dumps(ms))
"""


def host_pulse(bursts: int = 8, matmuls: int = 3000) -> dict:
    """How steady the host is: ``bursts`` timings of one fixed CPU burst, a second apart, in a process of its own,
    and ``spread``, the slowest over the fastest. A steady host keeps them within a few percent; on 12-08 the
    VM's spread was 1.28 and runs of one configuration a minute apart differed by up to 1.5x, which no number of
    interleaved rounds makes into a ratio worth reporting. Measured before and after the rounds."""
    done = subprocess.run([sys.executable, "-c", PULSE_CODE, str(bursts), str(matmuls)], check=True,
                          capture_output=True, text=True)
    ms = json.loads(done.stdout.strip().splitlines()[-1])
    return {"burst_ms": ms, "spread": round(max(ms) / min(ms), 3)}


def run_job(rows_file: Path, out: Path, batch: int, method: str, max_new_tokens: int,
            compile_mode: str = "off") -> dict:
    """The job as a user runs it; summary.json's figures, the wall time of the command, and the start-up plan."""
    command = [sys.executable, "jobs/run.py", "--input", str(rows_file), "--output", str(out), "--overwrite",
               "--batch-size", str(batch), "--decoding", method, "--adapt-prompts", "off", "--compile", compile_mode,
               "--max-new-tokens", str(max_new_tokens), "--progress-interval-s", "600"]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    worker, loop = summary["workers"][0], summary["decode_loop"]
    return {"tokens_per_s": summary["tokens_per_s"], "tokens": summary["output_tokens"], "command_wall_s": wall,
            **loop_figures(summary["decode_seconds"], loop["steps"], loop["step_seconds"], loop["thread_cpu_seconds"]),
            "plan": {key: worker.get(key) for key in ("tree_hash", "tree_slots", "batch_size", "profile")},
            "compile": worker.get("compile"), "step_mode": worker.get("step_mode"), "graphs": worker.get("graphs")}


class Load:
    """A busy loop at nice 19 on one core, for the ``with`` block."""

    def __enter__(self):
        self.process = subprocess.Popen(LOAD_COMMAND)
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def speed_rounds(rows_file: Path, work: Path, batch: int, args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {}
    methods = {name: METHODS[name] for name in args.methods}

    def loaded_job(name: str, method: str, r: int) -> dict:
        with Load():
            return run_job(rows_file, work / f"b{batch}-{name}-load-{r}", batch, method, args.max_new_tokens)

    for r in range(args.rounds):
        order: list[tuple[str, Callable[[], dict]]] = []
        for name, method in methods.items():
            order.append((f"{name} in-process", partial(measure_in_process, rows_file, batch, method,
                                                        args.max_new_tokens)))
            order.append((f"{name} job", partial(run_job, rows_file, work / f"b{batch}-{name}-quiet-{r}", batch,
                                                 method, args.max_new_tokens)))
            if not args.no_load:
                order.append((f"{name} job, loaded", partial(loaded_job, name, method, r)))
        # Every other round runs backwards: a machine whose speed drifts through a round (a VM's neighbours) then
        # favours each side of a pair equally often, instead of always the one that runs first.
        for key, measure in order[::-1] if r % 2 else order:
            runs.setdefault(key, []).append(measure())
        print(f"batch {batch} round {r + 1}: " + ", ".join(
            f"{key} {runs[key][-1]['tokens_per_s']:.1f}" for key in runs), flush=True)
    median = {key: statistics.median(x["tokens_per_s"] for x in values) for key, values in runs.items()}

    def paired(a: str, b: str) -> float | None:
        if a not in runs or b not in runs:
            return None
        return round(statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b])), 3)

    def loop(key: str) -> dict:
        return {figure: statistics.median(x[figure] for x in runs[key]) for figure in ("in_steps", "step_ms",
                                                                                         "thread_ran")}

    plans = [json.dumps(x["plan"], sort_keys=True) for key in ("propd job", "propd job, loaded") for x in
             runs.get(key, [])]
    return {
        "tokens_per_s": {key: round(v, 2) for key, v in median.items()},
        "job_vs_in_process": {name: paired(f"{name} job", f"{name} in-process") for name in methods},
        "loaded_vs_quiet": {name: paired(f"{name} job, loaded", f"{name} job") for name in methods},
        "propd_vs_plain": {"quiet": paired("propd job", "plain job"),
                           "loaded": paired("propd job, loaded", "plain job, loaded"),
                           "in-process": paired("propd in-process", "plain in-process")},
        "propd_plans": {plan: plans.count(plan) for plan in dict.fromkeys(plans)},
        # medians: the share of the decode spent inside steps, a step's wall ms, the share of a step its thread ran
        "decode_loop": {key: loop(key) for key in runs},
        "runs": runs,
    }


def compile_comparison(rows_file: Path, work: Path, args: argparse.Namespace) -> dict:
    from workers.models import resolve_cache_dir

    cache = resolve_cache_dir(None)
    results: dict[str, list[dict]] = {}
    # off twice, around auto, so that auto is weighed against eager in the same spell of this VM's drift
    for i, mode in enumerate(("off", "on", "auto", "off")):
        if mode == "on":  # a first compile: no inductor cache, no record (the off job before it recorded its rate)
            shutil.rmtree(cache / "inductor", ignore_errors=True)
            for record in (cache / "compile").glob("*.json"):
                record.write_text(json.dumps({"step_tokens_per_s": json.loads(record.read_text()).get(
                    "step_tokens_per_s", {})}))
        result = run_job(rows_file, work / f"compile-{i}-{mode}", 8, "vanilla", args.max_new_tokens, mode)
        results.setdefault(mode, []).append(result)
        print(f"compile {mode}: {result['command_wall_s']:.0f} s wall, {result['tokens_per_s']:.1f} tok/s, "
              f"{result['step_ms']} ms a step, graphs {result['graphs']} ({result['compile']})", flush=True)
    off = statistics.median(r["command_wall_s"] for r in results["off"])
    best = min(off, results["on"][0]["command_wall_s"])
    auto = results["auto"][0]
    return {"wall_s": {mode: [round(r["command_wall_s"], 1) for r in runs] for mode, runs in results.items()},
            "step_ms": {mode: [r["step_ms"] for r in runs] for mode, runs in results.items()},
            "auto_vs_best": round(auto["command_wall_s"] / best, 3),
            "auto_chose": auto["step_mode"], "auto_reason": auto["compile"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.job_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32, help="rows per job (default: 32)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8], help="none: only the compile comparison")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="plain (vanilla) and/or propd (ppd); default: both")
    p.add_argument("--no-load", action="store_true", help="skip the jobs beside the busy loop")
    p.add_argument("--compile-rows", type=int, default=0, help="also compare --compile off/on/auto on a job of "
                   "this many rows at batch 8 (the issue's: 500)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--work-dir", help="where the jobs write (default: a temporary directory)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--in-process", metavar="ROWS", help=argparse.SUPPRESS)  # the in-process child
    p.add_argument("--method", default="vanilla", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.in_process:
        print(json.dumps(in_process(Path(args.in_process), args.batch_sizes[0], args.method, args.max_new_tokens)))
        return 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-job-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    rows_file = work / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in bench_rows(args.rows, Path(args.data_dir))))
    results: dict = {"rows": args.rows, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
                     "load": " ".join(LOAD_COMMAND[:3]) + " python3 -c 'while True: pass'"}
    results["host_pulse"] = {"before": host_pulse()}
    print(f"host pulse before: {results['host_pulse']['before']}", flush=True)
    for batch in args.batch_sizes:
        results[f"batch {batch}"] = result = speed_rounds(rows_file, work, batch, args)
        print(json.dumps({key: value for key, value in result.items() if key != "runs"}, indent=1), flush=True)
    if args.compile_rows:
        compile_rows = work / "compile_rows.jsonl"
        compile_rows.write_text("".join(json.dumps(r) + "\n" for r in bench_rows(args.compile_rows,
                                                                                  Path(args.data_dir))))
        results["compile"] = compile_comparison(compile_rows, work, args)
        print(json.dumps(results["compile"], indent=1), flush=True)
    results["host_pulse"]["after"] = host_pulse()
    spread = max(pulse["spread"] for pulse in results["host_pulse"].values())
    print(f"host pulse after: {results['host_pulse']['after']}" + (
        f"; a spread of {spread:.2f}x: the host's speed swings, and the ratios above carry its swings"
        if spread > 1.05 else ""), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.batch_sizes:
        worst = min(min(results[f"batch {b}"]["job_vs_in_process"].values()) for b in args.batch_sizes)  # type: ignore
        print(f"job vs in-process (worst of methods and batch sizes): {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
