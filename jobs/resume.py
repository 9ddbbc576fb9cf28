"""Resuming a job: what an output directory already holds, and whether this run may add to it.

An output directory holds `job.json` (the manifest: the output-shaping configuration and its hash, the
model's content hash) beside the Parquet parts. Running again into it computes only the ids not yet
written. Rows an earlier run gave up on because their workers died are decoded again. A run whose
configuration would change the outputs is refused, never mixed in.

Only settings that change a row's tokens shape the outputs: the model (and its weights), dtype,
attention kernel, `max_new_tokens` and the sampling defaults. Decoding is lossless, so the decoding method,
prompt tokens, tree, batch sizes and worker pool do not: a job may be resumed on a different cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from jobs.config import JobConfig
from jobs.output import PART_GLOB, SUMMARY, replace_atomically, write_json
from workers.records import ErrorCode
from workers.sampling import SamplingConfig

log = logging.getLogger(__name__)

MANIFEST = "job.json"
# Errors a rerun retries: the row itself may be fine.
RETRYABLE = {ErrorCode.WORKER_DIED.value}


class ResumeError(ValueError):
    """The output directory cannot take this run's results."""


def output_shaping_config(cfg: JobConfig) -> dict[str, Any]:
    shaping = {
        "model": cfg.model.model,
        "attn_implementation": cfg.model.attn_implementation,
        "dtypes": sorted({group.dtype or cfg.model.dtype for group in cfg.workers}),
        "max_new_tokens": cfg.decoding.max_new_tokens,
    }
    # Only when set: the directories of greedy jobs written before sampling existed keep their hash.
    if cfg.model.cpu_linear != "auto":  # a CPU's float32 logits differ in the last bits
        shaping["cpu_linear"] = cfg.model.cpu_linear
    sampling = cfg.decoding.sampling.model_dump(mode="json")
    if sampling != SamplingConfig().model_dump(mode="json"):
        shaping["sampling"] = sampling
    return shaping


def config_hash(shaping: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _drop_retryable_rows(part: Path, codes: list[str | None]) -> int:
    """Take the rows whose workers died out of `part` (rewritten atomically, or removed when nothing else is
    left), so that this run decodes them again; returns how many."""
    keep = [code not in RETRYABLE for code in codes]
    if any(keep):
        kept = pq.read_table(part).filter(keep)
        replace_atomically(part, lambda tmp: pq.write_table(kept, tmp))
    else:
        part.unlink()
    log.info("%s: %d rows whose workers died will be decoded again", part.name, keep.count(False))
    return keep.count(False)


def _written_ids(parts: list[Path]) -> tuple[dict[str, Path], int]:
    """(id -> the part holding it, rows taken out to be retried). A part that cannot be read was not written
    by this job (parts are renamed into place complete), so it is set aside and its rows computed again."""
    seen: dict[str, Path] = {}
    retried = 0
    for part in parts:
        try:
            table = pq.read_table(part, columns=["id", "error"])  # an id's completions are all in one part
        except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
            aside = part.with_name(part.name + ".unreadable")
            log.warning("%s is unreadable (%s); moved to %s and its rows will be computed again", part, exc, aside)
            part.rename(aside)
            continue
        codes = [e["code"] if e else None for e in table.column("error").to_pylist()]
        if any(code in RETRYABLE for code in codes):
            retried += _drop_retryable_rows(part, codes)
        for row_id, code in zip(table.column("id").to_pylist(), codes):
            if code in RETRYABLE:
                continue
            if seen.get(row_id, part) != part:
                raise ResumeError(f"id {row_id!r} is written twice, in {seen[row_id].name} and {part.name}: "
                                  "this directory was not written by one job; use a new output directory")
            seen[row_id] = part
    return seen, retried


@dataclass
class ResumeState:
    done_ids: set[str]  # written by an earlier run: skipped
    retried: int  # rows an earlier run gave up on (their workers died), taken out to be decoded again


def open_output(out_dir: Path, cfg: JobConfig, input_ids: set[str], *, overwrite: bool = False) -> ResumeState:
    """Prepare `out_dir` for this run: what it already holds, to be skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob("*.tmp"):  # a killed run's unfinished writes
        leftover.unlink(missing_ok=True)
    if overwrite:
        for old in [*out_dir.glob(PART_GLOB), out_dir / SUMMARY, out_dir / MANIFEST]:
            old.unlink(missing_ok=True)
    shaping = output_shaping_config(cfg)
    manifest_path = out_dir / MANIFEST
    parts = sorted(out_dir.glob(PART_GLOB))
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["config_hash"] != config_hash(shaping):
            raise ResumeError(
                f"{out_dir} holds the output of a job with a different configuration "
                f"({_differences(manifest['output_config'], shaping)}); resuming would mix outputs. "
                "Use a new --output directory, or --overwrite to start this one again")
    elif parts:
        raise ResumeError(f"{out_dir} holds part files but no {MANIFEST}: they are not from this job. "
                          "Use a new --output directory, or --overwrite to replace them")
    else:
        write_json(manifest_path, {"config_hash": config_hash(shaping), "output_config": shaping, "model_hash": None})
    written, retried = _written_ids(parts)
    unknown = sorted(set(written) - input_ids)
    if unknown:
        raise ResumeError(f"{out_dir} holds {len(unknown)} ids that are not in this input (e.g. {unknown[0]!r}); "
                          "use a new --output directory, or --overwrite to start it again")
    return ResumeState(set(written), retried)


def recorded_numerics(out_dir: Path) -> dict[str, int]:
    """The linear-kernel decisions job.json records, ``rows_below`` by machine-kind key (workers/numerics.py): a
    resumed run's workers take them instead of deciding again."""
    manifest = json.loads((out_dir / MANIFEST).read_text())
    return {key: entry["rows_below"] for key, entry in (manifest.get("numerics") or {}).items()}


def record_worker(out_dir: Path, info: dict[str, Any], started: list[dict[str, Any]]) -> None:
    """Check a worker that has (re)started, from its ``describe()``, against the workers ``started`` before it and
    against job.json, then record in job.json what it brings. Every worker must have loaded the same weights, the
    ones the directory was written with, and a linear-kernel decision for its kind of machine must be the one
    job.json records (the board hands it out, so a difference is a bug, never silently mixed in)."""
    for other in started:
        if other["model_hash"] != info["model_hash"]:
            raise ResumeError(f"the workers loaded different weights for the same model: {other['worker']} "
                              f"{other['model_hash'][:12]}…, {info['worker']} {info['model_hash'][:12]}… (do the "
                              "model files differ between nodes?)")
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("model_hash") not in (None, info["model_hash"]):
        raise ResumeError(f"{out_dir} was written by model weights {manifest['model_hash'][:12]}…, but the workers "
                          f"loaded {info['model_hash'][:12]}… (the model files changed); use a new --output directory")
    numerics = dict(manifest.get("numerics") or {})
    decision = info.get("linear_decision")
    if decision and decision["key"] is not None:
        recorded = numerics.get(decision["key"])
        if recorded is not None and recorded["rows_below"] != decision["rows_below"]:
            raise ResumeError(f"worker {info['worker']} on {info['device']} computes with {info['numeric_path']}, "
                              f"but this job decided W @ x.T below {recorded['rows_below']} rows for that kind of "
                              "machine (model.cpu_linear: auto); its rows would not match the others'")
        numerics[decision["key"]] = {"rows_below": decision["rows_below"], "machine": info["device"],
                                     "numeric_path": info["numeric_path"]}
    updated = {**manifest, "model_hash": info["model_hash"], "numerics": numerics}
    if updated != manifest:
        write_json(manifest_path, updated)
