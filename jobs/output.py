"""Writing the job's results: Parquet parts with an explicit schema, and summary.json.

Every file is written under a temporary name and renamed into place, so a file with a final name is always
complete; what a killed run leaves behind is a `*.tmp` file, which the next run deletes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ERROR_TYPE = pa.struct([pa.field("code", pa.string(), nullable=False), pa.field("message", pa.string())])
TIMESTAMP = pa.timestamp("us", tz="UTC")
SAMPLING_TYPE = pa.struct([
    pa.field("temperature", pa.float64()), pa.field("top_p", pa.float64()), pa.field("top_k", pa.int32()),
    pa.field("max_new_tokens", pa.int32()), pa.field("stop", pa.list_(pa.string())), pa.field("seed", pa.int64()),
    pa.field("n", pa.int32()),
])

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),  # one row per completion: (id, sample_index)
        # Results.
        pa.field("output_text", pa.string()),
        pa.field("output_token_ids", pa.list_(pa.int32())),
        pa.field("num_output_tokens", pa.int32()),
        pa.field("num_steps", pa.int32()),
        pa.field("tau", pa.float64()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("stop_reason", pa.string()),
        pa.field("error", ERROR_TYPE),  # null, or {code (workers.records.ErrorCode), message}
        pa.field("latency_s", pa.float64()),
        # Provenance.
        pa.field("decoding", pa.string()),
        pa.field("sampling_params", SAMPLING_TYPE),  # the effective parameters, seed resolved
        pa.field("model_id", pa.string()),
        pa.field("model_hash", pa.string()),
        pa.field("prompts_hash", pa.string()),
        pa.field("tree_hash", pa.string()),
        pa.field("device", pa.string()),
        pa.field("dtype", pa.string()),
        pa.field("numeric_path", pa.string()),  # the kernels: device, dtype, attention, linear layers
        pa.field("batch_fallback", pa.bool_()),  # its batch failed and it was decoded alone
        pa.field("worker", pa.string()),
        pa.field("worker_group", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("started_at", TIMESTAMP),
        pa.field("finished_at", TIMESTAMP),
    ]
)
PART_GLOB = "part-*.parquet"
SUMMARY = "summary.json"


def part_name(shard_index: int, ids: list[str]) -> str:
    """`part-{shard}-{digest of its ids}.parquet`: a resumed run whose input grew never reuses a name."""
    digest = hashlib.sha256("\0".join(dict.fromkeys(ids)).encode()).hexdigest()[:8]
    return f"part-{shard_index:05d}-{digest}.parquet"


def replace_atomically(final: Path, write) -> Path:
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:  # on disk before the rename makes it count as done
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def write_part(out_dir: Path, shard_index: int, records: list[dict[str, Any]]) -> Path:
    """Write one shard's records, atomically (temp name, then rename)."""
    table = pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA)
    final = out_dir / part_name(shard_index, [r["id"] for r in records])
    return replace_atomically(final, lambda tmp: pq.write_table(table, tmp))


def write_json(path: Path, data: dict[str, Any]) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    return replace_atomically(path, lambda tmp: tmp.write_text(text))


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    return write_json(out_dir / SUMMARY, summary)


def read_output(out_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All the parts of a run as one table (in id order, then sample_index)."""
    parts = sorted(Path(out_dir).glob(PART_GLOB))
    schema = OUTPUT_SCHEMA if columns is None else pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
    tables = [pq.read_table(p, schema=schema, columns=columns) for p in parts]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    keys = [("id", "ascending")] + ([("sample_index", "ascending")] if "sample_index" in table.column_names else [])
    return table.sort_by(keys)
