"""The Ray actor that decodes shards of rows: a thin wrapper over `workers.engine.DecodeEngine`."""

from __future__ import annotations

import os
import socket
from typing import Any

import ray

from workers.board import BoardClient
from workers.engine import DecodeEngine, DecodingConfig
from workers.models import ModelConfig


class DecodeWorker:
    """Loads the model once, profiles its device, then decodes the shards it is handed."""

    def __init__(self, model: dict[str, Any], decoding: dict[str, Any], *, group: str, index: int,
                 config_hash: str, batch_size: int | str = 1, max_batch_size: int = 64,
                 num_threads: int | None = None, latency_profile: str | None = None,
                 numerics_board: str | None = None):
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.group = group
        self.config_hash = config_hash
        # A restarted actor is a new process: its pid (and maybe its node) differ, so the name says which
        # process decoded a row.
        self.name = f"{group}/{index} pid {os.getpid()} on {socket.gethostname()}"
        # Profiles the device (or loads its cached profile) and builds this worker's tree and batch size.
        # The model's numeric decisions come from the job's board (the NumericsBoard actor of that name), so every
        # worker on one kind of machine, and this one after a restart, computes with the same kernels.
        board = BoardClient(numerics_board) if numerics_board is not None else None
        self.engine = DecodeEngine.from_config(ModelConfig(**model), DecodingConfig(**decoding), batch_size, board,
                                               max_batch_size=max_batch_size, latency_profile=latency_profile)

    def ready(self) -> dict[str, Any]:
        """What this worker loaded and chose (returns once the model is in memory)."""
        return {**self.engine.describe(), "worker": self.name, "group": self.group, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def process(self, rows: list[dict]) -> list[dict]:
        """Decode one shard of input rows into result records (one per row, same order)."""
        records = [out.to_dict() for out in self.engine.run_rows(rows)]
        for record in records:
            record["worker"], record["worker_group"], record["config_hash"] = self.name, self.group, self.config_hash
        return records


def remote_worker(*, num_cpus: float, num_gpus: float = 0, accelerator_type: str | None = None,
                  resources: dict[str, float] | None = None, max_restarts: int = 3):
    """`DecodeWorker` as a Ray actor class with the given resources.

    Ray restarts a worker that dies (killed for memory, its node lost) up to `max_restarts` times. Its
    in-flight shard is not retried on it: the driver hands the shard back to the pool, so another
    worker takes it (jobs/pool.py).
    """
    options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                   max_task_retries=0)
    if accelerator_type:
        options["accelerator_type"] = accelerator_type
    if resources:
        options["resources"] = dict(resources)
    return ray.remote(**options)(DecodeWorker)
