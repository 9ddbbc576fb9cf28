"""Resuming a job: what an output directory already holds, and whether this run may add to it.

An output directory holds `job.json` (the manifest: the output-shaping configuration and its hash, the
model's content hash) beside the Parquet parts. Running again into it computes only the ids not yet
written. A run whose configuration would change the outputs is refused, never mixed in.

Only settings that change a row's tokens shape the outputs: the model (and its weights), dtype,
attention kernel, `max_new_tokens`. Decoding is lossless, so the decoding method, prompt tokens, tree,
batch sizes and worker pool do not: a job may be resumed on a different cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from jobs.config import JobConfig
from jobs.output import PART_GLOB, SUMMARY, write_json

log = logging.getLogger(__name__)

MANIFEST = "job.json"


class ResumeError(ValueError):
    """The output directory cannot take this run's results."""


def output_shaping_config(cfg: JobConfig) -> dict[str, Any]:
    return {
        "model": cfg.model.model,
        "attn_implementation": cfg.model.attn_implementation,
        "dtypes": sorted({group.dtype or cfg.model.dtype for group in cfg.workers}),
        "max_new_tokens": cfg.decoding.max_new_tokens,
    }


def config_hash(shaping: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _written_ids(parts: list[Path]) -> dict[str, Path]:
    """id -> the part holding it. A part that cannot be read was not written by this job (parts are
    renamed into place complete), so it is set aside and its rows computed again."""
    seen: dict[str, Path] = {}
    for part in parts:
        try:
            ids = pq.read_table(part, columns=["id"]).column("id").to_pylist()
        except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
            aside = part.with_name(part.name + ".unreadable")
            log.warning("%s is unreadable (%s); moved to %s and its rows will be computed again", part, exc, aside)
            part.rename(aside)
            continue
        for row_id in ids:
            if row_id in seen:
                raise ResumeError(f"id {row_id!r} is written twice, in {seen[row_id].name} and {part.name}: "
                                  "this directory was not written by one job; use a new output directory")
            seen[row_id] = part
    return seen


def open_output(out_dir: Path, cfg: JobConfig, input_ids: set[str], *, overwrite: bool = False) -> set[str]:
    """Prepare `out_dir` for this run and return the ids it already holds (to be skipped)."""
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
    written = _written_ids(parts)
    unknown = sorted(set(written) - input_ids)
    if unknown:
        raise ResumeError(f"{out_dir} holds {len(unknown)} ids that are not in this input (e.g. {unknown[0]!r}); "
                          "use a new --output directory, or --overwrite to start it again")
    return set(written)


def check_model_hash(out_dir: Path, model_hashes: set[str]) -> None:
    """Every worker must have loaded the same weights, and the weights the directory was written with."""
    if len(model_hashes) != 1:
        raise ResumeError(f"the workers loaded different weights for the same model: {sorted(model_hashes)}")
    (model_hash,) = model_hashes
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("model_hash") in (None, model_hash):
        if manifest.get("model_hash") is None:
            write_json(manifest_path, {**manifest, "model_hash": model_hash})
        return
    raise ResumeError(f"{out_dir} was written by model weights {manifest['model_hash'][:12]}…, but the workers "
                      f"loaded {model_hash[:12]}… (the model files changed); use a new --output directory")
