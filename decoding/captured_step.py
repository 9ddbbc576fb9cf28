"""How a SlotBatch runs its device step (decoding/slots.py ``SlotBatch._device_step``): eagerly, compiled with
``torch.compile``, or replayed from CUDA graphs, one graph per shape.

The step at fixed shapes (``fixed_shapes=True``) reads every input from tensors the batch allocates once (the
slots' KV lengths, roots, states, guesses, sampler positions and parameters, the KV cache, the tree buffers,
the prompt-token table) and writes its results in place, so a captured graph replays it with no argument
but its key. A shape is the key (rows of the slot bucket, tree set, step sizes, attention columns, whether
and how it samples): a handful per worker, from the slot buckets and the tree sets in use.

- ``CompiledStep``: ``torch.compile(fullgraph=True, dynamic=False)``; dynamo keeps one graph per shape. On a
  CPU it is the ``--compile`` option; on CUDA its ``mode`` may be "reduce-overhead" (inductor's own graphs).
- ``CudaGraphStep``: the eager (or compiled) step captured per shape with ``torch.cuda.CUDAGraph`` on first use,
  after two warm-up runs whose effects on the slots are undone; every later step of that shape is a replay.
  Graphs share one memory pool. A capacity growth of the KV cache or of the uniform streams reallocates
  tensors the graphs read, so it drops them (they are captured again at the next use).

Nothing in the step changes Python state (the decoders count their steps on the host, ``count_step``): a
compiled step would be specialised on it, and a replay would not run it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

StepMode = Literal["eager", "compile", "cuda_graphs"]

# The slot tensors a device step advances in place (decoding/slots.py): restored after warm-ups and trials.
ADVANCED = ("kv_len", "emitted", "root", "state", "guesses")


def shape_key(A: int, buffers, sizes, view: int, draw) -> tuple:
    """What fixes a device step's graph: the rows run, the tree set, the sizes, the attention columns, and the
    draw (None: greedy; else its host-known filters)."""
    tree = None if buffers is None else buffers.tree_set.tree_hash
    return A, tree, tuple(sizes), view, None if draw is None else draw.filters


class CompiledStep:
    """The device step through ``torch.compile`` (fullgraph: a graph break is an error, not a slow path)."""

    def __init__(self, step: Callable, mode: str | None = None, recompile_limit: int = 64):
        # Without options, dynamo checks ~1,500 guards before every call (0.3 ms on a 2-core VM, a fifth of a
        # small model's compiled step); most watch the model's modules and module globals, which a batch never
        # changes. The guards kept watch the step's arguments and every tensor's shape, dtype and device.
        options = None if mode is not None else {"guard_filter_fn": step_guards}
        self.compiled = torch.compile(step, fullgraph=True, dynamic=False, mode=mode, options=options)
        self.recompile_limit = recompile_limit
        self.shapes: set[tuple] = set()

    def __call__(self, batch, A: int, buffers, sizes, view: int, draw) -> torch.Tensor:
        self.shapes.add(shape_key(A, buffers, sizes, view, draw))
        with torch._dynamo.config.patch(recompile_limit=self.recompile_limit):
            return self.compiled(batch, A, buffers, sizes, view, draw)


def step_guards(entries) -> list[bool]:
    """Dynamo guard filter: keep every guard except those on nn modules and on module globals."""
    not_global = torch.compiler.skip_guard_on_globals_unsafe(entries)
    not_module = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [a and b for a, b in zip(not_global, not_module)]


class CudaGraphStep:
    """The device step captured as one CUDA graph per shape, replayed after (``torch.cuda.CUDAGraph``)."""

    def __init__(self, step: Callable, warmups: int = 2):
        self.step, self.warmups = step, warmups
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.allocation: tuple[Any, ...] | None = None  # what the captured graphs read from (see _check_allocation)
        self.captures = 0

    def _check_allocation(self, batch) -> None:
        """Graphs hold the addresses of the tensors they read; a reallocation (growth) makes them stale."""
        now = (batch.cache.capacity, batch.uniforms.data_ptr())
        if now != self.allocation:
            self.graphs.clear()
            self.allocation = now

    def __call__(self, batch, A: int, buffers, sizes, view: int, draw) -> torch.Tensor:
        self._check_allocation(batch)
        key = shape_key(A, buffers, sizes, view, draw)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(batch, A, buffers, sizes, view, draw)
        graph, packed = entry
        graph.replay()
        return packed

    def _capture(self, batch, A, buffers, sizes, view, draw) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        saved = batch.slot_snapshot()  # the warm-ups advance the slots; the columns they write lie past kv_len
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmups):
                self.step(batch, A, buffers, sizes, view, draw)
                batch.restore_slots(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # thread_local: the worker may train prompt tokens in another thread meanwhile (workers/actor.adapt), whose
        # allocations and syncs the default ("global") mode would turn into a failed capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            packed = self.step(batch, A, buffers, sizes, view, draw)
        self.captures += 1
        return graph, packed


def step_runner(mode: StepMode, step: Callable, compile_mode: str | None = None):
    """The callable that runs ``step`` (the unbound ``SlotBatch._device_step``) in this mode, or None (eager)."""
    if mode == "eager":
        return None
    if mode == "compile":
        return CompiledStep(step, compile_mode)
    if mode == "cuda_graphs":
        if not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device")
        return CudaGraphStep(step)
    raise ValueError(f"unknown step mode {mode!r}")
