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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.config import JobConfig
from jobs.idset import id_digests
from jobs.inputs import InputPlan
from jobs.output import (
    INDEX_PARTS,
    RETRYABLE,
    SUMMARY,
    error_codes,
    is_index,
    is_part,
    part_summary,
    parts,
    read_json,
    read_part_summary,
    shard_of,
    write_json,
    write_table,
)
from jobs.storage import Location
from workers.configs import MemoryConfig, SamplingConfig

log = logging.getLogger(__name__)

MANIFEST = "job.json"


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
    if cfg.decoding.memory.max_prompt_tokens != MemoryConfig().max_prompt_tokens:  # which rows fail as too long
        shaping["max_prompt_tokens"] = cfg.decoding.memory.max_prompt_tokens
    sampling = cfg.decoding.sampling.model_dump(mode="json")
    if sampling != SamplingConfig().model_dump(mode="json"):
        shaping["sampling"] = sampling
    return shaping


def config_hash(shaping: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


@dataclass
class Written:
    """What an output directory holds, by input row."""

    owner: np.ndarray  # [rows] int32: the index (in ``parts``) of the part holding each input row, or -1
    parts: list[str]  # part names
    rows: int  # output rows (completions) in all
    failed: int  # output rows with an error
    retried: int  # rows taken out to be decoded again (their workers died)
    duplicates: int = 0  # parts that held rows of their shard another part holds (see scan_written)

    @property
    def done(self) -> np.ndarray:
        return self.owner >= 0


def _summary_or_error(part: Location) -> dict[str, Any] | Exception:
    try:
        return read_part_summary(part)
    except (OSError, ValueError, KeyError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
        return exc


def _index_or_none(index: Location) -> dict[str, dict[str, Any]] | None:
    try:
        return read_json(index)["parts"]
    except (OSError, ValueError, KeyError) as exc:  # published whole, so only a foreign or damaged file
        log.warning("%s is unreadable (%s); the footers of its parts are read instead", index.uri, exc)
        return None


def _drop_rows(out: Location, part: Location, drop: Callable[[pa.Table], pa.Array], *,
               write: bool) -> tuple[Location, dict] | None:
    """``part`` without the rows ``drop`` marks, and its summary (None when nothing else is left). With
    ``write``, the old part is deleted, then the rest is written as a new part (a part never changes under its
    name): in that order, a run killed in between has lost nothing but work (the rest is decoded again, never
    written twice); without, nothing is changed."""
    table = pq.read_table(part.path, filesystem=part.fs)
    kept = table.filter(pc.invert(drop(table)))
    if not write:
        return (part, part_summary(kept)) if kept.num_rows else None
    part.delete()
    if not kept.num_rows:
        return None
    rest = write_table(out, shard_of(part.name), kept)
    return out.child(rest.name), rest.summary


def _retryable(table: pa.Table) -> pa.Array:
    return pa.array([code in RETRYABLE for code in error_codes(table)])


def _chunks(pool: ThreadPoolExecutor, read, items: list, chunk: int):
    """Lists of (item, read(item)), ``chunk`` items read at a time by the pool: the ids held at once are a
    chunk's, not the directory's."""
    for start in range(0, len(items), chunk):
        batch = items[start:start + chunk]
        yield list(zip(batch, pool.map(read, batch)))


def scan_written(out: Location, plan: InputPlan, *, repair: bool = False, died_are_written: bool = False,
                 settle: bool = False, threads: int = 8) -> Written:
    """Every part's summary, mapped onto the input's rows: from the index files (jobs/output.PartIndex), and
    from the footers (read ``threads`` at a time) of the parts no index covers.

    A part that cannot be read was not written by this job (parts are published complete): its rows are
    computed again, and so are rows whose workers died (unless ``died_are_written``: a finished run's rows).
    With ``repair`` (a run's start), such a part is set aside as ``<name>.unreadable`` and those rows are
    taken out of their parts; without, nothing is changed.

    A shard written twice (two parts of one shard holding an id) is settled: the part met first keeps the
    rows, and they are taken out of the other (with ``repair`` or ``settle``: a finished run's last scan;
    otherwise only left uncounted). Parts the index files cover are met first (the driver accepted them), then
    the others by name, so the outcome is the same on every scan. Raises ResumeError for an id written in the
    parts of two different shards, or one that is not in the input."""
    listing = out.listing()
    files = [f for f, _ in listing]
    found = {f.name: f for f in files if is_part(f.name)}
    size = {f.name: n for f, n in listing}
    names, owner = [], np.full(plan.num_rows, -1, dtype=np.int32)
    counts = {"rows": 0, "failed": 0, "retried": 0, "duplicates": 0}

    def take(chunk: list[tuple[Location, dict[str, Any] | Exception]]) -> None:
        readable = []
        for part, summary in chunk:
            if isinstance(summary, Exception):
                log.warning("%s is unreadable (%s); its rows will be computed again", part.uri, summary)
                if repair:
                    part.move_to(out.child(part.name + ".unreadable"))
                continue
            retry = set() if died_are_written else set(summary["retry"])
            if retry:
                counts["retried"] += len(retry)
                if repair:
                    log.info("%s: %d rows whose workers died will be decoded again", part.name, len(retry))
                    rewritten, retry = _drop_rows(out, part, _retryable, write=True), set()
                    if rewritten is None:
                        continue
                    part, summary = rewritten
            readable.append((part, summary, retry))
        positions = plan.index.find(id_digests(i for _, summary, _ in readable for i in summary["ids"]))
        start = 0
        for part, summary, retry in readable:
            ids, at = summary["ids"], positions[start:start + len(summary["ids"])]
            start += len(ids)
            if (at < 0).any():
                unknown = ids[int(np.flatnonzero(at < 0)[0])]
                raise ResumeError(f"{out.uri} holds ids that are not in this input (e.g. {unknown!r} in "
                                  f"{part.name}); use a new --output directory, or --overwrite to start it again")
            taken = owner[at] >= 0
            if taken.any():
                shard = shard_of(part.name)
                foreign = [i for i in np.flatnonzero(taken) if shard_of(names[owner[at[i]]]) != shard]
                if foreign:
                    i = int(foreign[0])
                    raise ResumeError(f"id {ids[i]!r} is written twice, in {names[owner[at[i]]]} and {part.name}: "
                                      "this directory was not written by one job; use a new output directory")
                # The same shard written twice (a worker that published its part and died before reporting it,
                # or one presumed dead that finished after all): the part met first keeps its rows. Parts the
                # driver accepted (indexed) are met first, then the others by name.
                twice = {ids[i] for i in np.flatnonzero(taken)}
                log.info("%s: %d rows another part of shard %d holds are left out", part.name, len(twice), shard)
                counts["duplicates"] += 1
                held = pa.array(sorted(twice))
                settled = _drop_rows(out, part, lambda t, held=held: pc.is_in(t.column("id"), held),
                                     write=repair or settle)
                if settled is None:
                    continue
                part, summary = settled
                keep = ~taken
                ids, at = [i for i, k in zip(ids, keep) if k], at[keep]
            owner[at[[i not in retry for i in ids]] if retry else at] = len(names)
            names.append(part.name)
            counts["rows"] += summary["rows"]
            counts["failed"] += summary["failed"]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        # Index files a few at a time: each holds up to INDEX_PARTS x shard_size ids (at most ~1M held at once).
        at_once = max(1, min(threads, (1 << 20) // (INDEX_PARTS * plan.shard_size)))
        for chunk in _chunks(pool, _index_or_none, [f for f in files if is_index(f.name)], at_once):
            for _, entries in chunk:
                take([(found.pop(name), summary) for name, summary in (entries or {}).items()
                      if name in found and summary.get("bytes") == size[name]])
        for chunk in _chunks(pool, _summary_or_error, list(found.values()), 256):
            take(chunk)
    return Written(owner, names, counts["rows"], counts["failed"], counts["retried"], counts["duplicates"])


def open_output(out: Location, cfg: JobConfig, plan: InputPlan, *, overwrite: bool = False) -> Written:
    """Prepare ``out`` for this run and read what it already holds (to be skipped)."""
    out.make_dir()
    out.remove_leftovers()  # a killed run's unfinished writes
    if overwrite:
        for old in [*[f for f in out.files() if is_part(f.name) or is_index(f.name)], out.child(SUMMARY),
                    out.child(MANIFEST)]:
            if old.exists():
                old.delete()
    check_manifest(out, cfg, write=True)
    return scan_written(out, plan, repair=True)


def check_manifest(out: Location, cfg: JobConfig, *, write: bool) -> None:
    """Refuse a directory written with another output-shaping configuration, or parts without job.json; with
    ``write``, record this job's configuration in a fresh directory."""
    shaping = output_shaping_config(cfg)
    manifest_path = out.child(MANIFEST)
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        if manifest["config_hash"] != config_hash(shaping):
            raise ResumeError(
                f"{out.uri} holds the output of a job with a different configuration "
                f"({_differences(manifest['output_config'], shaping)}); resuming would mix outputs. "
                "Use a new --output directory, or --overwrite to start this one again")
    elif parts(out):
        raise ResumeError(f"{out.uri} holds part files but no {MANIFEST}: they are not from this job. "
                          "Use a new --output directory, or --overwrite to replace them")
    elif write:
        write_json(manifest_path, {"config_hash": config_hash(shaping), "output_config": shaping, "model_hash": None})


def recorded_numerics(out: Location) -> dict[str, int]:
    """The linear-kernel decisions job.json records, ``rows_below`` by machine-kind key (workers/numerics.py): a
    resumed run's workers take them instead of deciding again."""
    manifest = read_json(out.child(MANIFEST))
    return {key: entry["rows_below"] for key, entry in (manifest.get("numerics") or {}).items()}


def record_worker(out: Location, info: dict[str, Any], started: list[dict[str, Any]]) -> None:
    """Check a worker that has (re)started, from its ``describe()``, against the workers ``started`` before it and
    against job.json, then record in job.json what it brings. Every worker must have loaded the same weights, the
    ones the directory was written with, and a linear-kernel decision for its kind of machine must be the one
    job.json records (the board hands it out, so a difference is a bug, never silently mixed in)."""
    for other in started:
        if other["model_hash"] != info["model_hash"]:
            raise ResumeError(f"the workers loaded different weights for the same model: {other['worker']} "
                              f"{other['model_hash'][:12]}…, {info['worker']} {info['model_hash'][:12]}… (do the "
                              "model files differ between nodes?)")
    manifest_path = out.child(MANIFEST)
    manifest = read_json(manifest_path)
    if manifest.get("model_hash") not in (None, info["model_hash"]):
        raise ResumeError(f"{out.uri} was written by model weights {manifest['model_hash'][:12]}…, but the workers "
                          f"loaded {info['model_hash'][:12]}… (the model files changed); use a new --output "
                          "directory")
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
