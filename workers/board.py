"""The job's board of numeric decisions (workers/numerics.py): one small actor the driver starts and every worker
asks. Kept free of heavy imports (no torch): Ray imports this module to build the actor on the driver's node."""

from __future__ import annotations

import uuid
from typing import Any

import ray


class NumericsBoard:
    """The job's numeric decisions (workers/numerics.py), by machine-kind key: the first proposal for a key is the
    decision, for every worker of the job. The driver seeds it with the decisions job.json records."""

    def __init__(self, decisions: dict[str, int] | None = None):
        self.decisions = dict(decisions or {})

    def get(self, key: str) -> int | None:
        return self.decisions.get(key)

    def settle(self, key: str, rows_below: int) -> tuple[int, bool]:
        first = key not in self.decisions
        return self.decisions.setdefault(key, rows_below), first


class BoardClient:
    """The NumericsBoard actor named ``name`` seen as the ``workers.numerics.DecisionBoard`` the loader asks (the
    loader knows no Ray)."""

    def __init__(self, name: str):
        self.handle = ray.get_actor(name)

    def get(self, key: str) -> int | None:
        return ray.get(self.handle.get.remote(key))

    def settle(self, key: str, rows_below: int) -> tuple[int, bool]:
        return ray.get(self.handle.settle.remote(key, rows_below))


def start_board(decisions: dict[str, int]) -> tuple[Any, str]:
    """A NumericsBoard actor for this job on this (the driver's) node, and its name, which workers look it up by (a
    handle among an actor's constructor arguments would sit in the object store, which Ray warns about for
    restartable actors). It takes no CPU; it lives while the returned handle does, and its node going away ends
    the job anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"ppd-numerics-{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = ray.remote(NumericsBoard).options(name=name, num_cpus=0, scheduling_strategy=here).remote(decisions)
    return handle, name
