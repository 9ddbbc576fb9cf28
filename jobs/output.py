"""Writing the job's results: Parquet parts with an explicit schema, and summary.json, in a local directory or
under an object-store prefix (jobs/storage.py).

Every file is written under a temporary name and published whole (``Location.write_atomically``), so a file
with a final name is always complete; what a killed run leaves behind is a ``*.tmp`` file, which the next run
deletes. Each part carries in its footer's key-value metadata (``PART_META``) its ids, its row counts and the
ids of its rows a rerun retries: a resume reads footers, never row data. A footer costs ~250 µs to parse (a
GET on an object store), so the driver also publishes ``index-*.json`` files, each the summaries of up to
``INDEX_PARTS`` parts it accepted (``PartIndex``): a resume reads those, and footers only for parts no index
covers (a killed driver's last few, a dead worker's unreported one). A part is never changed under its name
(every write takes a new random name), so an index entry is either right or names a part that is gone (then
ignored); one whose size no longer matches the part's is ignored too, and that part's footer read.

Who writes a part: a ``PartWriter`` (picklable: the output's URI as given, and its format), in a worker
(jobs/job_output.py decides which) or in the driver. It returns a ``WrittenPart`` (name, size, summary), which
is all the driver needs of the part.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.storage import Location, resolve, resolve_cached
from workers.records import ErrorCode, RowOutput

ERROR_TYPE = pa.struct([pa.field("code", pa.string(), nullable=False), pa.field("message", pa.string())])
TIMESTAMP = pa.timestamp("us", tz="UTC")
SAMPLING_TYPE = pa.struct([
    pa.field("temperature", pa.float64()), pa.field("top_p", pa.float64()), pa.field("top_k", pa.int32()),
    pa.field("max_new_tokens", pa.int32()), pa.field("stop", pa.list_(pa.string())), pa.field("seed", pa.int64()),
    pa.field("n", pa.int32()),
])

REQUEST_TYPE = pa.struct([pa.field("endpoint", pa.string()), pa.field("model", pa.string()), pa.field("n", pa.int32())])

# RowOutput's column types, by the names workers/records.py gives them.
ARROW_TYPES = {
    "string": pa.string(), "int32": pa.int32(), "float64": pa.float64(), "bool": pa.bool_(),
    "list<int32>": pa.list_(pa.int32()), "timestamp": TIMESTAMP, "error": ERROR_TYPE, "sampling": SAMPLING_TYPE,
    "request": REQUEST_TYPE,
}
OUTPUT_SCHEMA = pa.schema([pa.field(f.name, ARROW_TYPES[f.metadata["arrow"]], nullable=f.metadata["nullable"])
                           for f in fields(RowOutput)])
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
SUMMARY = "summary.json"
PART_META = b"ppd_batch.part"  # footer key: {"ids", "rows", "failed", "retry"} (see part_summary)
# Errors a rerun retries: the row itself may be fine.
RETRYABLE = {ErrorCode.WORKER_DIED.value}


INDEX_PREFIX, INDEX_SUFFIX = "index-", ".json"
INDEX_PARTS = 256  # parts an index file covers


def is_index(name: str) -> bool:
    return name.startswith(INDEX_PREFIX) and name.endswith(INDEX_SUFFIX)


@dataclass(frozen=True)
class WrittenPart:
    """A part as published: its name, its size in bytes (an index entry whose size no longer matches is not
    trusted), and its summary (``part_summary``)."""

    name: str
    bytes: int
    summary: dict[str, Any]


class PartIndex:
    """The summaries of the parts accepted, published as an index file every ``INDEX_PARTS`` parts and on
    ``flush``."""

    def __init__(self, out: Location, every: int = INDEX_PARTS):
        self.out, self.every = out, every
        self.pending: dict[str, dict[str, Any]] = {}

    def add(self, part: WrittenPart) -> None:
        self.pending[part.name] = {**part.summary, "bytes": part.bytes}
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        names = sorted(self.pending)
        digest = hashlib.sha256("\0".join(names).encode()).hexdigest()[:12]
        write_json(self.out.child(f"{INDEX_PREFIX}{digest}{INDEX_SUFFIX}"), {"parts": self.pending})
        self.pending = {}


def is_part(name: str) -> bool:
    return name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)


def part_name(shard_index: int) -> str:
    """`part-{shard}-{random}.parquet`: every write a new name, so a part never changes under its name (an index
    entry is right or names a part that is gone) and no run overwrites another's part."""
    return f"{PART_PREFIX}{shard_index:05d}-{secrets.token_hex(6)}{PART_SUFFIX}"


def error_codes(table: pa.Table) -> list[str | None]:
    """Each output row's error code (None: no error)."""
    return [e["code"] if e else None for e in table.column("error").to_pylist()]


def part_summary(table: pa.Table) -> dict[str, Any]:
    """What a resume needs of a part: its ids (each once, in order), its rows (completions) and failed rows,
    and the ids whose rows a rerun retries; and, when the table has the columns, what the progress line and
    summary.json count of it (``tally``: the decoded rows' output tokens and steps, and the rows decoded alone
    after their batch failed), so that they need not see its rows."""
    ids = table.column("id").to_pylist()
    codes = error_codes(table)
    summary: dict[str, Any] = {
        "ids": list(dict.fromkeys(ids)), "rows": len(ids), "failed": sum(c is not None for c in codes),
        "retry": list(dict.fromkeys(i for i, c in zip(ids, codes) if c in RETRYABLE))}
    if {"num_output_tokens", "num_steps", "batch_fallback"} <= set(table.column_names):
        ok = pc.is_null(table.column("error"))
        summary["tally"] = {
            "output_tokens": int(pc.sum(pc.if_else(ok, table.column("num_output_tokens"), 0)).as_py() or 0),
            "steps": int(pc.sum(pc.if_else(ok, table.column("num_steps"), 0)).as_py() or 0),
            "batch_fallback": int(pc.sum(pc.cast(table.column("batch_fallback"), pa.int64())).as_py() or 0)}
    return summary


def write_table(out: Location, shard_index: int, table: pa.Table) -> WrittenPart:
    """A part of shard ``shard_index``: ``table`` with its ``part_summary`` in the footer (and the writing
    process, ``writer``: which worker or driver published it), published atomically under a new name
    (``part_name``)."""
    summary = {**part_summary(table), "writer": f"pid {os.getpid()} on {socket.gethostname()}"}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), PART_META: json.dumps(summary).encode()})
    location = out.child(part_name(shard_index))
    size: list[int] = []

    def write(tmp: Location) -> None:
        pq.write_table(table, tmp.path, filesystem=tmp.fs)
        size.append(tmp.info().size)

    location.write_atomically(write)
    return WrittenPart(location.name, size[0], summary)


def shard_of(part_name: str) -> int:
    return int(part_name[len(PART_PREFIX):].split("-", 1)[0])


@dataclass(frozen=True)
class PartWriter:
    """Writes shards' parts into one output: the driver's, or a worker's (it is pickled to the worker, so it
    holds the output as ``where``, jobs/storage.Location.source, and resolves it there; credentials come from the
    writer's own environment). With ``output_format`` "openai-batch", each part's result lines are published
    beside it (jobs/openai_batch.py). ``node_id``: the Ray node whose disk a local ``where`` is on (None: any
    node reaches it), which a worker checks before it writes."""

    where: str
    output_format: str = "parquet"
    node_id: str | None = None

    def write(self, shard_index: int, records: list[dict[str, Any]]) -> WrittenPart:
        """One shard's records as a part (atomically, with its summary in the footer)."""
        out = resolve_cached(self.where)
        part = write_table(out, shard_index, pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA))
        if self.output_format == "openai-batch":
            from jobs.openai_batch import write_results

            write_results(out, part.name, records)
        return part


def write_part(out: Location | str | Path, shard_index: int, records: list[dict[str, Any]],
               index: PartIndex | None = None) -> Location:
    """Write one shard's records as a part (atomically, with its summary in the footer, and in ``index``)."""
    out = _location(out)
    part = write_table(out, shard_index, pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA))
    if index is not None:
        index.add(part)
    return out.child(part.name)


def read_part_summary(part: Location) -> dict[str, Any]:
    """A part's summary from its footer (one small read), or from its id and error columns for a part written
    before footers carried it. Raises OSError or ValueError for a file that is not a readable part."""
    with part.fs.open_input_file(part.path) as f:
        parquet = pq.ParquetFile(f)
        meta = parquet.schema_arrow.metadata or {}
        if PART_META in meta:
            return json.loads(meta[PART_META])
        return part_summary(parquet.read(columns=["id", "error"]))


def parts(out: Location) -> list[Location]:
    return [f for f in out.files() if is_part(f.name)]


def write_json(location: Location, data: dict[str, Any]) -> Location:
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    return location.write_bytes_atomically(text.encode())


def read_json(location: Location) -> dict[str, Any]:
    return json.loads(location.read_bytes())


def write_summary(out: Location | str | Path, summary: dict[str, Any]) -> Location:
    return write_json(_location(out).child(SUMMARY), summary)


def _location(out: Location | str | Path) -> Location:
    return out if isinstance(out, Location) else resolve(out)


def read_output(out: Location | str | Path, columns: list[str] | None = None) -> pa.Table:
    """All the parts of a run as one table (in id order, then sample_index)."""
    out = _location(out)
    schema = OUTPUT_SCHEMA if columns is None else pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
    tables = [pq.read_table(p.path, filesystem=p.fs, schema=schema, columns=columns) for p in parts(out)]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    keys = [("id", "ascending")] + ([("sample_index", "ascending")] if "sample_index" in table.column_names else [])
    return table.sort_by(keys)
