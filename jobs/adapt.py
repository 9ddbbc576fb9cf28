"""Adaptation in the job, the driver's side: which rows a job learns its prompt tokens from, on which worker,
whether the new tokens are published, and how every worker comes to decode with them.

Contract (docs/training.md#adaptation-in-the-job):
- The rows: the first ``train_rows + held_out_rows`` completed rows, in input order, of the first shards this run
  decodes (at most half the run's rows), so the same input and seed give the same rows whatever the workers'
  timing; ``held_out_rows`` of every ``train_rows + held_out_rows`` are held back for the gate, spread evenly.
  Rows with errors or empty outputs are skipped. Only those shards' rows are ever held, so memory does not grow
  with the job.
- The training runs as a call on one worker (a GPU worker when the pool has one), beside its decoding; the
  other workers decode on.
- New tokens that pass the gate are saved in the output location (``prompt_tokens-<hash>/``, the artifact format
  of ``jobs.train.prompt_tokens``), recorded in job.json, then handed to every worker, which adopts them at a
  step boundary. A resumed job starts its workers with the recorded artifact and does not train again.
- A failure (an exception, the time limit, a worker lost) leaves the job on the old tokens, said in the log and
  in summary.json; the job's outputs and exit code are unaffected.

Nothing here imports torch: the worker returns the artifact's files as bytes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from jobs.config import JobConfig
from jobs.inputs import InputPlan
from jobs.output import read_json, write_json
from jobs.resume import MANIFEST
from jobs.storage import Location, StorageError, resolve

log = logging.getLogger(__name__)

ARTIFACT_PREFIX = "prompt_tokens-"
WEIGHTS_NAME, METADATA_NAME = "prompt_tokens.safetensors", "prompt_tokens.json"  # workers/artifacts.py's
MIN_TRAIN_ROWS, MIN_HELD_OUT_ROWS = 8, 4  # fewer usable rows than this: no adaptation
DRIVER_GRACE_S = 600.0  # past the training's own time limit, the gate's replay and the transfer
OUTLOOK_TIMEOUT_S = 60.0
ADOPTION_WAIT_S = 60.0  # at the job's end, for adoptions in flight (each is one step boundary away)


def read_artifact_files(where: Location) -> dict[str, bytes]:
    """A prompt-token artifact directory's two files (local or in an object store), weights first."""
    return {name: where.child(name).read_bytes() for name in (WEIGHTS_NAME, METADATA_NAME)}


def recorded_artifact(out: Location) -> dict[str, Any] | None:
    """The adapted prompt tokens job.json records, or None."""
    manifest_path = out.child(MANIFEST)
    return read_json(manifest_path).get("adapted_prompts") if manifest_path.exists() else None


def publish_artifact(out: Location, files: dict[str, bytes], prompts_hash: str, report: dict[str, Any]) -> Location:
    """Save the artifact in ``out`` (each file atomically, the weights first), then record it in job.json: a run
    killed before the record leaves an artifact nobody uses, never a record without its artifact."""
    where = out.child(ARTIFACT_PREFIX + prompts_hash[:16])
    if where.local:
        where.make_dir()
    for name in (WEIGHTS_NAME, METADATA_NAME):
        where.child(name).write_bytes_atomically(files[name])
    manifest_path = out.child(MANIFEST)
    manifest = read_json(manifest_path)
    write_json(manifest_path, {**manifest, "adapted_prompts": {"artifact": where.name, "prompts_hash": prompts_hash,
                                                               "report": report}})
    return where


def first_todo_shards(plan: InputPlan, done: np.ndarray, rows: int) -> list[int]:
    """The indices of the first shards holding rows not yet written, as many as hold ``rows`` such rows, and
    one more (for rows that fail)."""
    bounds = plan.shard_bounds()
    if not bounds or rows <= 0:
        return []
    starts = np.array([start for start, _ in bounds], dtype=np.int64)
    counts = np.add.reduceat((~done).astype(np.int64), starts)
    todo = np.flatnonzero(counts > 0)
    enough = int(np.searchsorted(np.cumsum(counts[todo]), rows)) + 2
    return todo[:enough].tolist()


class Adaptation:
    """One job's adaptation, driven from the pool's loop: ``start`` once the first worker is ready, ``add_shard``
    for every finished shard, ``poll`` on every tick, ``worker_ready`` for every worker (re)start, ``summary``."""

    def __init__(self, cfg: JobConfig, out: Location, plan: InputPlan, done: np.ndarray, rows_this_run: int):
        self.settings = cfg.adaptation
        self.out = out
        self.method = cfg.decoding.method
        self.max_new_tokens = cfg.decoding.max_new_tokens
        self.rows_this_run = rows_this_run
        self.target = min(self.settings.train_rows + self.settings.held_out_rows, rows_this_run // 2)
        self.wanted = set(first_todo_shards(plan, done, self.target))
        self.collected: dict[int, list[tuple[dict, list[int]]]] = {}
        self.state, self.reason = "undecided", ""
        self.report: dict[str, Any] = {}
        self.files: dict[str, bytes] | None = None  # the adopted artifact, for workers that start later
        self.source: str | None = None
        self.prompts_hash: str | None = None
        self.training: Any = None  # the worker call's object ref
        self.trainer: Any = None
        self.started_at = 0.0
        self.asked_progress: Any = None  # a pending adapt_progress() call on the trainer
        self.training_status: str | None = None  # its last answer
        self.adoptions: dict[Any, Any] = {}  # object ref -> worker name
        self.adopted_by: list[str] = []
        self.refused_by: list[str] = []
        self.unconfirmed_by: list[str] = []  # adoptions unanswered when the job ended
        recorded = recorded_artifact(out) if self.settings.mode != "off" and self.method == "ppd" else None
        if recorded:
            self._reuse(recorded)

    def _reuse(self, recorded: dict[str, Any]) -> None:
        """Start from the adapted tokens job.json records, if their files are there and whole (else learn again)."""
        where = self.out.child(recorded["artifact"])
        try:
            files = read_artifact_files(where)
        except (OSError, StorageError) as exc:
            log.warning("adapt-prompts: job.json records %s, which cannot be read (%s): learning again", where.uri, exc)
            return
        if hashlib.sha256(files[WEIGHTS_NAME]).hexdigest() != recorded["prompts_hash"]:
            log.warning("adapt-prompts: %s does not hold the recorded prompt tokens: learning again", where.uri)
            return
        self.files, self.source, self.prompts_hash = files, where.uri, recorded["prompts_hash"]
        self.state, self.reason = "reused", f"this output's adapted prompt tokens ({where.name}) are reused"
        self.report = recorded.get("report") or {}

    @property
    def adaptable(self) -> bool:
        """Whether this run may learn prompt tokens (its workers then plan untrained tokens as plain decoding,
        with the latency profile that trees are planned from once the new tokens come)."""
        return (self.state == "undecided" and self.settings.mode != "off" and self.method == "ppd"
                and self.rows_this_run >= self.settings.min_rows
                and self.target >= MIN_TRAIN_ROWS + MIN_HELD_OUT_ROWS)

    @property
    def worker_files(self) -> tuple[str, dict[str, bytes]] | None:
        """The artifact the workers start with instead of decoding.prompts (a resumed job's adapted tokens)."""
        return (self.source, self.files) if self.state == "reused" and self.files else None

    def start(self, ready_workers: list) -> str:
        """Decide whether this run adapts, from the configuration and the ready workers; returns the start line."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        if self.state != "undecided":
            return f"adapt-prompts: {self.reason}"
        mode = self.settings.mode
        if mode == "off" or self.method != "ppd":
            return self._decide("off", "off" if mode == "off" else "plain decoding has no prompt tokens")
        if self.rows_this_run < self.settings.min_rows:
            return self._decide("off", f"{self.rows_this_run} rows to decode, fewer than min_rows "
                                f"{self.settings.min_rows}")
        if self.target < MIN_TRAIN_ROWS + MIN_HELD_OUT_ROWS:
            return self._decide("off", f"too few rows to learn from ({self.target})")
        if mode == "auto":
            try:
                outlooks = ray.get([w.handle.adaptation_outlook.remote(self.settings.model_dump(mode="json"))
                                    for w in ready_workers], timeout=OUTLOOK_TIMEOUT_S)
            except (RayError, GetTimeoutError) as exc:
                return self._decide("off", f"the workers' latency profiles could not be read: {_first_line(exc)}")
            self.report["outlooks"] = outlooks
            reason = self._auto_reason(outlooks)
            if reason is not None:
                return self._decide("off", reason)
        return self._decide("collecting", f"learning from the first {self.target} completed rows (a share "
                            f"{self.settings.held_out_rows}:{self.settings.train_rows} held back for the gate)")

    def _auto_reason(self, outlooks: list[dict[str, Any]]) -> str | None:
        """Why 'auto' does not adapt, or None when some worker's profile says it pays."""
        rows_after = self.rows_this_run - self.target
        reasons = []
        for o in outlooks:
            if not o.get("profiled") or "expected" not in o:
                reasons.append(f"{o['worker']} has no latency profile")
                continue
            now, expected = o.get("now", {"speedup": 1.0, "tokens_per_s": 0.0}), o["expected"]
            if expected["speedup"] < self.settings.auto_min_speedup:
                reasons.append(f"trees do not pay on {o['worker']}'s device: with prompt tokens of the tau adaptation "
                               f"is expected to reach ({expected['tau_63']:.2f} at 63 nodes) its profile's best tree "
                               f"gives {expected['speedup']:.2f}x plain decoding (below "
                               f"{self.settings.auto_min_speedup:.2f}x)")
                continue
            if expected["speedup"] <= now["speedup"]:
                reasons.append(f"{o['worker']}'s prompt tokens already predict {now['speedup']:.2f}x")
                continue
            seconds = rows_after * self.max_new_tokens / max(now.get("tokens_per_s") or 1e-9, 1e-9)
            saved = seconds * (1 - now["speedup"] / expected["speedup"])
            if saved <= o["train_seconds_estimate"]:
                reasons.append(f"the {rows_after} rows after training would save ~{saved:.0f} s on {o['worker']}, "
                               f"less than training's ~{o['train_seconds_estimate']:.0f} s")
                continue
            return None
        return "; ".join(reasons) or "no worker"

    def _decide(self, state: str, reason: str) -> str:
        self.state, self.reason = state, reason
        log.info("adapt-prompts: %s", reason)
        return f"adapt-prompts ({self.settings.mode}): " + ("on, " if state == "collecting" else "no: ") + reason

    def wants(self, shard_index: int) -> bool:
        """Whether adaptation learns from this shard's rows (then its worker returns them beside its part)."""
        return self.state == "collecting" and shard_index in self.wanted

    def add_shard(self, shard_index: int, rows: list[dict], records: list[dict], workers: list) -> None:
        """A finished shard, its input ``rows`` and their ``records``: kept if adaptation learns from them;
        training starts once all are in."""
        if self.state != "collecting" or shard_index not in self.wanted:
            return
        by_id = {str(row["id"]): row for row in rows}
        self.collected[shard_index] = [
            (by_id[r["id"]], r["output_token_ids"]) for r in records
            if r.get("error") is None and r.get("output_token_ids") and r["id"] in by_id]
        usable = 0
        for index in sorted(self.wanted):  # the leading shards that are in, in input order
            if index not in self.collected:
                break
            usable += len(self.collected[index])
        else:
            self._train(workers)  # every wanted shard is in
            return
        if usable >= self.target:
            self._train(workers)

    def _train(self, workers: list) -> None:
        pairs = []
        for index in sorted(self.wanted):
            if index not in self.collected or len(pairs) >= self.target:
                break
            pairs += self.collected[index]
        pairs = pairs[: self.target]
        self.collected = {}
        share = self.settings.held_out_rows / (self.settings.train_rows + self.settings.held_out_rows)
        count = round(len(pairs) * share)
        held = [(i + 1) * count // len(pairs) > i * count // len(pairs) for i in range(len(pairs))]  # spread evenly
        if sum(held) < MIN_HELD_OUT_ROWS or len(pairs) - sum(held) < MIN_TRAIN_ROWS:
            self._fail(f"only {len(pairs)} usable rows among the first shards")
            return
        live = [w for w in workers if w.joined]
        if not live:
            self._fail("no worker is alive to train on")
            return
        self.trainer = next((w for w in live if str(w.info.get("torch_device", "")).startswith("cuda")), live[0])
        self.report.update(rows_learned=len(pairs) - sum(held), rows_held_out=sum(held),
                           trained_on=self.trainer.info.get("worker"))
        self.training = self.trainer.handle.adapt.remote([row for row, _ in pairs], [out for _, out in pairs], held,
                                                         self.settings.model_dump(mode="json"))
        self.started_at = time.perf_counter()
        self.report["started_at"] = datetime.now(UTC).isoformat()  # beside the rows' finished_at
        self.state = "training"
        log.info("adapt-prompts: training on %s from %d rows", self.report["trained_on"], len(pairs))

    def _fail(self, reason: str) -> None:
        self.state, self.reason = "failed", reason
        log.warning("adapt-prompts: the job goes on with its prompt tokens: %s", reason)

    def poll(self, workers: list) -> None:
        """Check the training and the adoptions in flight (never waits)."""
        import ray
        from ray.exceptions import RayError

        if self.state == "training":
            self._ask_progress()
            done, _ = ray.wait([self.training], timeout=0)
            if done:
                try:
                    self._trained(ray.get(self.training), workers)
                except RayError as exc:
                    self._fail(f"training failed on {self.report.get('trained_on')}: {_first_line(exc)}")
                self.training = None
            elif time.perf_counter() - self.started_at > self.settings.timeout_s + DRIVER_GRACE_S:
                self._fail(f"no answer from the training within {self.settings.timeout_s + DRIVER_GRACE_S:.0f} s")
                self.training = None
        self._collect_adoptions(timeout=0)

    def _collect_adoptions(self, timeout: float) -> None:
        """Record the adoptions that have answered, waiting up to ``timeout`` seconds for all of them."""
        import ray
        from ray.exceptions import RayError

        if self.adoptions:
            done, _ = ray.wait(list(self.adoptions), num_returns=len(self.adoptions), timeout=timeout)
            for ref in done:
                name = self.adoptions.pop(ref)
                try:
                    answer = ray.get(ref)
                except RayError as exc:  # the worker died; a restart is handed the tokens again
                    answer = {"error": _first_line(exc)}
                if answer["error"] is None:
                    self.adopted_by.append(name)
                else:
                    self.refused_by.append(name)
                    log.warning("adapt-prompts: %s keeps its old prompt tokens: %s", name, answer["error"])

    def _ask_progress(self) -> None:
        """Keep one adapt_progress() call in flight to the trainer; its answer feeds the progress line."""
        import ray
        from ray.exceptions import RayError

        if self.asked_progress is not None:
            done, _ = ray.wait([self.asked_progress], timeout=0)
            if not done:
                return
            try:
                self.training_status = ray.get(self.asked_progress)
            except RayError:
                self.training_status = None
        self.asked_progress = self.trainer.handle.adapt_progress.remote()

    def _trained(self, result: dict[str, Any], workers: list) -> None:
        self.report.update(result["report"])
        self.report["wall_seconds"] = round(time.perf_counter() - self.started_at, 2)
        if not result["passed"]:
            self.state = "rejected"
            self.reason = (f"the new prompt tokens did not beat the old ones in the gate's replay (tau at 63 nodes "
                           f"{result['report']['tau_before']['tree_63']:.3f} -> "
                           f"{result['report']['tau_after']['tree_63']:.3f})")
            log.info("adapt-prompts: %s", self.reason)
            return
        try:
            where = publish_artifact(self.out, result["files"], result["prompts_hash"], self.report)
        except (OSError, StorageError) as exc:  # the store failed: the job goes on, and a rerun learns again
            self._fail(f"the new prompt tokens could not be saved in {self.out.uri}: {exc}")
            return
        self.files, self.source, self.prompts_hash = result["files"], where.uri, result["prompts_hash"]
        self.state = "published"
        self.reason = (f"published {where.name}: replay tau at 63 nodes {self.report['tau_before']['tree_63']:.3f}"
                       f" -> {self.report['tau_after']['tree_63']:.3f}")
        if not workers:
            self.reason += " after the job's last row: no row of this run used it; pass it with --prompts"
        log.info("adapt-prompts: %s", self.reason)
        for w in workers:
            if w.joined:
                self.worker_ready(w)

    def finish(self, workers: list) -> None:
        """The job's rows are all decoded: wait briefly for the adoptions in flight (those unanswered are named in
        ``unconfirmed_by``); with ``finish_after_last_row``, wait for a training still running (up to its time
        limit) and publish what passes the gate, for later jobs; else it is dropped (``summary``)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        self._collect_adoptions(timeout=ADOPTION_WAIT_S)  # a worker adopts at its next step boundary
        self.unconfirmed_by = sorted(self.adoptions.values())
        if self.unconfirmed_by:
            log.warning("adapt-prompts: %s did not confirm adopting the new prompt tokens before the job ended",
                        ", ".join(map(str, self.unconfirmed_by)))
        if self.state != "training" or not self.settings.finish_after_last_row:
            return
        left = self.settings.timeout_s + DRIVER_GRACE_S - (time.perf_counter() - self.started_at)
        log.info("adapt-prompts: the rows are done; waiting up to %.0f s for the training", left)
        try:
            result = ray.get(self.training, timeout=max(left, 1.0))
        except (RayError, GetTimeoutError) as exc:
            self._fail(f"training failed on {self.report.get('trained_on')}: {_first_line(exc)}")
            return
        self._trained(result, [])  # no worker decodes any more: published for later jobs only

    def worker_ready(self, w) -> None:
        """A worker (re)started: hand it the adopted tokens (a reused artifact it started with already)."""
        if self.state == "published" and self.files is not None:
            self.adoptions[w.handle.adopt_prompts.remote(self.source, self.files)] = w.info.get("worker")

    def progress(self) -> str | None:
        """A few words for the progress line."""
        if self.state == "collecting":
            have = sum(len(rows) for rows in self.collected.values())
            return f"adapt: collecting rows ({min(have, self.target)}/{self.target})"
        if self.state == "training":
            return f"adapt: training on {self.report.get('trained_on')}" + (
                f" ({self.training_status})" if self.training_status else "")
        if self.state in ("published", "rejected", "failed"):
            return f"adapt: {self.state}"
        return None

    def summary(self) -> dict[str, Any]:
        """summary.json's ``adaptation``."""
        if self.state == "training":  # the job's rows ran out first; the workers are gone
            self._fail("the job's last row was decoded before the training ended")
        elif self.state == "collecting":
            self._fail("the job ended before its first rows were all in")
        elif self.state == "undecided":  # no worker started: nothing was left to decode
            self.state, self.reason = "off", "no rows were decoded in this run"
        out = {"mode": self.settings.mode, "state": self.state, "reason": self.reason,
               "artifact": self.source if self.state in ("published", "reused") else None,
               "prompts_hash": self.prompts_hash, "adopted_by": self.adopted_by, "refused_by": self.refused_by,
               "unconfirmed_by": self.unconfirmed_by}
        keys = ("rows_learned", "rows_held_out", "trained_on", "started_at", "steps", "train_seconds", "gate_seconds",
                "wall_seconds", "tau_before", "tau_after", "replay_gain", "outlooks")
        return {**out, **{key: self.report[key] for key in keys if key in self.report}}


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def load_prompt_files(cfg: JobConfig) -> tuple[str, dict[str, bytes]] | None:
    """``--prompts`` given as a URI (an artifact in an object store): its files, read by the driver and handed to
    the workers, which need no access to the store."""
    prompts = cfg.decoding.prompts
    if cfg.decoding.method != "ppd" or "://" not in prompts:
        return None
    return prompts, read_artifact_files(resolve(prompts))

