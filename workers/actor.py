"""The Ray actor that decodes batches: a thin wrapper over `workers.engine.DecodeEngine`."""

from __future__ import annotations

import os
from typing import Any

import ray

from workers.engine import DecodeEngine, DecodingConfig
from workers.models import ModelConfig


class DecodeWorker:
    """Loads the model once, then decodes the batches it is handed."""

    def __init__(self, model: dict[str, Any], decoding: dict[str, Any], num_threads: int | None = None,
                 batch_size: int = 1):
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        # Profiles the device (or loads its cached profile) and builds this worker's tree.
        self.engine = DecodeEngine.from_config(ModelConfig(**model), DecodingConfig(**decoding), batch_size)

    def ready(self) -> dict[str, Any]:
        """What this worker loaded (returns once the model is in memory)."""
        return {**self.engine.describe(), "pid": os.getpid()}

    def process(self, rows: list[dict]) -> list[dict]:
        """Decode one batch of input rows into result records (one per row, same order)."""
        return [out.to_dict() for out in self.engine.run_batch(rows)]


def remote_worker(
    *, num_cpus: float, num_gpus: float = 0, max_restarts: int = 1, max_task_retries: int = 2
):
    """`DecodeWorker` as a Ray actor class with the given resources.

    A worker that dies (say, killed for memory) is restarted by Ray and its in-flight batch retried,
    up to the given counts.
    """
    return ray.remote(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=max_restarts,
        max_task_retries=max_task_retries,
    )(DecodeWorker)
