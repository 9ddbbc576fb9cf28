"""The Ray actor that decodes shards of rows: a thin wrapper over `workers.engine.DecodeEngine`.

The actor is threaded: each `process(rows)` call (one shard) queues its rows on the engine and waits for them,
while one loop thread steps the engine. The driver keeps a shard or two more in flight than the worker is
decoding (jobs/pool.py), so with continuous batching a finished row's slot is refilled from the next shard
at the next step, never after a round trip to the driver.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import ray

from workers.artifacts import ArtifactError, artifact_files, prompt_tokens_from_files
from workers.board import BoardClient
from workers.configs import AdaptationConfig, DecodingConfig, ModelConfig
from workers.engine import DecodeEngine

log = logging.getLogger(__name__)

# Shards a worker holds beyond the one it decodes, with continuous batching (static batching: none).
PREFETCH_SHARDS = 1


def take_niceness(target: int) -> str:
    """Give the calling thread (and the threads it starts later, its OpenMP team included) the niceness
    ``target``, the driver's. Ray starts workers at niceness 15: beside the driver and Ray's own processes at 0,
    and any other process on the machine, a decode step's OpenMP team then waits on whichever of its threads
    was preempted (measured on the 2-core VM, batch 8: the job at 0.90x of the engine in-process, 0.56x of that
    with a busy loop at nice 19 beside it; at niceness 0, 0.98x and 0.82x). Lowering it needs CAP_SYS_NICE
    unless the cluster starts workers there (RAY_worker_niceness, which a job's own local Ray is given). Returns
    what the worker's start line says."""
    thread = threading.get_native_id()
    current = os.getpriority(os.PRIO_PROCESS, thread)  # Linux: a thread's own
    if current == target:
        return f"niceness {current}, the driver's"
    try:
        os.setpriority(os.PRIO_PROCESS, thread, target)
    except OSError as exc:
        return (f"niceness {current}, Ray's: the driver's {target} was refused ({exc.strerror}); start the cluster "
                f"with RAY_worker_niceness={target} for full speed beside other processes")
    return f"niceness {target}, the driver's (Ray started the worker at {current})"


class DecodeWorker:
    """Loads the model once, profiles its device, then decodes the shards it is handed."""

    def __init__(self, model: dict[str, Any], decoding: dict[str, Any], *, group: str, index: int,
                 config_hash: str, batch_size: int | str = 1, max_batch_size: int = 64,
                 num_threads: int | None = None, latency_profile: str | None = None,
                 numerics_board: str | None = None, adaptable: bool = False,
                 prompt_files: tuple[str, dict[str, bytes]] | None = None, niceness: int = 0,
                 expected_rows: int | None = None, threads_reason: str = ""):
        self.group = group
        self.config_hash = config_hash
        # A restarted actor is a new process: its pid (and maybe its node) differ, so the name says which
        # process decoded a row.
        self.name = f"{group}/{index} pid {os.getpid()} on {socket.gethostname()}"
        self.num_threads = num_threads
        # Threads: one per CPU the actor reserves. Not pinned: the driver, the raylet and other processes share
        # these cores, and a pinned thread could not move off a core one of them holds.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads_reason = ", ".join(x for x in (threads_reason, f"unpinned on {cores} cores") if x)
        self.niceness, self.priority = niceness, ""

        def build_engine() -> DecodeEngine:
            self.priority = take_niceness(niceness)  # before the thread starts its OpenMP team, which inherits it
            if num_threads:
                import torch

                torch.set_num_threads(num_threads)  # OpenMP's thread count is per calling thread
            # Profiles the device (or loads its cached profile) and builds this worker's tree and batch size.
            # The model's numeric decisions come from the job's board (the NumericsBoard actor of that name), so
            # every worker on one kind of machine, and this one after a restart, computes with the same kernels.
            board = BoardClient(numerics_board) if numerics_board is not None else None
            return DecodeEngine.from_config(ModelConfig(**model), DecodingConfig(**decoding), batch_size, board,
                                            max_batch_size=max_batch_size, latency_profile=latency_profile,
                                            adaptable=adaptable, prompt_files=prompt_files,
                                            expected_rows=expected_rows)

        # Every torch op of this actor runs in the one decode-loop thread, the engine's construction and profile
        # included. On CPU, each thread that runs OpenMP regions gets its own team of workers, and once a process
        # holds more OpenMP threads than cores libgomp stops spinning between regions (measured: a step decoded in
        # a second thread after the first had run the profile takes 1.2-1.9x as long; 2-core VM, default model).
        self._work = threading.Condition()
        built = threading.Event()
        failure: list[BaseException] = []
        threading.Thread(target=self._decode_loop, args=(build_engine, built, failure), name="decode-loop",
                         daemon=True).start()
        built.wait()
        if failure:
            raise failure[0]

    def _decode_loop(self, build_engine, built: threading.Event, failure: list[BaseException]) -> None:
        """Build the engine, then step it whenever it has rows; sleep when it has none."""
        try:
            self.engine = build_engine()
        except BaseException as exc:  # noqa: BLE001 - re-raised by __init__, which fails the actor's creation
            failure.append(exc)
            return
        finally:
            built.set()
        while True:
            with self._work:
                while self.engine.idle and not self.engine.has_pending_prompts:
                    self._work.wait()
            try:
                self.engine.step()
            except BaseException as exc:  # noqa: BLE001 - fail the shards, keep the actor serving
                log.exception("the decode loop failed")
                self.engine.fail_open_shards(exc)

    @property
    def node_id(self) -> str:
        """The Ray node this process runs on (a restarted actor may be on another)."""
        return ray.get_runtime_context().get_node_id()

    def ready(self) -> dict[str, Any]:
        """What this worker loaded and chose (returns once the model is in memory)."""
        return {**self.engine.describe(), "worker": self.name, "group": self.group, "pid": os.getpid(),
                "node_id": self.node_id, "threads": self.num_threads,
                "threads_reason": self.threads_reason,
                "priority": self.priority}

    def process(self, rows: Any, writer: Any = None, shard_index: int = -1,
                keep_records: bool = False) -> dict[str, Any]:
        """Decode one shard: its input rows, or where to read them (a jobs.inputs.ShardRead, read and checked
        here). With ``writer`` (a jobs.output.PartWriter), publish them as shard ``shard_index``'s part:
        {"part": its name, size and summary (jobs.output.WrittenPart); "records" and the input "rows" too with
        ``keep_records``, else None}; without, {"records": one per completion, in input order}. And "slots": the
        slot counters of the worker's steps since its previous shard finished (decoding/slots.Occupancy);
        "clock": those steps' time (workers/engine.StepClock);
        "graphs": the step's captures (or compiles) so far, or None when it runs eager. An input that changed
        since the plan: {"input_error": why}; an input that cannot be read: {"read_error": why}; a part that
        cannot be published: {"output_error": why} (the job stops on any of them, naming it; a rerun resumes). A
        writer meant for another node's disk (this actor was restarted elsewhere since the driver looked) is not
        used: the rows come back instead."""
        if not isinstance(rows, list):
            try:
                rows = rows.read()
            except OSError as exc:
                return {"read_error": f"{self.name}: {exc}"}
            except ValueError as exc:  # jobs.inputs.InputError: the input changed since the plan
                return {"input_error": f"{self.name}: {exc}"}
        if writer is not None and writer.node_id is not None and writer.node_id != self.node_id:
            writer = None
        job = self.engine.add_shard(rows)
        with self._work:
            self._work.notify()
        job.done.wait()
        if job.error is not None:
            raise RuntimeError("the worker's decode loop failed") from job.error
        records = [out.to_dict() for out in job.outputs]
        for record in records:
            record["worker"], record["worker_group"], record["config_hash"] = self.name, self.group, self.config_hash
        result: dict[str, Any] = {"slots": job.occupancy, "graphs": self.engine.batch.graph_stats(),
                                  "clock": job.clock.as_dict() if job.clock else None}
        if writer is None:
            return {**result, "records": records, "rows": rows if keep_records else None}
        # Published here, in the call's thread: the decode loop steps on meanwhile (pyarrow's writes let go of
        # the GIL), and the driver receives only the part's summary.
        try:
            part = writer.write(shard_index, records)
        except (OSError, ValueError) as exc:  # ValueError: jobs.storage.StorageError (e.g. the bucket's check)
            return {"output_error": f"{self.name} cannot publish its part to {writer.where}: {exc}"}
        kept = {"records": records, "rows": rows} if keep_records else {"records": None}
        return {**result, "part": part, **kept}

    def open_progress(self) -> dict[str, tuple[int, int]]:
        """Rows finished (and their tokens) in the shards this worker holds, by each shard's first row id: the
        driver's progress line counts rows as they complete, not only as shards do."""
        return self.engine.open_progress()

    def adopt_prompts(self, source: str, files: dict[str, bytes]) -> dict[str, Any]:
        """Decode with the prompt-token artifact given as its files (workers/artifacts.artifact_files) from the
        next step on; returns once adopted: {"prompts_hash", "error": None, or why the old ones were kept}."""
        try:
            prompt_tokens, prompts_hash = prompt_tokens_from_files(files, expect_model_hash=None)
        except (ArtifactError, OSError) as exc:
            return {"prompts_hash": None, "error": f"{type(exc).__name__}: {exc}"}
        pending = self.engine.request_prompt_tokens(prompt_tokens, prompts_hash, source)
        with self._work:
            self._work.notify()
        pending.done.wait()
        error = None if pending.error is None else f"{type(pending.error).__name__}: {pending.error}"
        return {"prompts_hash": prompts_hash, "error": error}

    def adaptation_outlook(self, settings: dict[str, Any]) -> dict[str, Any]:
        """What this worker's profile predicts for trees before and after adaptation (DecodeEngine's)."""
        return {**self.engine.adaptation_outlook(AdaptationConfig(**settings)), "worker": self.name}

    def adapt(self, rows: list[dict], outputs: list[list[int]], held_out: list[bool],
              settings: dict[str, Any]) -> dict[str, Any]:
        """Learn prompt tokens from these completed rows beside decoding (this call's own thread): {"passed",
        "report", "files": the new artifact's files, "prompts_hash"} (workers/adaptation.py)."""
        # A thread of its own, which ends with the training: on a CPU, a thread that runs OpenMP regions keeps
        # its team of workers until it ends, and a process holding more of them than cores slows every later
        # decode step (see __init__); Ray's threads for calls live as long as the actor.
        done: list[Any] = []

        def train() -> None:
            take_niceness(self.niceness)  # the decode loop's: at Ray's 15 beside it, training would barely move
            if self.num_threads:
                import torch

                torch.set_num_threads(self.num_threads)  # per calling thread, as in the decode loop
            try:
                done.append(self.engine.adapt(rows, outputs, held_out, AdaptationConfig(**settings)))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the call's thread below
                done.append(exc)
            finally:
                self.engine.adapt_progress = None

        thread = threading.Thread(target=train, name="adapt-prompts", daemon=True)
        thread.start()
        thread.join()
        if isinstance(done[0], BaseException):
            raise done[0]
        outcome = done[0]
        files, prompts_hash = artifact_files(outcome.prompt_tokens)
        return {"passed": outcome.passed, "report": outcome.report, "files": files, "prompts_hash": prompts_hash,
                "worker": self.name}

    def adapt_progress(self) -> str | None:
        """What a running adaptation is at (None when none runs here)."""
        return self.engine.adapt_progress


def remote_worker(*, num_cpus: float, num_gpus: float = 0, accelerator_type: str | None = None,
                  resources: dict[str, float] | None = None, max_restarts: int = 3):
    """`DecodeWorker` as a Ray actor class with the given resources.

    Ray restarts a worker that dies (killed for memory, its node lost) up to `max_restarts` times. Its
    in-flight shard is not retried on it: the driver hands the shard back to the pool, so another
    worker takes it (jobs/pool.py).
    """
    # Threaded: shards queued ahead (jobs/pool.py) wait in process() while the loop decodes, and ready(), adapt()
    # (a training beside decoding), adopt_prompts() and the progress and outlook calls answer.
    options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                   max_task_retries=0, max_concurrency=PREFETCH_SHARDS + 5)
    if accelerator_type:
        options["accelerator_type"] = accelerator_type
    if resources:
        options["resources"] = dict(resources)
    return ray.remote(**options)(DecodeWorker)
