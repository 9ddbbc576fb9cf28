#!/usr/bin/env python3
"""The main job: decode every input row with PPD (or plain greedy decoding) on a pool of Ray actors.

    python jobs/run.py                                  # the embedded demo -> outputs/demo
    python jobs/run.py --input rows.jsonl --output /abs/out --max-new-tokens 128

Reads JSONL or Parquet rows (`id` plus `messages` or `prompt`), sorts them by id into batches, hands
the batches to `workers.actor.DecodeWorker` actors through `ray.util.ActorPool`, and writes one
Parquet file per batch plus `summary.json` under the output directory. Starts a local Ray when none
is running; respects RAY_ADDRESS. See README.md for the options and the output schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Works from a checkout and from a `ray job submit --working-dir .` upload alike.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from pydantic import ValidationError  # noqa: E402

from jobs.config import JobConfig, build_config  # noqa: E402
from jobs.inputs import InputError, make_batches, read_rows  # noqa: E402
from jobs.output import prepare_output_dir, write_part, write_summary  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="jobs/run.py",
        description="Batch text generation with parallel prompt decoding on Ray actors. "
        "With no arguments, runs the embedded demo prompts through the default model.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML file with JobConfig values; flags override it")
    p.add_argument("--input", metavar="PATH", help="JSONL or Parquet file (or a directory of them); default: the demo")
    p.add_argument("--output", metavar="DIR", help="output directory (default: outputs/demo)")
    p.add_argument("--model", help="'default' (the packaged SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="'auto', 'cpu', 'cuda', 'cuda:0', ...")
    p.add_argument("--attn-implementation", choices=["sdpa", "eager"])
    p.add_argument("--cache-dir", metavar="DIR", help="where converted model weights are cached")
    p.add_argument("--decoding", choices=["ppd", "vanilla"], help="decoding method (default: ppd)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="most new tokens per row (default: 64)")
    p.add_argument("--prompts", metavar="PATH", help="prompt-token artifact directory, 'untrained', or 'auto' "
                   "(default: the artifact shipped for the model, else untrained)")
    p.add_argument("--tree-nodes", type=int, metavar="N", help="fix the tree to N candidate nodes (trained prompts)")
    p.add_argument("--profile-budget-s", type=float, metavar="S",
                   help="seconds each worker may spend profiling its device (default: 60 CPU, 30 GPU)")
    p.add_argument("--num-prompt-tokens", type=int, metavar="K", help="k when prompt tokens come from embeddings")
    p.add_argument("--batch-size", type=int, metavar="N", help="rows per batch (default: 8)")
    p.add_argument("--num-workers", type=int, metavar="N", help="decode actors (default: 1)")
    p.add_argument("--num-cpus-per-worker", type=float, metavar="N", help="CPUs per actor (default: all / workers)")
    p.add_argument("--num-gpus-per-worker", type=float, metavar="N", help="GPUs per actor (default: 0)")
    return p.parse_args(argv)


def _cpus_per_worker(num_workers: int) -> float:
    """The biggest node's CPUs shared among the workers (at least 1)."""
    import ray

    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return float(max(1, int(max(node_cpus, default=1)) // num_workers))


def describe_worker(info: dict[str, Any]) -> str:
    """One line per worker: its device and the tree it chose."""
    line = f"worker {info['pid']} on {info['device']}: {info['decoding']}"
    if info.get("tree_hash"):
        line += f", tree {info['tree_hash']} ({info.get('tree', '')}"
        if "tree_slots" in info:
            line += f", {info['tree_slots']} slots per row at batch {info['batch_size']}"
        line += ")"
    if info.get("predicted_tau"):
        line += f", predicted tau {info['predicted_tau']:.2f}"
    if info.get("predicted_speedup"):
        line += f", predicted {info['predicted_speedup']:.2f}x over plain decoding; profile {info['profile']}"
    return line


def run_job(cfg: JobConfig, rows: list[dict]) -> dict[str, Any]:
    """Decode `rows` on Ray actors, write the Parquet parts and summary.json; return the summary."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from workers.actor import remote_worker

    started = time.perf_counter()
    out_dir = Path(cfg.output).resolve()
    prepare_output_dir(out_dir)
    batches = make_batches(rows, cfg.batch_size)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    we_started_ray = not ray.is_initialized()
    if we_started_ray:
        ray.init()  # connects to RAY_ADDRESS / a running cluster, else starts a local one
    actors = []
    try:
        num_workers = min(cfg.workers.num_workers, len(batches))
        cpus = cfg.workers.num_cpus_per_worker or _cpus_per_worker(num_workers)
        worker_cls = remote_worker(
            num_cpus=cpus,
            num_gpus=cfg.workers.num_gpus_per_worker,
            max_restarts=cfg.workers.max_restarts,
            max_task_retries=cfg.workers.max_task_retries,
        )
        model_args, decoding_args = cfg.model.model_dump(), cfg.decoding.model_dump()
        actors = [
            worker_cls.remote(model_args, decoding_args, num_threads=max(1, int(cpus)), batch_size=cfg.batch_size)
            for _ in range(num_workers)
        ]
        infos = ray.get([a.ready.remote() for a in actors])
        for info in infos:
            print(describe_worker(info), flush=True)
        loaded = time.perf_counter()

        batch_index = {batch[0]["id"]: i for i, batch in enumerate(batches)}
        pool = ActorPool(actors)
        results = pool.map_unordered(lambda actor, batch: actor.process.remote(batch), batches)
        records: list[dict] = []
        worker_seconds = 0.0
        for batch_records in tqdm(results, total=len(batches), desc="batches", unit="batch", disable=None):
            write_part(out_dir, batch_index[batch_records[0]["id"]], batch_records)
            records.extend(batch_records)
            worker_seconds += max(r["latency_s"] for r in batch_records)
        decoded = time.perf_counter()
    finally:
        for actor in actors:
            ray.kill(actor)
        if we_started_ray:
            ray.shutdown()

    if sorted(r["id"] for r in records) != sorted(r["id"] for r in rows):
        raise RuntimeError("internal error: the results do not cover the input rows exactly once")
    ok = [r for r in records if r["error"] is None]
    output_tokens = sum(r["num_output_tokens"] for r in ok)
    steps = sum(r["num_steps"] for r in ok)
    decode_seconds = decoded - loaded
    summary = {
        "rows": len(records),
        "rows_ok": len(ok),
        "rows_failed": len(records) - len(ok),
        "output_tokens": output_tokens,
        "steps": steps,
        "mean_tau": output_tokens / steps if steps else 0.0,
        "decode_seconds": decode_seconds,
        "tokens_per_s": output_tokens / decode_seconds if decode_seconds > 0 else 0.0,
        "worker_decode_seconds": worker_seconds,
        "load_seconds": loaded - started,
        "wall_seconds": time.perf_counter() - started,
        "batches": len(batches),
        "num_workers": len(actors),
        "cpus_per_worker": cpus,
        "decoding": cfg.decoding.method,
        "model_id": infos[0]["model_id"],
        "model_hash": infos[0]["model_hash"],
        "device": infos[0]["device"],
        "dtype": infos[0]["dtype"],
        "workers": infos,
        "input": str(cfg.input_path()),
        "output_dir": str(out_dir),
        "config": cfg.model_dump(mode="json"),
    }
    write_summary(out_dir, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        cfg = build_config(args.config, overrides)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"error: bad configuration: {exc}", file=sys.stderr)
        return 2
    try:
        rows = read_rows(cfg.input_path())
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ray.exceptions import RayError

    try:
        summary = run_job(cfg, rows)
    except RayError as exc:  # e.g. a worker could not load the model
        print(f"error: the job failed on a Ray worker: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {summary['rows']} rows ({summary['rows_failed']} failed) to {summary['output_dir']}: "
        f"{summary['batches']} part-*.parquet files + summary.json; "
        f"{summary['output_tokens']} tokens in {summary['decode_seconds']:.1f} s "
        f"({summary['tokens_per_s']:.1f} tokens/s, mean tau {summary['mean_tau']:.2f}, {summary['decoding']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
