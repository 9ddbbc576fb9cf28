#!/usr/bin/env python3
"""The main job: decode every input row with PPD (or plain greedy decoding) on a pool of Ray actors.

    python jobs/run.py                                  # the embedded demo -> outputs/demo
    python jobs/run.py --input rows.jsonl --output /abs/out --max-new-tokens 128

The pipeline: scan the input's ids and plan its shards (jobs/inputs.py); see what the output directory already
holds and skip those ids (jobs/job_output.py); start every worker group's actors, each of which profiles its
own device and picks its own tree and batch size (workers/); let them pull shards until none is left, each
worker reading its shard's rows and publishing the finished shard as one Parquet part, the driver keeping only
the parts' summaries; then summary.json and a table per device type. Starts a local Ray when none is running;
respects RAY_ADDRESS. See README.md for the options and the output schema.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import numpy as np
from pydantic import ValidationError

from jobs.adapt import Adaptation, load_prompt_files
from jobs.config import CONFIG_FLAGS, JobConfig, add_config_flags, build_config
from jobs.inputs import InputError, InputPlan, Shard, check_unchanged, plan_shards, scan_input
from jobs.job_output import JobOutput
from jobs.progress import Progress, device_table
from jobs.resume import ResumeError, Written
from jobs.storage import StorageError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="jobs/run.py",
        description="Batch text generation with parallel prompt decoding on Ray actors. "
        "With no arguments, runs the embedded demo prompts through the default model.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML file with JobConfig values; flags override it")
    add_config_flags(p)
    p.add_argument("--plan-only", action="store_true",
                   help="read the input, check its ids, form the shards and read what the output holds, print it "
                   "as JSON, and exit (nothing is written)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard what the output directory holds instead of resuming into it")
    p.add_argument("--progress-interval-s", type=float, default=10.0, metavar="S",
                   help="seconds between progress lines when the output is not a terminal (default: 10)")
    return p.parse_args(argv)


def describe_worker(info: dict[str, Any]) -> str:
    """One line per worker: its device, batch size, the tree it chose, and the kernels it computes with."""
    line = f"worker {info['worker']} [{info['device']}]: {info['decoding']}, batch {info['batch_size']}"
    if info.get("tree_hash"):
        line += f", tree {info['tree_hash']} ({info.get('tree', '')}"
        if "tree_slots" in info:
            line += f", {info['tree_slots']} slots per row"
        line += ")"
    if info.get("predicted_tau"):
        line += f", predicted tau {info['predicted_tau']:.2f}"
    if info.get("predicted_speedup"):
        line += f", predicted {info['predicted_speedup']:.2f}x over plain decoding"
    if info.get("prune_head"):
        line += f", pruning after layer {info['prune_layer']} (keep top {info['keep_top_k']})"
    if info.get("profile"):
        line += f"; profile {info['profile']}"
    if info.get("numeric_path"):
        decision = info.get("linear_decision")
        line += f"; numerics {info['numeric_path']}" + (f" ({decision['source']})" if decision else "")
    if info.get("priority"):
        reason = f" ({info['threads_reason']})" if info.get("threads_reason") else ""
        line += f"; {info['threads']} threads{reason}, {info['priority']}"
    if info.get("input"):
        line += f"; {info['input']}, {info['output']}"
    if info.get("memory"):
        m, gib = info["memory"], 2**30
        line += (f"; memory {m['budget'] / gib:.1f} GiB: KV {m['kv'] / gib:.2f} ({m['slots']} slots x {m['capacity']} "
                 f"columns), weights {m['weights'] / gib:.2f}, free {m['free'] / gib:.1f}")
    if info.get("compile") and info["compile"] != "compile off":
        line += f"; {info['compile']}"
    if info.get("startup"):
        up = info["startup"]
        line += f"; start-up: plan {up['plan_s']:.1f} s"
        if info.get("step_mode", "eager") != "eager":
            line += f", {'capture' if info['step_mode'] == 'cuda_graphs' else 'compile'} {up['warmup_s']:.1f} s"
    return line


def _summarise(output: JobOutput, plan: InputPlan, cfg: JobConfig, run: dict[str, Any], workers: list,
               progress: Progress) -> dict[str, Any]:
    """summary.json: the whole output directory's rows (from the index files and the parts' footers, never the
    rows themselves), this run's throughput, and a table per device type."""
    final = output.final_scan(plan)
    out = output.location
    if not final.done.all():
        raise RuntimeError(f"internal error: {out.uri} lacks {int((~final.done).sum())} input rows")
    by_device = {
        device: {"workers": sum(w.info.get("device") == device for w in workers), **tally.as_dict()}
        for device, tally in progress.devices.items()
    }
    decode_seconds = run["decoded"] - run["first_ready"] if run.get("first_ready") else 0.0
    total = progress.total
    return {
        "prompts": plan.num_rows,  # input rows; each has n output rows (one if it failed early)
        "rows": final.rows,
        "rows_ok": final.rows - final.failed,
        "rows_failed": final.failed,
        "rows_skipped": run["skipped"],  # input rows already written by an earlier run
        "rows_retried": run["retried_from_earlier"],  # earlier runs' worker_died rows, decoded again
        "prompts_this_run": total.prompts,
        "rows_this_run": total.rows,
        "output_tokens": total.output_tokens,
        "steps": total.steps,
        # Rows whose batch failed and that were decoded alone: a bug in the batched path (workers/engine.py).
        "batch_fallback_rows": total.batch_fallback_rows,
        # Mean busy decode slots per step over slots, over the steps while rows waited for a slot.
        "slot_occupancy": total.occupancy,
        "mean_tau": total.output_tokens / total.steps if total.steps else 0.0,
        "decode_seconds": decode_seconds,
        "tokens_per_s": total.output_tokens / decode_seconds if decode_seconds > 0 else 0.0,
        "device_seconds": total.device_seconds,
        # The decode loops' steps, their time inside steps, and their threads' CPU time in them: with one worker,
        # decode_seconds less step_seconds is time its loop did not step; step_seconds less thread_cpu_seconds,
        # time its steps waited (on the OpenMP team, a preempted core, the device).
        "decode_loop": total.decode_loop(),
        "wall_seconds": time.perf_counter() - run["started"],
        "shards": run["shards"],
        "shard_retries": run["retries"],
        "num_workers": len(workers),
        "by_device": by_device,
        "workers": run["worker_starts"],  # one entry per start: a restarted worker appears again
        "config_hash": run["config_hash"],
        "input": plan.uri,
        "output_dir": out.uri,
        "config": cfg.model_dump(mode="json"),
    }


def todo_shards(plan: InputPlan, written: Written) -> int:
    """How many shards hold rows not yet written."""
    bounds = plan.shard_bounds()
    starts = np.array([start for start, _ in bounds], dtype=np.int64)
    return int((np.add.reduceat(~written.done, starts) > 0).sum()) if len(starts) else 0


def plan_report(cfg: JobConfig, plan: InputPlan, started: float) -> dict[str, Any]:
    """What a run would do, read without changing anything: the input's rows and shards, and what the output
    directory already holds (with the seconds each scan took and the process's peak memory)."""
    scanned = time.perf_counter()
    output = JobOutput(cfg)
    written = output.look(plan)
    done = int(written.done.sum())
    return {"input": plan.uri, "files": len(plan.files), "rows": plan.num_rows, "shards": len(plan.shard_bounds()),
            "output": output.uri, "parts": len(written.parts), "rows_written": done,
            "rows_to_decode": plan.num_rows - done,
            "rows_to_retry": written.retried, "shards_to_decode": todo_shards(plan, written),
            "input_scan_s": round(scanned - started, 2), "output_scan_s": round(time.perf_counter() - scanned, 2),
            "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_job(cfg: JobConfig, plan: InputPlan, *, overwrite: bool = False,
            progress_interval_s: float = 10.0, startup_timeout_s: float = 1800.0) -> dict[str, Any]:
    """Decode the input rows not yet in the output directory on the worker pool; write parts and summary.json."""
    import ray  # the driver loads Ray, and through the actors' module torch, only to run a pool

    from jobs.pool import TICK_S, Worker, run_shards, start_workers, worker_niceness
    from workers.actor import PREFETCH_SHARDS
    from workers.board import start_board

    run: dict[str, Any] = {"started": time.perf_counter(), "retries": 0, "worker_starts": []}
    output = JobOutput(cfg)
    run["config_hash"] = chash = output.config_hash
    written = output.open(plan, overwrite=overwrite)
    skipped = int(written.done.sum())
    run["skipped"], run["retried_from_earlier"] = skipped, written.retried
    run["shards"] = todo_shards(plan, written)
    progress = Progress(plan.num_rows - skipped, skipped, interval_s=progress_interval_s)
    adaptation = Adaptation(cfg, output.location, plan, written.done, plan.num_rows - skipped)
    progress.status = adaptation.progress
    workers: list[Worker] = []
    board = None
    if run["shards"]:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        we_started_ray = not ray.is_initialized()
        if we_started_ray:
            # A local Ray this starts runs its workers at the driver's niceness, not Ray's 15 (workers/actor.py
            # take_niceness); a running cluster keeps its own setting.
            os.environ.setdefault("RAY_worker_niceness", str(worker_niceness()))
            for key, value in QUIET_LOCAL_RAY.items():
                os.environ.setdefault(key, value)
            # Connects to RAY_ADDRESS / a running cluster (which keeps its own settings), else starts a local one
            # for this job alone, without the dashboard (QUIET_LOCAL_RAY says why).
            ray.init(include_dashboard=False)
        try:
            # The job's numeric decisions, seeded with those job.json records: every worker on one kind of machine,
            # restarted or in a resumed run, computes with the same kernels (workers/numerics.py).
            board, board_name = start_board(output.recorded_numerics())
            driver_node = ray.get_runtime_context().get_node_id()
            workers = start_workers(cfg, chash, board_name, adaptable=adaptation.adaptable,
                                    prompt_files=adaptation.worker_files or load_prompt_files(cfg),
                                    rows_to_decode=(plan.num_rows - skipped) * cfg.decoding.sampling.n)

            def on_ready(w: Worker) -> None:
                first = "first_ready" not in run
                run.setdefault("first_ready", time.perf_counter())
                w.writer, w.info["output"] = output.writer_for(w.info.get("node_id"), driver_node)
                w.reads_input = plan.files[0].location.reachable_from(w.info.get("node_id"), driver_node)
                w.info["input"] = ("reads its own shards" if w.reads_input else "gets its rows from the driver: the "
                                   "input is a local path on the driver's node")
                print(describe_worker(w.info), flush=True)
                output.record_worker(w.info, run["worker_starts"])
                run["worker_starts"].append(w.info)
                progress.worker_ready(w.group)
                if first:
                    print(adaptation.start([w]), flush=True)
                adaptation.worker_ready(w)

            asked: dict[Any, Any] = {}  # worker handle -> its open_progress() call in flight

            def submit(w: Worker, shard: Shard) -> Any:
                # The worker reads its shard and publishes its part where it reaches the input and the output
                # (else the driver does); its rows come back only for the first shards, which adaptation learns
                # from.
                rows = shard.read if w.reads_input and shard.rows is None else shard.load()
                return w.handle.process.remote(rows, w.writer, shard.index, adaptation.wants(shard.index))

            def on_tick() -> None:
                adaptation.poll(workers)
                ask_open_progress(workers, asked, progress, send=progress.due(ahead_s=2 * TICK_S))
                progress.show()

            for shard, result, w in run_shards(
                workers, plan_shards(plan, written.done), max_attempts=cfg.faults.max_shard_attempts,
                config_hash=chash, on_ready=on_ready, startup_timeout_s=startup_timeout_s, on_tick=on_tick,
                wait_for_all=cfg.wait_for_workers,
                prefetch=PREFETCH_SHARDS if cfg.decoding.batching == "continuous" else 0, submit=submit,
            ):
                if result.get("input_error"):  # the input changed since the plan
                    raise InputError(result["input_error"])
                if result.get("read_error") or result.get("output_error"):  # the store failed: a rerun resumes
                    raise OSError(result.get("read_error") or result["output_error"])
                part = output.take(shard.index, result)
                if adaptation.wants(shard.index) and result.get("records") is not None:
                    adaptation.add_shard(shard.index, result.get("rows") or shard.load(), result["records"], workers)
                adaptation.poll(workers)
                run["retries"] += shard.attempts
                progress.add_part(part.summary, group=w.group if w else None, device=w.info["device"] if w else None,
                                  seconds=w.last_busy_seconds if w else 0.0, slots=w.last_slots if w else None,
                                  clock=w.last_clock if w else None)
            run["decoded"] = time.perf_counter()
            check_unchanged(plan)
            adaptation.finish(workers)
        finally:
            output.flush()
            for w in workers:
                ray.kill(w.handle)
            if board is not None:
                ray.kill(board)
            if we_started_ray:
                ray.shutdown()
    run.setdefault("decoded", time.perf_counter())
    progress.close()
    summary = {**_summarise(output, plan, cfg, run, workers, progress), "adaptation": adaptation.summary()}
    output.finish(summary)
    if summary["by_device"]:
        print(device_table(summary["by_device"]), flush=True)
    if summary["batch_fallback_rows"]:
        print(f"warning: {summary['batch_fallback_rows']} rows were decoded alone because their batch failed: a "
              "bug in the batched decoder (the workers' logs hold the exception)", file=sys.stderr, flush=True)
    return summary


# A local Ray this job starts serves it alone: no dashboard, no metrics export, task events (`ray list tasks`)
# every 10 s instead of every second. Ray's services wake all through a job, and on a small machine each wake-up
# takes a core from a decode step's OpenMP team, whose other threads wait at the step's next barrier (measured in
# docs/benchmarks.md, python -m jobs.bench.job_speed). The environment's own RAY_ values win.
QUIET_LOCAL_RAY = {"RAY_enable_metrics_collection": "0", "RAY_task_events_report_interval_ms": "10000"}


def ask_open_progress(workers: list, asked: dict[Any, Any], progress: Progress, send: bool = True) -> None:
    """Feed the answers of ``open_progress()`` calls that have come back to the progress line, and with ``send``
    ask each live worker that has none in flight (never waits: a tick costs no round trip). The caller sends
    only ahead of a line that will show them: each call takes the worker's CPU (and GIL) from its decode loop."""
    import ray
    from ray.exceptions import RayError

    for w in workers:
        if not w.joined:
            continue
        ref = asked.get(w.handle)
        if ref is not None:
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                continue
            del asked[w.handle]
            try:
                progress.in_flight(ray.get(ref))
            except RayError:
                pass  # a restarted worker: its shards come back and are counted when written
        if send:
            asked[w.handle] = w.handle.open_progress.remote()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in CONFIG_FLAGS}
    try:
        cfg = build_config(args.config, overrides)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"error: bad configuration: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        plan = scan_input(cfg.input_uri(), cfg.shard_size, cfg.input_format)
        if args.plan_only:
            print(json.dumps(plan_report(cfg, plan, started)), flush=True)
            return 0
    except (InputError, StorageError, ResumeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a store that failed a request: pyarrow names the file and the error
        print(f"error: cannot read the input or the output: {exc}", file=sys.stderr)
        return 2
    from ray.exceptions import RayError

    from jobs.pool import AllWorkersFailed

    try:
        summary = run_job(cfg, plan, overwrite=args.overwrite, progress_interval_s=args.progress_interval_s)
    except (ResumeError, StorageError, InputError) as exc:  # InputError: the input changed mid-job
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RayError, AllWorkersFailed) as exc:  # e.g. no worker could load the model
        print(f"error: the job failed on its Ray workers: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the store failed mid-job: what was written stays, and a rerun resumes
        print(f"error: reading the input or writing the output failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"{summary['output_dir']} holds {summary['rows']} rows for {summary['prompts']} prompts "
        f"({summary['rows_failed']} failed): {summary['rows_skipped']} prompts were already there, "
        f"{summary['prompts_this_run']} decoded now "
        f"({summary['output_tokens']} tokens in {summary['decode_seconds']:.1f} s, "
        f"{summary['tokens_per_s']:.1f} tokens/s, mean tau {summary['mean_tau']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
