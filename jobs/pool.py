"""The pool of decode actors: every worker group's actors pull shards from one queue.

Ray places each actor by its group's resources (CPUs, GPUs, accelerator type, custom resources) and
restarts one that dies (`faults.max_restarts`). Each actor holds its shard and, with continuous batching,
the next one; a new shard goes to an actor with room, so a faster device takes more of them. The shards of
an actor that died are handed back to the queue for the next free actor; after `faults.max_shard_attempts`
deaths a shard's rows are returned with a `worker_died` error. A restarted actor rejoins the pool once its
constructor has run again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from jobs.config import JobConfig, WorkerGroup
from jobs.inputs import Shard
from workers.actor import remote_worker
from workers.records import ErrorCode, RowError, RowOutput

log = logging.getLogger(__name__)
# The longest the driver waits for a result before its tick (the progress line, adaptation's polls).
TICK_S = 1.0
# Set by Ray's job manager in the environment of a submitted job's entrypoint (ray._private.runtime_env.constants).
RAY_JOB_ENTRYPOINT_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class ShardQueue:
    """Shards drawn from an iterator as the pool takes them (a streamed input is never held whole), with the
    shards of dead workers put back in front."""

    def __init__(self, shards: Iterable[Shard]):
        self._upcoming, self._front = iter(shards), deque()

    def __bool__(self) -> bool:
        if not self._front:
            shard = next(self._upcoming, None)
            if shard is None:
                return False
            self._front.append(shard)
        return True

    def popleft(self) -> Shard:
        if not self:
            raise IndexError("no shard left")
        return self._front.popleft()

    def appendleft(self, shard: Shard) -> None:
        self._front.appendleft(shard)


@dataclass
class Worker:
    handle: Any
    group: str
    index: int
    info: dict[str, Any] = field(default_factory=dict)  # from DecodeWorker.ready(); refreshed on restart
    last_busy_seconds: float = 0.0  # its latest shard: from its submission, or the worker's previous result
    last_slots: dict[str, int] = field(default_factory=dict)  # its latest shard's slot counters
    last_clock: dict[str, float] = field(default_factory=dict)  # its steps' time since its previous shard
    in_flight: int = 0  # shards submitted and not yet returned
    joined: bool = False  # in the pool: started, not known dead
    probing: bool = False  # a ready() probe is waiting on its (re)start
    last_result_at: float = 0.0
    writer: Any = None  # the jobs.output.PartWriter it publishes its parts with, None: its rows come back
    reads_input: bool = False  # it reads its shards (jobs.inputs.ShardRead), else the driver sends their rows


def _group_cpus(group: WorkerGroup) -> tuple[float, str]:
    """The CPUs each of the group's actors reserves (its torch threads), and why."""
    if group.num_cpus:
        return group.num_cpus, "the group's num_cpus"
    if group.num_gpus > 0:
        return 1.0, "one CPU for a GPU worker"
    node_cpus = int(max([n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")], default=1))
    return float(max(1, node_cpus // group.count)), f"the largest node's {node_cpus} CPUs for {group.count} worker(s)"


def _feasible(group: WorkerGroup, cpus: float) -> bool:
    """Whether some node of the cluster (as it is now) can hold one actor of the group."""
    need = {"CPU": cpus, "GPU": group.num_gpus, **group.resources}
    if group.accelerator_type:
        need[f"accelerator_type:{group.accelerator_type}"] = 0.001
    return any(all(node["Resources"].get(k, 0) >= v for k, v in need.items() if v > 0)
               for node in ray.nodes() if node.get("Alive"))


def start_workers(cfg: JobConfig, config_hash: str, numerics_board: str | None = None, *, adaptable: bool = False,
                  prompt_files: tuple[str, dict[str, bytes]] | None = None,
                  rows_to_decode: int | None = None) -> list[Worker]:
    """Create every group's actors (their constructors load the model and profile the device). Their numeric
    decisions come from the job's NumericsBoard actor of the name ``numerics_board`` (workers/board.py).
    ``adaptable``: they may be handed new prompt tokens mid-job; ``prompt_files``: the prompt-token artifact they
    start with, as (where from, its files), instead of ``decoding.prompts``. ``rows_to_decode``: the rows this run
    decodes, of which each worker expects an even share (its ``compile=auto`` weighs it)."""
    workers = []
    share = -(-rows_to_decode // max(1, sum(g.count for g in cfg.workers))) if rows_to_decode else None
    for group in cfg.workers:
        cpus, why = _group_cpus(group)
        if not _feasible(group, cpus):
            log.warning("worker group %r needs resources no node has now (cpus=%s, gpus=%s, accelerator=%s, %s); "
                        "its actors start only if such a node joins", group.name, cpus, group.num_gpus,
                        group.accelerator_type, group.resources)
        cls = remote_worker(num_cpus=cpus, num_gpus=group.num_gpus, accelerator_type=group.accelerator_type,
                            resources=group.resources, max_restarts=cfg.faults.max_restarts)
        model = cfg.group_model(group).model_dump()
        for index in range(group.count):
            handle = cls.remote(model, cfg.decoding.model_dump(), group=group.name, index=index,
                                config_hash=config_hash, batch_size=group.batch_size, max_batch_size=cfg.shard_size,
                                num_threads=max(1, int(cpus)), latency_profile=group.latency_profile,
                                numerics_board=numerics_board, adaptable=adaptable, prompt_files=prompt_files,
                                niceness=worker_niceness(), expected_rows=share, threads_reason=why)
            workers.append(Worker(handle, group.name, index))
    return workers


def died_records(shard: Shard, config_hash: str) -> list[dict]:
    message = f"the shard of this row failed on {shard.attempts} workers: " + " | ".join(shard.deaths)
    return [RowOutput(id=row_id, error=RowError(ErrorCode.WORKER_DIED, message), config_hash=config_hash).to_dict()
            for row_id in shard.ids]


class AllWorkersFailed(RuntimeError):
    """No worker is left to decode the remaining shards."""


def run_shards(workers: list[Worker], shards: Iterable[Shard], *, max_attempts: int, config_hash: str,
               on_ready: Callable[[Worker], None], startup_timeout_s: float, tick_s: float = TICK_S,
               on_tick: Callable[[], None] = lambda: None, wait_for_all: bool = False,
               prefetch: int = 0, submit: Callable[[Worker, Shard], Any] | None = None,
               ) -> Iterator[tuple[Shard, dict[str, Any], Worker | None]]:
    """Decode every shard on the pool; yield (shard, result, worker) as shards finish: the worker's result
    (``DecodeWorker.process``: its part, or its rows as ``records``), or for a shard given up ``{"records": a
    worker_died error per row}`` and no worker. ``submit(worker, shard)`` sends a shard (default:
    ``process(shard.rows)``) and returns the call's object ref.

    Workers join the pool as their constructors finish (`on_ready` is called for each, also after a
    restart). Each worker holds up to 1 + `prefetch` shards: the one it decodes and those it will take next
    (with continuous batching its slots are refilled from them, never after a round trip to the driver).
    Shards go first to the workers holding the fewest. A worker that dies hands every shard it held back to
    the queue. Raises AllWorkersFailed when no worker is alive or starting and shards remain, or when none
    has started within `startup_timeout_s`. With `wait_for_all`, no shard is handed out until every worker
    has started or failed (or the timeout passed): every device then gets a share of the work.
    """
    queue = ShardQueue(shards)
    depth = 1 + prefetch
    send = submit or (lambda w, shard: w.handle.process.remote(shard.rows))
    # In flight: object ref -> (worker, the shard it decodes, or None for a ready() probe, submit time).
    inflight: dict[Any, tuple[Worker, Shard | None, float]] = {}

    def probe(w: Worker, **options: Any) -> None:
        w.probing = True
        inflight[w.handle.ready.options(**options).remote()] = (w, None, time.perf_counter())

    for w in workers:
        probe(w)
    started = time.perf_counter()
    any_ready = False
    failures: list[str] = []
    starting = len(workers)  # first starts still pending
    while queue or any(shard is not None for _, shard, _ in inflight.values()):
        held = wait_for_all and starting > 0 and time.perf_counter() - started < startup_timeout_s
        while queue and not held:
            free = [w for w in workers if w.joined and w.in_flight < depth]
            if not free:
                break
            w, shard = min(free, key=lambda w: w.in_flight), queue.popleft()
            w.in_flight += 1
            inflight[send(w, shard)] = (w, shard, time.perf_counter())
        if not inflight:
            raise AllWorkersFailed("every worker has died or failed to start; last errors: "
                                   + " | ".join(failures[-3:]))
        if not any_ready and time.perf_counter() - started > startup_timeout_s:
            raise AllWorkersFailed(f"no worker started within {startup_timeout_s:.0f} s (are the groups' "
                                   "resources available in the cluster?)")
        done, _ = ray.wait(list(inflight), num_returns=1, timeout=tick_s)
        on_tick()
        if not done:
            continue
        ref = done[0]
        w, shard, submitted = inflight.pop(ref)
        if shard is not None:
            w.in_flight -= 1
        else:
            w.probing = False
        try:
            result = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            reason = f"{w.info.get('worker', f'{w.group}/{w.index}')}: {_brief(exc)}"
            failures.append(reason)
            if shard is None:  # the constructor failed, or Ray gave up restarting the actor
                starting -= not w.info  # a first start that failed
                log.warning("worker %s/%d is gone: %s", w.group, w.index, reason)
                continue
            shard.attempts += 1
            shard.deaths.append(reason)
            log.warning("shard %d failed on %s (attempt %d of %d)", shard.index, reason, shard.attempts, max_attempts)
            if shard.attempts >= max_attempts:
                yield shard, {"records": died_records(shard, config_hash)}, None
            else:
                queue.appendleft(shard)  # the next free worker takes it
            if isinstance(exc, RayActorError):
                # Out of the pool until it is back; the probe waits out a restart, and fails only once Ray has
                # given up on the actor. The other shards it held fail the same way and go back too.
                w.joined = False
                if not w.probing:
                    probe(w, max_task_retries=-1)
            continue
        if shard is None:  # a worker (re)started
            starting -= not w.info
            w.info = result
            any_ready = True
            on_ready(w)
            w.joined = True
            continue
        now = time.perf_counter()
        w.last_busy_seconds = now - max(submitted, w.last_result_at)
        w.last_result_at = now
        w.last_slots = result.get("slots") or {}
        w.last_clock = result.get("clock") or {}
        if result.get("graphs") is not None:  # the step's captures so far: summary.json's workers show the last
            w.info["graphs"] = result["graphs"]
        yield shard, result, w


def worker_niceness() -> int:
    """The niceness decode workers take (workers/actor.take_niceness): the driver's, so that ``nice python
    jobs/run.py`` is honoured; but a driver that is a Ray job's entrypoint (``ray job submit``) runs at Ray's
    worker niceness, not one the user chose: then 0."""
    return 0 if RAY_JOB_ENTRYPOINT_ENV in os.environ else os.nice(0)


def _brief(exc: BaseException) -> str:
    """First and last lines of a Ray error: the kind of failure and the underlying exception."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text[:500]}"
