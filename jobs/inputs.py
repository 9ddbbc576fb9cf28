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
- The plan holds the ids as 16-byte digests (jobs/idset.py): 10M rows take ~250 MB once indexed. It also
  holds, per shard, a digest of its ids in order, and where the shard begins in its file: for JSONL the byte
  offset of its first line (and that line's number), for Parquet its row group and the row in it.
- ``plan_shards`` names each shard to decode by that range (a ``ShardRead``), without reading a row: the
  worker reads its own shard (``ShardRead.read``), through the same storage layer, and checks its ids
  against the plan's digest. An input changed mid-job is an error naming the shard, not a silent mix.
  ``iter_shards`` is the same with the rows read here (the driver's, for a worker that cannot reach the input).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.idset import DigestIndex, id_digests, sequence_digest
from jobs.openai_batch import is_request, request_to_row
from jobs.storage import Location, StorageError, resolve, resolve_cached

log = logging.getLogger(__name__)

KEPT_FIELDS = ("id", "messages", "prompt", "sampling_params")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
BATCH_ROWS = 65_536  # rows per Parquet record batch and per digest chunk
# A Parquet shard is read from its row group's start: beyond this many rows per group, shards late in a group
# decode much of it again.
LARGE_ROW_GROUP = 65_536
READ_BYTES = 8 << 20  # JSONL block size


class InputError(ValueError):
    """The input cannot be used as a whole."""


class MalformedLine(InputError):
    """A JSONL line that is not a JSON object."""


class UnreadableInput(InputError):
    """A file that cannot be read (the store failed, or the file is gone)."""


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
    for lineno, _, value in _jsonl_lines(f):
        yield lineno, value


def _jsonl_lines(f: InputFile, start: int = 0, stop: int | None = None,
                 lines_before: int = 0) -> Iterator[tuple[int, int, dict]]:
    """(line number, byte offset of the line, object) for every non-blank line of the bytes [start, stop) (to the
    end: None), whose first line is line ``lines_before`` + 1."""
    uri = f.location.uri
    try:
        handle = f.location.fs.open_input_file(f.location.path)
    except OSError as exc:
        raise UnreadableInput(f"{uri}: cannot read: {exc}") from None
    lineno, tail, at = lines_before, b"", start  # at: the offset of tail's first byte
    with handle:
        if start:
            handle.seek(start)
        while True:
            want = READ_BYTES if stop is None else min(READ_BYTES, stop - at - len(tail))
            try:
                block = handle.read(want) if want > 0 else b""
            except OSError as exc:
                raise UnreadableInput(f"{uri}: cannot read: {exc}") from None
            lines = (tail + block).split(b"\n")
            tail = lines.pop() if block else b""
            for line in lines:
                lineno += 1
                offset, at = at, at + len(line) + 1
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    detail = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else exc
                    raise MalformedLine(f"{uri}: line {lineno}: malformed JSON: {detail}") from None
                if not isinstance(value, dict):
                    raise MalformedLine(f"{uri}: line {lineno}: expected a JSON object, got {type(value).__name__}")
                yield lineno, offset, value
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


def file_ids(f: InputFile, every: int = 0, marks: list[tuple[int, int]] | None = None) -> Iterator[list[str]]:
    """The file's ids in order, checked, in chunks. With ``marks`` (JSONL), where every ``every``-th row begins
    is appended to it, as (byte offset of its line, lines before it), and then where the file ends."""
    if f.format == "parquet":
        row = 0
        for batch in _parquet_batches(f, ["id"]):
            yield _parquet_ids(f, batch, row)
            row += batch.num_rows
        return
    chunk: list[str] = []
    key = "custom_id" if f.format == "openai-batch" else "id"
    rows = 0
    for lineno, offset, value in _jsonl_lines(f):
        if f.format == "openai-batch":
            _request(f, lineno, value)
        chunk.append(_check_id(f"{f.location.uri}: line {lineno}", value.get(key)))
        if marks is not None and rows % every == 0:
            marks.append((offset, lineno - 1))
        rows += 1
        if len(chunk) == BATCH_ROWS:
            yield chunk
            chunk = []
    if marks is not None:
        marks.append((f.location.info().size, -1))
    yield chunk


def _row(f: InputFile, where: str, value: dict) -> dict:
    """A JSONL object as an input row: ``id`` (a string) and whichever of the other KEPT_FIELDS it has."""
    row = request_to_row(value) if f.format == "openai-batch" else {k: value[k] for k in KEPT_FIELDS if k in value}
    row["id"] = _check_id(where, row.get("id"))
    return row


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
        yield _row(f, f"{uri}: line {lineno}", _request(f, lineno, value) if f.format == "openai-batch" else value)


def locate(f: InputFile, row: int) -> str:
    """Where the file's ``row``-th row (from 0) is: its line for JSONL, its row for Parquet."""
    if f.format == "parquet":
        return f"{f.location.uri}: row {row}"
    for i, (lineno, _) in enumerate(_jsonl_objects(f)):
        if i == row:
            return f"{f.location.uri}: line {lineno}"
    raise AssertionError(f"{f.location.uri} has fewer than {row + 1} rows")


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardRead:
    """Where shard ``index`` lies and what it holds, for whoever reads it (a worker, maybe on another node).

    ``where``: its file (jobs/storage.Location.source), read as ``format``; ``rows``: its rows in the plan,
    whose ids' ``digest`` (jobs/idset.sequence_digest) must match what is read. JSONL: its lines are the bytes
    [``byte_start``, ``byte_stop``) (None: to the file's end, for the file's last shard, so that rows added since
    the plan are found), the first being line ``lines_before`` + 1. Parquet: it begins at row ``group_offset``
    of row group ``row_group``, in a file of ``file_rows`` rows. ``skip``: its rows already written (their
    places in the shard), read but not returned."""

    index: int
    where: str
    format: str
    rows: int
    digest: bytes
    byte_start: int = 0
    byte_stop: int | None = None
    lines_before: int = 0
    row_group: int = 0
    group_offset: int = 0
    file_rows: int = 0
    skip: tuple[int, ...] = ()

    def read(self) -> list[dict]:
        """The shard's rows to decode, checked against the plan. Raises InputError for an input changed since
        the plan (naming the shard), OSError for one that cannot be read (the store failed, the file is gone)."""
        try:
            f = InputFile(resolve_cached(self.where), self.format)
        except StorageError as exc:
            raise OSError(f"{self.where}: cannot read: {exc}") from None
        changed = f"{f.location.uri} changed while the job ran: shard {self.index}"
        try:
            rows = self._parquet(f, changed) if f.format == "parquet" else self._jsonl(f)
        except MalformedLine as exc:  # every line parsed when the plan was made
            raise InputError(f"{changed} no longer reads as planned ({exc})") from None
        except UnreadableInput as exc:
            raise OSError(str(exc)) from None
        if len(rows) > self.rows:
            raise InputError(f"{f.location.uri} changed while the job ran: it has rows past those planned")
        if len(rows) < self.rows or sequence_digest(id_digests(r["id"] for r in rows)) != self.digest:
            raise InputError(f"{changed}'s rows are not those planned")
        skip = set(self.skip)
        return [row for i, row in enumerate(rows) if i not in skip]

    def _jsonl(self, f: InputFile) -> list[dict]:
        rows = []
        for lineno, _, value in _jsonl_lines(f, self.byte_start, self.byte_stop, self.lines_before):
            where = f"{f.location.uri}: line {lineno}"
            if f.format == "openai-batch" and not is_request(value):
                raise MalformedLine(f"{where}: not an OpenAI batch request")
            try:
                rows.append(_row(f, where, value))
            except InputError as exc:  # its id, checked when the plan was made
                raise MalformedLine(str(exc)) from None
            if len(rows) > self.rows:  # one past the plan is enough to tell
                break
        return rows

    def _parquet(self, f: InputFile, changed: str) -> list[dict]:
        try:
            handle = f.location.fs.open_input_file(f.location.path)
        except OSError as exc:
            raise UnreadableInput(f"{f.location.uri}: cannot read: {exc}") from None
        rows: list[dict] = []
        with handle:
            try:
                parquet = pq.ParquetFile(handle)
                if parquet.metadata.num_rows != self.file_rows:
                    raise InputError(f"{changed}: the file holds {parquet.metadata.num_rows} rows, not the "
                                     f"{self.file_rows} planned")
                columns = [c for c in KEPT_FIELDS if c in parquet.schema_arrow.names]
                skip = self.group_offset  # rows of the first group before the shard
                batches = parquet.iter_batches(batch_size=min(BATCH_ROWS, max(1024, self.rows)), columns=columns,
                                               row_groups=range(self.row_group, parquet.num_row_groups))
                for batch in batches:
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    batch, skip = batch.slice(skip, self.rows - len(rows)), 0  # the row count says if it grew
                    try:
                        ids = _parquet_ids(f, batch, len(rows))
                    except InputError as exc:  # every id was checked when the plan was made
                        raise InputError(f"{changed} no longer reads as planned ({exc})") from None
                    for row_id, row in zip(ids, batch.to_pylist()):
                        row["id"] = row_id
                        rows.append(row)
                    if len(rows) == self.rows:
                        break
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - any other read failure
                raise UnreadableInput(f"{f.location.uri}: cannot read Parquet: {exc}") from None
        return rows


@dataclass
class Shard:
    """A unit of work and of output: up to ``shard_size`` consecutive rows of one file, less those written.
    Its rows are read by its worker (``read``), or here (``load``: ``rows``)."""

    index: int  # position among the input's shards
    rows: list[dict] | None = None
    read: ShardRead | None = None
    attempts: int = 0  # workers that died while decoding it
    deaths: list[str] = field(default_factory=list)

    def load(self) -> list[dict]:
        """Its rows, read here if they were not (InputError as ``ShardRead.read``)."""
        if self.rows is None:
            assert self.read is not None
            self.rows = self.read.read()
        return self.rows

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.load()]


@dataclass
class InputPlan:
    uri: str
    files: list[InputFile]
    file_rows: list[int]  # rows per file
    shard_size: int
    index: DigestIndex  # every row's id; positions are global row numbers (files in order)
    # Per file, where its shards begin: JSONL [shards + 1, 2] (byte offset, lines before) of each shard's first
    # line, then the file's size; Parquet [row groups]: the rows of each row group.
    file_marks: list[np.ndarray] = field(default_factory=list)
    shard_digests: list[bytes] = field(default_factory=list)  # per shard, its ids' sequence_digest

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
    digests, counts, file_marks = bytearray(), [], []
    for f in files:
        n = 0
        marks: list[tuple[int, int]] = []
        for ids in file_ids(f, shard_size, None if f.format == "parquet" else marks):
            digests += id_digests(ids).tobytes()
            n += len(ids)
        counts.append(n)
        file_marks.append(_row_groups(f) if f.format == "parquet" else np.array(marks, dtype=np.int64).reshape(-1, 2))
        if f.format == "parquet" and len(file_marks[-1]) and file_marks[-1].max() > max(LARGE_ROW_GROUP, shard_size):
            log.warning("%s has row groups of up to %d rows: each worker reads its shard from its row group's start, "
                        "so shards late in a group cost more to read; rewrite it with smaller row groups, e.g. "
                        "pyarrow.parquet.write_table(..., row_group_size=%d)", f.location.uri,
                        int(file_marks[-1].max()), LARGE_ROW_GROUP)
    if not sum(counts):
        raise InputError(f"{where}: the input has no rows")
    index = DigestIndex(np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2))
    plan = InputPlan(str(where), files, counts, shard_size, index, file_marks)
    view = memoryview(digests)
    plan.shard_digests = [sequence_digest(view[16 * start:16 * stop]) for start, stop in plan.shard_bounds()]
    del view, digests
    duplicates = index.duplicates()
    if len(duplicates):
        first, later = (int(x) for x in duplicates[0])
        row_id = next(r["id"] for i, r in enumerate(all_rows(plan)) if i == later)
        raise InputError(f"{plan.where(later)}: duplicate id {row_id!r} (first seen at {plan.where(first)})"
                         + (f"; {len(duplicates) - 1} more duplicates" if len(duplicates) > 1 else ""))
    return plan


def _row_groups(f: InputFile) -> np.ndarray:
    """[row groups] int64: the rows of each of the Parquet file's row groups."""
    try:
        with f.location.fs.open_input_file(f.location.path) as handle:
            meta = pq.ParquetFile(handle).metadata
            return np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64)
    except OSError as exc:
        raise InputError(f"{f.location.uri}: cannot read: {exc}") from None


def check_unchanged(plan: InputPlan) -> None:
    """Raise InputError when a file grew or shrank since the plan (a finished run's last check: a shard's own
    read sees only its range, and a resumed run reads no shard of a file it wrote whole)."""
    for f, rows, marks in zip(plan.files, plan.file_rows, plan.file_marks):
        try:
            if f.format == "parquet":
                with f.location.fs.open_input_file(f.location.path) as handle:
                    now = pq.ParquetFile(handle).metadata.num_rows
                changed = now != rows
            else:
                changed = f.location.info().size != int(marks[-1, 0])
        except OSError as exc:
            raise OSError(f"{f.location.uri}: cannot read: {exc}") from None
        if changed:
            raise InputError(f"{f.location.uri} changed while the job ran: it is not the file planned (rows added "
                             "or removed); what was written stays, and a rerun decodes the rows it does not hold")


def all_rows(plan: InputPlan) -> Iterator[dict]:
    for f in plan.files:
        yield from file_rows(f)


def plan_shards(plan: InputPlan, done: np.ndarray | None = None) -> Iterator[Shard]:
    """The plan's shards, in order, each named by its range (``Shard.read``) without reading a row, less the
    rows ``done`` marks (bool per global row); shards left with no rows are skipped."""
    index = 0
    for f, start, rows, marks in zip(plan.files, plan.file_starts(), plan.file_rows, plan.file_marks):
        where = f.location.source
        group_starts = np.concatenate([[0], np.cumsum(marks)]) if f.format == "parquet" else None
        for k, first in enumerate(range(0, rows, plan.shard_size)):
            begin, end = int(start) + first, int(start) + min(first + plan.shard_size, rows)
            written = None if done is None else done[begin:end]
            if written is None or not written.all():
                skip = () if written is None else tuple(int(i) for i in np.flatnonzero(written))
                if group_starts is not None:
                    group = int(np.searchsorted(group_starts, first, side="right")) - 1
                    at = {"row_group": group, "group_offset": first - int(group_starts[group]), "file_rows": rows}
                else:
                    last = k + 1 == len(marks) - 1
                    at = {"byte_start": int(marks[k, 0]), "byte_stop": None if last else int(marks[k + 1, 0]),
                          "lines_before": int(marks[k, 1])}
                yield Shard(index, read=ShardRead(index, where, f.format, end - begin, plan.shard_digests[index],
                                                  skip=skip, **at))
            index += 1


def iter_shards(plan: InputPlan, done: np.ndarray | None = None) -> Iterator[Shard]:
    """``plan_shards`` with each shard's rows read here (``Shard.load``)."""
    for shard in plan_shards(plan, done):
        shard.load()
        yield shard


def read_rows(where: str, input_format: InputFormat = "auto") -> list[dict]:
    """The whole input as row dicts, checked as ``scan_input`` checks it: for small inputs (benchmarks, tests)."""
    return list(all_rows(scan_input(where, shard_size=1 << 30, input_format=input_format)))
