"""What the driver does per output row, with no model: simulated workers (Ray actors) return finished shards of
synthetic completions, and the driver handles them as a job does, through the pool (``jobs.pool.run_shards``),
the part writer with its index, and the progress tally. Reported: output rows per second through the driver,
and the driver process's CPU per row (``time.process_time``; the workers' CPU is theirs, even on shared cores).

    python -m jobs.bench.driver --rows 1000000 --part-rows 256           # local output
    python -m jobs.bench.driver --rows 200000 --part-rows 256 --s3       # a loopback S3 (moto's server)

``--path driver`` is today's: every record comes back to the driver, which writes every part. The last line
reads ``driver rows/s: N`` for the path run, on the output given.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from jobs.inputs import Shard
from jobs.output import PartIndex, write_part_summary
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
    """A decode worker without a model: ``process`` returns each row's synthetic completion after
    ``seconds_per_shard``, as a real worker's result."""

    def __init__(self, seconds_per_shard: float):
        self.seconds_per_shard = seconds_per_shard
        self.template = synthetic_record("")

    def ready(self) -> dict[str, Any]:
        return {"worker": f"sim pid {os.getpid()}", "device": "synthetic", "group": "default"}

    def process(self, rows: list[dict]) -> dict[str, Any]:
        time.sleep(self.seconds_per_shard)
        records = []
        for row in rows:
            record = copy.copy(self.template)
            record["id"] = row["id"]
            records.append(record)
        return {"records": records, "slots": None}


def shards(rows: int, part_rows: int):
    for index, start in enumerate(range(0, rows, part_rows)):
        yield Shard(index, [{"id": f"r{i:08d}", "prompt": "p"} for i in range(start, min(rows, start + part_rows))])


def run_driver_path(out_uri: str, rows: int, part_rows: int, workers: int, seconds_per_shard: float) -> dict:
    """Today's path: records through the driver, which writes the parts."""
    import ray

    from jobs.pool import Worker, run_shards

    actor = ray.remote(num_cpus=0)(SimulatedWorker)
    pool = [Worker(actor.remote(seconds_per_shard), "default", i) for i in range(workers)]
    out = resolve(out_uri)
    out.fs.create_dir(out.path, recursive=True)
    index = PartIndex(out)
    progress = Progress(rows, 0, interval_s=3600, stream=open(os.devnull, "w"))
    if rows <= part_rows:
        raise SystemExit("give more rows than --part-rows: the first part is not timed")
    done = first = 0
    cpu0 = wall0 = 0.0
    for shard, records, w in run_shards(pool, shards(rows, part_rows), max_attempts=1, config_hash="c",
                                        on_ready=lambda w: None, startup_timeout_s=120, prefetch=1):
        _, summary = write_part_summary(out, shard.index, records, index)
        progress.add_part(summary, group=w.group if w else None, device="synthetic", seconds=0.0)
        done += len(records)
        if not first:  # timed from the first part on: the workers' start-up is not the driver's cost
            first, cpu0, wall0 = done, time.process_time(), time.perf_counter()
    index.flush()
    counted = done - first
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    for w in pool:
        ray.kill(w.handle)
    return {"rows": done, "rows_per_s": counted / wall, "driver_cpu_us_per_row": 1e6 * cpu / counted,
            "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--part-rows", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seconds-per-shard", type=float, default=0.0,
                   help="how long a simulated worker takes per shard (0: as fast as the driver takes them)")
    p.add_argument("--path", choices=["driver"], default="driver", help="driver: today's, records through the driver")
    p.add_argument("--s3", action="store_true", help="write to a loopback S3 (moto's server) instead of a local dir")
    args = p.parse_args(argv)
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        if args.s3:
            out, server = loopback_s3()
        ray.init(num_cpus=max(2, args.workers), include_dashboard=False)
        try:
            result = run_driver_path(out, args.rows, args.part_rows, args.workers, args.seconds_per_shard)
        finally:
            ray.shutdown()
            if server is not None:
                server.terminate()
    where = "loopback S3" if args.s3 else "local"
    print(f"{args.path} path, {where} output: {result['rows']} rows in parts of {args.part_rows}, "
          f"{result['driver_cpu_us_per_row']:.1f} us of driver CPU per row, {result['wall_s']:.1f} s")
    print(f"driver rows/s: {result['rows_per_s']:.0f}")
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
    return "s3://bench-out/driver", server


if __name__ == "__main__":
    raise SystemExit(main())
