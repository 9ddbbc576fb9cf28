"""The job's input: JSONL or Parquet files (one, or a directory of them), local or in object storage, read as
streams and never held whole.

Contract:
- ``scan_input`` reads every row's id once, checks it, and plans the shards: each file's rows, in order, cut
  every ``shard_size`` rows (a shard never spans two files). The cut depends only on the files (listed by
  name) and their rows, so a resumed run re-forms exactly the shards of the first, with no global sort.
- Problems that make the input unusable raise ``InputError`` before any work starts, naming the file and the
  line (JSONL) or row (Parquet): a malformed JSONL line, a row without a usable id, a duplicate id (naming
  both places), an unreadable file. A row's own content (no prompt, wrong types) is left to the workers,
  which report it in that row's ``error`` column.
- The plan holds the ids as 16-byte digests (jobs/idset.py): 10M rows take ~250 MB once indexed.
- ``iter_shards`` reads the rows again, shard by shard, as the pool asks for them, and checks each shard's
  ids against the plan (an input changed mid-job is an error, not a silent mix).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.idset import DigestIndex, id_digests
from jobs.openai_batch import is_request, request_to_row
from jobs.storage import Location, StorageError, resolve

KEPT_FIELDS = ("id", "messages", "prompt", "sampling_params")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
BATCH_ROWS = 65_536  # rows per Parquet record batch and per digest chunk
READ_BYTES = 8 << 20  # JSONL block size


class InputError(ValueError):
    """The input cannot be used as a whole."""


InputFormat = Literal["auto", "native", "openai-batch"]


@dataclass(frozen=True)
class InputFile:
    location: Location
    format: str  # "jsonl", "parquet" or "openai-batch" (JSONL of Batch API requests: jobs/openai_batch.py)


def input_files(where: str, input_format: InputFormat = "auto") -> list[InputFile]:
    """The input's files: ``where`` itself, or the .jsonl/.json/.parquet files directly in it, by name. A JSONL
    file holds OpenAI Batch API requests with ``input_format`` "openai-batch", or, "auto", when its first line
    is one (every line must then be)."""
    return [_with_format(f, input_format) for f in _files(where)]


def _with_format(f: InputFile, input_format: InputFormat) -> InputFile:
    if f.format == "parquet":
        if input_format == "openai-batch":
            raise InputError(f"{f.location.uri}: an OpenAI batch input is JSONL, not Parquet")
        return f
    if input_format == "openai-batch" or (input_format == "auto"
                                          and is_request(next(_jsonl_objects(f), (0, {}))[1])):
        return InputFile(f.location, "openai-batch")
    return f


def _files(where: str) -> list[InputFile]:
    try:
        location = resolve(where)
        kind = location.info().type.name
    except (StorageError, OSError) as exc:
        raise InputError(str(exc)) from None
    if kind == "Directory":
        files = [InputFile(f, SUFFIXES[s]) for f in location.files() if (s := _suffix(f.name)) in SUFFIXES]
        if not files:
            raise InputError(f"{location.uri}: no .jsonl or .parquet files in this directory")
        return files
    if kind == "NotFound":
        raise InputError(f"{location.uri}: no such file")
    if _suffix(location.name) not in SUFFIXES:
        raise InputError(f"{location.uri}: unknown input format (expected .jsonl or .parquet)")
    return [InputFile(location, SUFFIXES[_suffix(location.name)])]


def _suffix(name: str) -> str:
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


# -- reading one file -------------------------------------------------------------------------------------------
def _jsonl_objects(f: InputFile) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    uri = f.location.uri
    try:
        stream = f.location.fs.open_input_stream(f.location.path)
    except OSError as exc:
        raise InputError(f"{uri}: cannot read: {exc}") from None
    lineno, tail = 0, b""
    with stream:
        while True:
            try:
                block = stream.read(READ_BYTES)
            except OSError as exc:
                raise InputError(f"{uri}: cannot read: {exc}") from None
            lines = (tail + block).split(b"\n")
            tail = lines.pop() if block else b""
            for line in lines:
                lineno += 1
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    detail = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else exc
                    raise InputError(f"{uri}: line {lineno}: malformed JSON: {detail}") from None
                if not isinstance(value, dict):
                    raise InputError(f"{uri}: line {lineno}: expected a JSON object, got {type(value).__name__}")
                yield lineno, value
            if not block:
                return


def _parquet_batches(f: InputFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
    try:
        handle = f.location.fs.open_input_file(f.location.path)
    except OSError as exc:
        raise InputError(f"{f.location.uri}: cannot read: {exc}") from None
    with handle:  # closed when the generator ends or is dropped
        try:
            parquet = pq.ParquetFile(handle)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=present)
        except Exception as exc:  # noqa: BLE001 - any read failure is an input error
            raise InputError(f"{f.location.uri}: cannot read Parquet: {exc}") from None


def _check_id(where: str, row_id: Any) -> str:
    if row_id is None:
        raise InputError(f"{where}: row has no 'id'")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise InputError(f"{where}: 'id' must be a string or an integer, got {type(row_id).__name__}")
    if isinstance(row_id, str) and not row_id.strip():
        raise InputError(f"{where}: 'id' is empty")
    if isinstance(row_id, str) and not row_id.isascii():
        try:
            row_id.encode()
        except UnicodeEncodeError:
            raise InputError(f"{where}: 'id' is not valid Unicode (a lone surrogate)") from None
    return str(row_id)


def _parquet_ids(f: InputFile, batch: pa.RecordBatch, first_row: int) -> list[str]:
    """The batch's ids as strings, checked as a column (the first bad row named)."""
    uri = f.location.uri
    if "id" not in batch.schema.names:
        raise InputError(f"{uri}: row {first_row}: row has no 'id'")
    ids = batch.column("id")
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    is_text = pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
    bad = ids.is_null()
    if is_text:
        bad = pc.or_(bad, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(ids)), 0).fill_null(True))
    elif not pa.types.is_integer(ids.type):
        bad = pa.array([True] * len(ids))  # every value is missing or of a wrong type
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        _check_id(f"{uri}: row {first_row + i}", ids[i].as_py())
    values = ids.to_pylist()
    return values if is_text else [str(v) for v in values]


def _request(f: InputFile, lineno: int, value: dict) -> dict:
    """A Batch API request line, checked to be one."""
    if not is_request(value):
        raise InputError(f"{f.location.uri}: line {lineno}: not an OpenAI batch request (it needs 'custom_id' and "
                         "'body'), in a file read as OpenAI batch requests (--input-format)")
    return value


def file_ids(f: InputFile) -> Iterator[list[str]]:
    """The file's ids in order, checked, in chunks."""
    if f.format == "parquet":
        row = 0
        for batch in _parquet_batches(f, ["id"]):
            yield _parquet_ids(f, batch, row)
            row += batch.num_rows
        return
    chunk = []
    key = "custom_id" if f.format == "openai-batch" else "id"
    for lineno, value in _jsonl_objects(f):
        if f.format == "openai-batch":
            _request(f, lineno, value)
        chunk.append(_check_id(f"{f.location.uri}: line {lineno}", value.get(key)))
        if len(chunk) == BATCH_ROWS:
            yield chunk
            chunk = []
    yield chunk


def file_rows(f: InputFile) -> Iterator[dict]:
    """The file's rows in order: ``id`` (a string) and whichever of the other KEPT_FIELDS they have."""
    uri = f.location.uri
    if f.format == "parquet":
        i = 0
        for batch in _parquet_batches(f, list(KEPT_FIELDS)):
            for row in batch.to_pylist():
                row["id"] = _check_id(f"{uri}: row {i}", row.get("id"))
                i += 1
                yield row
        return
    for lineno, value in _jsonl_objects(f):
        if f.format == "openai-batch":
            row = request_to_row(_request(f, lineno, value))
        else:
            row = {key: value[key] for key in KEPT_FIELDS if key in value}
        row["id"] = _check_id(f"{uri}: line {lineno}", row.get("id"))
        yield row


def locate(f: InputFile, row: int) -> str:
    """Where the file's ``row``-th row (from 0) is: its line for JSONL, its row for Parquet."""
    if f.format == "parquet":
        return f"{f.location.uri}: row {row}"
    for i, (lineno, _) in enumerate(_jsonl_objects(f)):
        if i == row:
            return f"{f.location.uri}: line {lineno}"
    raise AssertionError(f"{f.location.uri} has fewer than {row + 1} rows")


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass
class Shard:
    """A unit of work and of output: up to ``shard_size`` consecutive rows of one file, less those written."""

    index: int  # position among the input's shards
    rows: list[dict]
    attempts: int = 0  # workers that died while decoding it
    deaths: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]


@dataclass
class InputPlan:
    uri: str
    files: list[InputFile]
    file_rows: list[int]  # rows per file
    shard_size: int
    index: DigestIndex  # every row's id; positions are global row numbers (files in order)

    @property
    def num_rows(self) -> int:
        return len(self.index)

    def file_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.file_rows)]).astype(np.int64)

    def shard_bounds(self) -> list[tuple[int, int]]:
        """Every shard's global rows [start, stop), in order (a shard's index is its place in this list)."""
        bounds = []
        for start, rows in zip(self.file_starts(), self.file_rows):
            bounds += [(int(start + s), int(start + min(s + self.shard_size, rows)))
                       for s in range(0, rows, self.shard_size)]
        return bounds

    def where(self, row: int) -> str:
        """The file and line (or row) of global row ``row``."""
        i = int(np.searchsorted(self.file_starts(), row, side="right")) - 1
        return locate(self.files[i], row - int(self.file_starts()[i]))


def scan_input(where: str, shard_size: int, input_format: InputFormat = "auto") -> InputPlan:
    """Read every id of the input once, check them all, and plan its shards (see the module's contract)."""
    assert shard_size >= 1
    files = input_files(where, input_format)
    digests, counts = bytearray(), []
    for f in files:
        n = 0
        for ids in file_ids(f):
            digests += id_digests(ids).tobytes()
            n += len(ids)
        counts.append(n)
    if not sum(counts):
        raise InputError(f"{where}: the input has no rows")
    index = DigestIndex(np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2))
    del digests
    plan = InputPlan(str(where), files, counts, shard_size, index)
    duplicates = index.duplicates()
    if len(duplicates):
        first, later = (int(x) for x in duplicates[0])
        row_id = next(r["id"] for i, r in enumerate(all_rows(plan)) if i == later)
        raise InputError(f"{plan.where(later)}: duplicate id {row_id!r} (first seen at {plan.where(first)})"
                         + (f"; {len(duplicates) - 1} more duplicates" if len(duplicates) > 1 else ""))
    return plan


def all_rows(plan: InputPlan) -> Iterator[dict]:
    for f in plan.files:
        yield from file_rows(f)


def iter_shards(plan: InputPlan, done: np.ndarray | None = None) -> Iterator[Shard]:
    """The plan's shards with their rows, in order, each without the rows ``done`` marks (bool per global
    row); shards left with no rows are skipped."""
    rows = all_rows(plan)
    for index, (start, stop) in enumerate(plan.shard_bounds()):
        chunk = list(islice(rows, stop - start))
        found = plan.index.find(id_digests(r["id"] for r in chunk))
        if not np.array_equal(found, np.arange(start, stop)):
            raise InputError(f"{plan.uri} changed while the job ran: shard {index}'s rows are not those planned")
        todo = chunk if done is None else [r for r, d in zip(chunk, done[start:stop]) if not d]
        if todo:
            yield Shard(index, todo)
    if next(rows, None) is not None:
        raise InputError(f"{plan.uri} changed while the job ran: it has rows past those planned")


def read_rows(where: str, input_format: InputFormat = "auto") -> list[dict]:
    """The whole input as row dicts, checked as ``scan_input`` checks it: for small inputs (benchmarks, tests)."""
    return list(all_rows(scan_input(where, shard_size=1 << 30, input_format=input_format)))
