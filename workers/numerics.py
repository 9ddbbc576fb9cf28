"""A worker's numeric path, and the one decision in it that is measured: decided once per kind of machine.

Float32 logits depend on which kernels compute them. Most of that follows from the configuration (device, dtype,
attention kernel, ``cpu_linear``), but ``cpu_linear="auto"`` times two matrix products on the CPU at hand and
picks ``rows_below`` (workers/cpu_linear.py) from the timing, and a timing taken on a busy machine can pick
differently (six loads in a row on the 2-core VM chose 8, 12, 12, 10, 10 and 12). Two workers, a restart or a
resumed run would then compute the same row with different kernels.

Contract of ``settle_rows_below``: for one *machine kind*, the key of ``machine_kind`` (CPU model, torch threads,
torch version and build configuration (its BLAS and CPU capability), and the model's content hash), the
measurement is taken at most once and its result is reused by every later load, in this order:

1. the job's decision (``board``: the driver holds it for every worker of the job, seeded from job.json, so a
   resumed run and a restarted worker reuse what the job decided);
2. the decision cached on disk under ``cache_dir/numerics/`` (later runs on this machine, and workers of a job
   that share the cache directory);
3. a measurement.

A decision from 2 or 3 is proposed to the board, whose first proposal per key wins (two workers that measured at
once on two machines of one kind adopt one result), and the decision is left on a disk that had none. Without a
board, of two processes that measured at once the first to publish on the disk wins.

``numeric_path`` names the path a model computes with, for each output row's provenance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn

from profiling.device import cpu_model_name
from workers.cpu_linear import ROW_CANDIDATES, linear_rows_below, measure_rows_below, worth_measuring

log = logging.getLogger(__name__)

# Bumped when the measurement or the rule that chooses from it changes: earlier decisions are then not reused.
DECISION_VERSION = 1
DecisionSource = Literal["job", "cache", "measured", "unmeasured"]


class DecisionBoard(Protocol):
    """The job's decisions by machine-kind key (workers/board.py keeps one for all the job's workers)."""

    def get(self, key: str) -> int | None:
        """The decided ``rows_below`` for ``key``, or None when none has been decided."""

    def settle(self, key: str, rows_below: int) -> tuple[int, bool]:
        """Propose ``rows_below`` for ``key``; returns the decision, which is the first proposal made, and whether
        it is this one."""


@dataclass(frozen=True)
class RowsBelowDecision:
    rows_below: int  # 1: nn.Linear throughout
    key: str | None  # the machine-kind key it was decided for (None: unmeasured, the same everywhere)
    source: DecisionSource  # where this load took it from


def machine_kind(model_hash: str) -> dict:
    """What the measurement depends on besides the moment it was taken: two processes with equal kinds use one
    decision."""
    build = hashlib.sha256(torch.__config__.show().encode()).hexdigest()[:16]  # BLAS, its version, CPU capability
    return {"version": DECISION_VERSION, "cpu": cpu_model_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "build": build, "model": model_hash, "candidates": list(ROW_CANDIDATES)}


def kind_key(kind: dict) -> str:
    return hashlib.sha256(json.dumps(kind, sort_keys=True).encode()).hexdigest()[:16]


def decision_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "numerics" / f"rows-below-{key}.json"


def read_decision(path: Path) -> int | None:
    """The cached ``rows_below`` at ``path``, or None when there is none (an unreadable file counts as none)."""
    try:
        rows_below = json.loads(path.read_text())["rows_below"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable numeric decision %s: %s", path, exc)
        return None
    return rows_below if isinstance(rows_below, int) and rows_below >= 1 else None


def publish_first(path: Path, record: dict) -> tuple[int, bool]:
    """Write ``record`` at ``path`` unless a readable decision is there already. Returns the decision at ``path``
    afterwards, and whether it is ``record``'s. A hard link publishes the complete file and fails where one
    exists, so of two concurrent writers the first wins and neither replaces the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            won = True
        except FileExistsError:
            won = read_decision(path) is None  # a damaged file does not win
            if won:
                os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    decided = read_decision(path)
    assert decided is not None, path
    return decided, won


def settle_rows_below(model: nn.Module, model_hash: str, cache_dir: Path,
                      board: DecisionBoard | None = None) -> RowsBelowDecision:
    """The ``rows_below`` this load uses for ``cpu_linear="auto"``: the job's, else the cached, else measured (see
    the module docstring). Measures only when neither the board nor the disk has a decision for this kind, and
    leaves the decision on the disk where it had none. A model too small to measure (``worth_measuring``) keeps
    nn.Linear without a decision: that is the same everywhere."""
    if not worth_measuring(model):
        return RowsBelowDecision(1, None, "unmeasured")
    kind = machine_kind(model_hash)
    key = kind_key(kind)
    path = decision_path(cache_dir, key)
    cached = read_decision(path)
    record: dict = {"kind": kind}
    source: DecisionSource
    if board is not None and (decided := board.get(key)) is not None:
        rows_below, source = decided, "job"
    elif cached is not None:
        rows_below, source = cached, "cache"
    else:
        measured = measure_rows_below(model)
        log.info("linear layers on this CPU: W @ x.T below %d rows (ms by rows, x @ W.T: %s; W @ x.T: %s)",
                 measured.rows_below, _rounded(measured.torch_ms), _rounded(measured.stationary_ms))
        rows_below, source = measured.rows_below, "measured"
        record.update(torch_ms=measured.torch_ms, stationary_ms=measured.stationary_ms)
    if board is not None and source != "job":
        settled, first = board.settle(key, rows_below)
        if not first:  # another worker of the job decided first (the same way, or from another disk)
            rows_below, source = settled, "job"
    if cached is None:  # later runs on this machine take this decision too
        published, won = _publish(path, {**record, "rows_below": rows_below, "source": source})
        if not won and board is None:  # another process here published first: one decision per machine
            rows_below, source = published, "cache"
    return RowsBelowDecision(rows_below, key, source)


def _publish(path: Path, record: dict) -> tuple[int, bool]:
    """``publish_first`` with a time stamp; a cache that cannot be written costs reuse across runs, not
    consistency within a job (the board holds its decisions), so the record is then taken as published."""
    record = {**record, "decided_at": datetime.now(UTC).isoformat()}
    try:
        return publish_first(path, record)
    except OSError as exc:
        log.warning("could not cache the numeric decision in %s: %s", path, exc)
        return record["rows_below"], True


def _rounded(ms_by_rows: dict[int, float]) -> dict[int, float]:
    return {rows: round(ms, 1) for rows, ms in ms_by_rows.items()}


def numeric_path(model: nn.Module) -> str:
    """The kernels that compute ``model``'s outputs, as a row's provenance: device, dtype, attention kernel,
    linear layers (with ``rows_below`` where they multiply ``W @ x.T``), and on CUDA in float32 the matmul
    precision (TF32 or not), e.g. ``"cpu float32 attn=sdpa linear=weight_stationary<12"``."""
    weight = model.get_input_embeddings().weight
    dtype = str(weight.dtype).removeprefix("torch.")
    rows_below = linear_rows_below(model)
    linear = "torch" if rows_below is None else f"weight_stationary<{rows_below}"
    path = f"{weight.device.type} {dtype} attn={model.config._attn_implementation} linear={linear}"
    if weight.device.type == "cuda" and weight.dtype == torch.float32:
        path += f" matmul={torch.get_float32_matmul_precision()}"
    return path
