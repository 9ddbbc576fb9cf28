#!/usr/bin/env python3
"""The driver's cost before any decoding: ``jobs/run.py --plan-only`` on generated inputs of millions of rows.

    python -m jobs.bench.inputs --rows 10000000 --dir /tmp/bench-inputs

Writes (once; reused when present) a Parquet file and a JSONL file of ``--rows`` short chat rows, and an output
directory holding every row as written parts (``--shard-size`` rows each, footers as a job writes them). Then
runs ``--plan-only`` in a fresh process per case, reading its JSON line: the input scan's and the output
scan's seconds, and the process's peak RSS. Cases: each input against an empty output (a first run), and the
Parquet input against the full output (a resume). Targets: a plan at most 120 s and 1 GB; a resume scan of
10M rows at most 60 s and 1 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
CHUNK = 1_000_000


def row_ids(start: int, stop: int) -> list[str]:
    return [f"row-{i:010d}" for i in range(start, stop)]


def messages(start: int, stop: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a short poem about the number {i} and the sea."}]
            for i in range(start, stop)]


def write_inputs(root: Path, rows: int) -> tuple[Path, Path]:
    parquet, jsonl = root / f"in-{rows}.parquet", root / f"in-{rows}.jsonl"
    if not parquet.exists():
        tmp = parquet.with_suffix(".tmp")
        with pq.ParquetWriter(tmp, pa.schema([("id", pa.string()), ("messages", pa.list_(pa.struct(
                [("role", pa.string()), ("content", pa.string())])))])) as writer:
            for start in range(0, rows, CHUNK):
                stop = min(rows, start + CHUNK)
                writer.write_table(pa.table({"id": row_ids(start, stop), "messages": messages(start, stop)}),
                                   row_group_size=CHUNK // 8)
        tmp.rename(parquet)
    if not jsonl.exists():
        tmp = jsonl.with_suffix(".tmp")
        with tmp.open("w") as f:
            for start in range(0, rows, CHUNK):
                stop = min(rows, start + CHUNK)
                f.writelines(json.dumps({"id": i, "messages": m}) + "\n"
                             for i, m in zip(row_ids(start, stop), messages(start, stop)))
        tmp.rename(jsonl)
    return parquet, jsonl


def write_full_output(out: Path, rows: int, shard_size: int, with_index: bool) -> Path:
    """Every row written as a job writes it: one part per shard, its summary in the footer, and (``with_index``)
    the index files a job's driver publishes (jobs/output.PartIndex), or none (a resume from footers alone)."""
    import shutil

    from jobs.config import build_config
    from jobs.output import OUTPUT_SCHEMA, PART_META, PartIndex, WrittenPart, part_name, part_summary, shard_of
    from jobs.resume import check_manifest
    from jobs.storage import resolve

    base = out.parent / f"{out.name}-footers"  # the parts, written once
    if not (base / "complete").exists():
        base.mkdir(parents=True, exist_ok=True)
        check_manifest(resolve(base), build_config(None, {"output": str(base)}), write=True)
        for index, start in enumerate(range(0, rows, shard_size)):
            ids = row_ids(start, min(rows, start + shard_size))
            columns = {"id": pa.array(ids), "sample_index": pa.array([0] * len(ids), pa.int32())}
            table = pa.table([columns.get(f.name, pa.array([None] * len(ids), f.type)) for f in OUTPUT_SCHEMA],
                             schema=OUTPUT_SCHEMA)
            table = table.replace_schema_metadata({PART_META: json.dumps(part_summary(table)).encode()})
            pq.write_table(table, base / part_name(index))
        (base / "complete").write_text("")
    if not with_index:
        return base
    if not (out / "complete").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in base.iterdir():
            if f.name != "complete":
                (out / f.name).symlink_to(f) if f.name.startswith("part-") else shutil.copy(f, out / f.name)
        index = PartIndex(resolve(out))
        for part in sorted(f.name for f in base.iterdir() if f.name.startswith("part-")):
            start = shard_of(part) * shard_size
            ids = row_ids(start, min(rows, start + shard_size))
            index.add(WrittenPart(part, (base / part).stat().st_size,
                                  {"ids": ids, "rows": len(ids), "failed": 0, "retry": []}))
        index.flush()
        (out / "complete").write_text("")
    return out


def plan_only(input_path: Path, out: Path, shard_size: int) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "run.py"), "--plan-only", "--input", str(input_path),
                           "--output", str(out), "--shard-size", str(shard_size)],
                          cwd=REPO, capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_s"] = round(time.perf_counter() - started, 2)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.inputs", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--dir", type=Path, default=Path("/tmp/bench-inputs"))
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parquet, jsonl = write_inputs(args.dir, args.rows)
    footers = write_full_output(args.dir / f"out-{args.rows}-{args.shard_size}", args.rows, args.shard_size, False)
    indexed = write_full_output(args.dir / f"out-{args.rows}-{args.shard_size}", args.rows, args.shard_size, True)
    print(f"inputs and output ready in {time.perf_counter() - t0:.0f} s: {parquet.stat().st_size / 1e6:.0f} MB "
          f"Parquet, {jsonl.stat().st_size / 1e6:.0f} MB JSONL", flush=True)
    empty = args.dir / "empty-output"
    cases = [("parquet, first run", parquet, empty), ("jsonl, first run", jsonl, empty),
             ("parquet, resume (every row written, a job's index files)", parquet, indexed),
             ("parquet, resume (every row written, footers only)", parquet, footers)]
    for name, source, out in cases:
        r = plan_only(source, out, args.shard_size)
        print(f"{name}: input scan {r['input_scan_s']} s, output scan {r['output_scan_s']} s ({r['parts']} parts), "
              f"in all {r['seconds']} s ({r['wall_s']} s with start-up), peak RSS {r['peak_rss_mb']} MB; "
              f"{r['rows']} rows, {r['shards_to_decode']} of {r['shards']} shards to decode", flush=True)


if __name__ == "__main__":
    main()
