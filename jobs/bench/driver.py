"""What the driver does per output row, with no model: simulated workers (Ray actors) finish shards of
synthetic completions, and the driver handles them as a job does, through the pool (``jobs.pool.run_shards``),
the job's output (``jobs.job_output.JobOutput``: parts, their index) and the progress tally. Reported: the
driver process's CPU per output row (``time.process_time``, its Ray threads included; the workers' CPU is
theirs, even on shared cores), the rows one driver core sustains at that cost (``driver rows/s``), the rows per
second of wall time the run reached (bounded by the simulated workers on a small machine), and the driver's
peak memory.

    python -m jobs.bench.driver --rows 1000000 --part-rows 256                  # local output, workers write
    python -m jobs.bench.driver --rows 200000 --part-rows 256 --s3              # a loopback S3 (moto's server)
    python -m jobs.bench.driver --rows 1000000 --part-rows 256 --path driver    # every row through the driver

``--path workers`` (the job's): each worker publishes its shard's part and returns its name, size and summary.
``--path driver``: every record comes back to the driver, which writes every part (the job's path for workers
that cannot reach a local output). The last line reads ``driver rows/s: N`` for the path run, on the output
given.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from jobs.config import build_config
from jobs.inputs import iter_shards, plan_shards, scan_input
from jobs.job_output import JobOutput
from jobs.progress import Progress
from jobs.storage import resolve
from workers.records import RowOutput

COMPLETION_TOKENS = 256


def synthetic_record(row_id: str) -> dict[str, Any]:
    """A finished completion as a worker returns it: 256 tokens and the provenance columns filled in."""
    now = datetime.now(UTC)
    tokens = [(7 * i + 13) % 49152 for i in range(COMPLETION_TOKENS)]
    return RowOutput(id=row_id, output_text="x" * 4 * COMPLETION_TOKENS, output_token_ids=tokens,
                     num_output_tokens=COMPLETION_TOKENS, num_steps=COMPLETION_TOKENS // 2, tau=2.0, prompt_tokens=64,
                     finish_reason="length", latency_s=1.0, decoding="ppd", model_id="synthetic", model_hash="0" * 64,
                     prompts_hash="1" * 64, tree_hash="2" * 16, device="synthetic", dtype="float32",
                     numeric_path="synthetic", worker="sim/0", worker_group="default", config_hash="c",
                     started_at=now, finished_at=now).to_dict()


class SimulatedWorker:
    """A decode worker without a model: ``process`` finishes each row with a synthetic completion after
    ``seconds_per_shard`` and, given a writer, publishes the part as a real worker does (else returns the rows)."""

    def __init__(self, seconds_per_shard: float):
        self.seconds_per_shard = seconds_per_shard
        self.template = synthetic_record("")

    def ready(self) -> dict[str, Any]:
        return {"worker": f"sim pid {os.getpid()}", "device": "synthetic", "group": "default"}

    def process(self, rows: Any, writer: Any = None, shard_index: int = -1,
                keep_records: bool = False) -> dict[str, Any]:
        if not isinstance(rows, list):  # a jobs.inputs.ShardRead: read here, as a DecodeWorker does
            rows = rows.read()
        time.sleep(self.seconds_per_shard)
        records = []
        for row in rows:
            record = copy.copy(self.template)
            record["id"] = row["id"]
            records.append(record)
        if writer is None:
            return {"records": records, "slots": None}
        return {"part": writer.write(shard_index, records), "records": None, "slots": None}


def write_input(where: str, rows: int) -> None:
    """A JSONL input of ``rows`` short prompts."""
    resolve(where).write_bytes_atomically("".join(
        json.dumps({"id": f"r{i:08d}", "prompt": f"prompt {i}"}) + "\n" for i in range(rows)).encode())


def run_path(path: str, in_uri: str, out_uri: str, part_rows: int, workers: int, seconds_per_shard: float) -> dict:
    """One job's worth of shards through the driver: ``path`` "workers" (each reads its shard and publishes its
    part) or "driver" (the driver reads the rows and sends them, and the records come back and the driver
    writes them)."""
    import ray

    from jobs.pool import Worker, run_shards

    started = time.perf_counter()
    plan = scan_input(in_uri, part_rows)
    plan_s, rows = time.perf_counter() - started, plan.num_rows
    plan_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shards = plan_shards(plan) if path == "workers" else iter_shards(plan)
    actor = ray.remote(num_cpus=0)(SimulatedWorker)
    pool = [Worker(actor.remote(seconds_per_shard), "default", i) for i in range(workers)]
    output = JobOutput(build_config(None, {"output": out_uri}))
    output.location.make_dir()
    writer = output.writer if path == "workers" else None
    progress = Progress(rows, 0, interval_s=3600, stream=open(os.devnull, "w"))
    if rows <= part_rows:
        raise SystemExit("give more rows than --part-rows: the first part is not timed")
    done = first = 0
    cpu0 = wall0 = 0.0
    rss0 = 0
    for shard, result, w in run_shards(pool, shards, max_attempts=1, config_hash="c", on_ready=lambda w: None,
                                       startup_timeout_s=120, prefetch=1,
                                       submit=lambda w, s: w.handle.process.remote(s.rows or s.read, writer, s.index)):
        part = output.take(shard.index, result)
        progress.add_part(part.summary, group=w.group if w else None, device="synthetic", seconds=0.0)
        done += part.summary["rows"]
        if not first:  # timed from the first part on: the workers' start-up is not the driver's cost
            first, cpu0, wall0 = done, time.process_time(), time.perf_counter()
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    output.flush()
    counted = done - first
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for w in pool:
        ray.kill(w.handle)
    return {"rows": done, "wall_rows_per_s": counted / wall, "driver_cpu_us_per_row": 1e6 * cpu / counted,
            "driver_rows_per_s": counted / cpu, "wall_s": wall, "plan_s": plan_s, "plan_rss_mb": plan_rss / 1024,
            "peak_rss_mb": rss / 1024, "rss_growth_mb": (rss - rss0) / 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--part-rows", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seconds-per-shard", type=float, default=0.0,
                   help="how long a simulated worker takes per shard (0: as fast as the driver takes them)")
    p.add_argument("--path", choices=["workers", "driver"], default="workers",
                   help="workers: each publishes its parts (the job's); driver: every record through the driver")
    p.add_argument("--s3", action="store_true", help="write to a loopback S3 (moto's server) instead of a local dir")
    args = p.parse_args(argv)
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out")
        if args.s3:
            server = loopback_s3()
            src, out = "s3://bench-out/in.jsonl", "s3://bench-out/out"
        write_input(src, args.rows)
        ray.init(num_cpus=max(2, args.workers), include_dashboard=False)
        try:
            result = run_path(args.path, src, out, args.part_rows, args.workers, args.seconds_per_shard)
        finally:
            ray.shutdown()
            if server is not None:
                server.terminate()
    where = "loopback S3" if args.s3 else "local"
    print(f"{args.path} path, {where} input and output: {result['rows']} rows in parts of {args.part_rows}, planned "
          f"in {result['plan_s']:.1f} s (driver peak RSS {result['plan_rss_mb']:.0f} MB); "
          f"{result['driver_cpu_us_per_row']:.2f} us of driver CPU per row; {result['wall_rows_per_s']:.0f} rows/s "
          f"of wall time over {result['wall_s']:.1f} s; driver peak RSS {result['peak_rss_mb']:.0f} MB "
          f"(+{result['rss_growth_mb']:.0f} MB after the first part)")
    print(f"driver rows/s: {result['driver_rows_per_s']:.0f}")
    return 0


def loopback_s3():
    """A moto S3 server on loopback, in its own process (so that its CPU is not counted as the driver's), with a
    bucket; its endpoint and throwaway credentials go in the environment."""
    import socket
    import subprocess
    import sys

    import pyarrow.fs as pafs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    for _ in range(100):  # the server takes a moment to listen
        try:
            fs.create_dir("bench-out")
            break
        except OSError:
            time.sleep(0.1)
    return server


if __name__ == "__main__":
    raise SystemExit(main())
