"""Writing the job's results: Parquet parts with an explicit schema, and summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("output_text", pa.string()),
        pa.field("output_token_ids", pa.list_(pa.int32())),
        pa.field("num_output_tokens", pa.int32()),
        pa.field("num_steps", pa.int32()),
        pa.field("tau", pa.float64()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("error", pa.string()),
        pa.field("decoding", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("latency_s", pa.float64()),
        pa.field("device", pa.string()),
        pa.field("tree_hash", pa.string()),
    ]
)
PART_GLOB = "part-*.parquet"
SUMMARY = "summary.json"


def prepare_output_dir(out_dir: Path) -> None:
    """Create the directory and remove what an earlier run of the job left there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(PART_GLOB), out_dir / SUMMARY]:
        stale.unlink(missing_ok=True)


def write_part(out_dir: Path, index: int, records: list[dict[str, Any]]) -> Path:
    """Write one batch's records as `part-{index}.parquet`, atomically (temp name, then rename)."""
    table = pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA)
    final = out_dir / f"part-{index:05d}.parquet"
    tmp = final.with_name(final.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    final = out_dir / SUMMARY
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, final)
    return final


def read_output(out_dir: str | Path) -> pa.Table:
    """All the parts of a finished run as one table (in id order)."""
    parts = sorted(Path(out_dir).glob(PART_GLOB))
    table = pa.concat_tables([pq.read_table(p, schema=OUTPUT_SCHEMA) for p in parts]) if parts else OUTPUT_SCHEMA.empty_table()
    return table.sort_by("id")
