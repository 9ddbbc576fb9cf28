"""Reading the job's input rows (JSONL or Parquet) and cutting them into batches.

Problems that make the whole input unusable (a malformed JSONL line, a row without an id, duplicate
ids) raise `InputError` up front. Problems with one row's content (no prompt, wrong types, ...) are
left for the workers, which report them in that row's `error` column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

KEPT_FIELDS = ("id", "messages", "prompt", "sampling_params")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class InputError(ValueError):
    """The input cannot be used as a whole."""


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(value, dict):
                raise InputError(f"{path}: line {lineno}: expected a JSON object, got {type(value).__name__}")
            rows.append((f"{path}: line {lineno}", value))
    return rows


def _parquet_rows(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any read failure is an input error
        raise InputError(f"{path}: cannot read Parquet: {exc}") from None
    return [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"{path}: no .jsonl or .parquet files in this directory")
        return files
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown input format (expected .jsonl or .parquet)")
    return [path]


def _check_id(where: str, row: dict) -> str:
    row_id = row.get("id")
    if row_id is None:
        raise InputError(f"{where}: row has no 'id'")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise InputError(f"{where}: 'id' must be a string or an integer, got {type(row_id).__name__}")
    if isinstance(row_id, str) and not row_id.strip():
        raise InputError(f"{where}: 'id' is empty")
    return str(row_id)


def read_rows(path: str | Path) -> list[dict]:
    """The input's rows as dicts with `id` (a string) and whichever of `messages`/`prompt`/`sampling_params`
    they had.

    Raises InputError for a malformed JSONL line (naming its line number), a row without a usable
    id, and duplicate ids.
    """
    rows: list[dict] = []
    first_seen: dict[str, str] = {}
    for file in _files(Path(path)):
        reader = _parquet_rows if SUFFIXES[file.suffix] == "parquet" else _jsonl_rows
        for where, raw in reader(file):
            row_id = _check_id(where, raw)
            if row_id in first_seen:
                raise InputError(f"{where}: duplicate id {row_id!r} (first seen at {first_seen[row_id]})")
            first_seen[row_id] = where
            row = {key: raw[key] for key in KEPT_FIELDS if key in raw}
            row["id"] = row_id
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: the input has no rows")
    return rows
