"""How a SlotBatch runs its device step (decoding/slots.py ``SlotBatch._device_step``): the runner, chosen once
per batch from its step mode. A runner decides the shapes a step runs at and how a sampled step draws, and runs
the one step function:

- ``EagerStep`` ("eager"): each step sized to its rows: the narrowest tree that fits their depth states, the
  longest row's columns, sampled verification walking only the rows still in their tree.
- ``FixedEagerStep`` ("fixed"): eager at fixed shapes (what the three below run, without compiling: tests and
  benchmarks compare it with eager).
- ``CompiledStep`` ("compile"): ``torch.compile(fullgraph=True, dynamic=False)``; dynamo keeps one graph per shape.
  On a CPU it is the ``--compile`` option; on CUDA its ``mode`` may be "reduce-overhead" (inductor's own graphs).
- ``CudaGraphStep`` ("cuda_graphs"): the eager step captured per shape with ``torch.cuda.CUDAGraph`` on first
  use, after two warm-up runs whose effects on the slots are undone; every later step of that shape is a
  replay. Graphs share one memory pool and are held in an LRU of ``max_shapes`` (``ShapeRunner``). A capacity
  growth of the KV cache or of the uniform streams reallocates tensors the graphs read, so it drops them (they
  are captured again at the next use); a worker's memory plan fixes both, so it never happens in a job.
- ``CheckedReplayStep`` ("checked_replay"; tests, any device): records what a shape's first step reads and checks
  every later step of that shape reads the same tensors at the same addresses, as a captured graph would.

At fixed shapes every step runs at one of a few shapes, with no host read inside: slots 0..``slot_bucket(A)``-1
(the free ones among them idle), the tree set's widest tree for every row, attention over the longest row's
columns rounded up to a power of two (``slot_cache.fixed_view``), sampling without data-dependent shapes
(decoding/draws.py). The step reads every input from tensors the batch allocates once (the slots' KV lengths,
roots, states, guesses, sampler positions and parameters, the KV cache, the tree buffers, the prompt-token
table) and writes its results in place, so a captured graph replays it with no argument but its key. A shape is
the key (rows of the slot bucket, tree set, step sizes, attention columns, whether and how it samples): a
handful per worker, from the slot buckets and the tree sets in use. The tokens are the same in every mode.

Nothing in the step changes Python state (the decoders count their steps on the host, in ``finish_step``): a
compiled step would be specialised on it, and a replay would not run it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from decoding.draws import FixedShapeDraw, SlotDraw
from decoding.protocol import StepPlan
from decoding.sampling import SamplingParams
from decoding.slot_cache import fixed_view, step_view
from decoding.tree import StepSizes

StepMode = Literal["eager", "fixed", "compile", "cuda_graphs", "checked_replay"]

# The slot tensors a device step advances in place (decoding/slots.py): restored after warm-ups and trials.
ADVANCED = ("kv_len", "emitted", "root", "state", "guesses")

# step(batch, A, buffers, sizes, view, draw) -> (packed [A, ...], late_width): SlotBatch._device_step, unbound
DeviceStep = Callable[..., tuple[torch.Tensor, int | None]]


def slot_bucket(rows: int, num_slots: int) -> int:
    """The rows a fixed-shape step runs for ``rows`` busy slots: the next power of two, at most ``num_slots``."""
    return min(num_slots, 1 << max(rows - 1, 0).bit_length())


def shape_key(A: int, buffers, sizes, view: int, draw) -> tuple:
    """What fixes a device step's graph: the rows run, the tree set, the sizes, the attention columns, and the
    draw (None: greedy; else its host-known filters)."""
    tree = None if buffers is None else buffers.tree_set.tree_hash
    return A, tree, tuple(sizes), view, None if draw is None else draw.filters


class EagerStep:
    """The device step run as it is, each step sized to its rows."""

    fixed_shapes = False
    draw_class: type[SlotDraw] = SlotDraw

    def __init__(self, step: DeviceStep):
        self.step = step

    def shape(self, rows: int, plan: StepPlan, longest: int, num_slots: int,
              capacity: int) -> tuple[int, StepSizes, int]:
        """(slots run, step sizes, attention columns) of a step over ``rows`` busy slots whose longest row holds
        ``longest`` columns: sized to the rows."""
        return rows, plan.sizes, step_view(longest, plan.sizes.slots, capacity)

    def draw(self, batch, params: list[SamplingParams]) -> SlotDraw | None:
        """The step's draw for the rows' sampling parameters; None when every row is greedy (the decoders then
        take their greedy path)."""
        if all(p.greedy for p in params):
            return None
        return self.draw_class.of(batch, params)

    def __call__(self, batch, A: int, buffers, sizes: StepSizes, view: int, draw) -> tuple[torch.Tensor, int | None]:
        return self.step(batch, A, buffers, sizes, view, draw)

    def stats(self) -> dict[str, Any] | None:
        """What the runner compiled or captured (a worker's summary reports it); None for an eager step."""
        return None


class FixedEagerStep(EagerStep):
    """The device step run as it is, at fixed shapes."""

    fixed_shapes = True
    draw_class = FixedShapeDraw

    def shape(self, rows: int, plan: StepPlan, longest: int, num_slots: int,
              capacity: int) -> tuple[int, StepSizes, int]:
        """At fixed shapes: the slot bucket, the tree set's widest sizes, a power-of-two view."""
        sizes = plan.widest
        return slot_bucket(rows, num_slots), sizes, fixed_view(longest, sizes.slots, capacity)


class CompiledStep(FixedEagerStep):
    """The device step through ``torch.compile`` (fullgraph: a graph break is an error, not a slow path)."""

    def __init__(self, step: DeviceStep, mode: str | None = None, recompile_limit: int = 64):
        super().__init__(step)
        # Without options, dynamo checks ~1,500 guards before every call (0.3 ms on a 2-core VM, a fifth of a
        # small model's compiled step); most watch the model's modules and module globals, which a batch never
        # changes. The guards kept watch the step's arguments and every tensor's shape, dtype and device.
        options: dict[str, Any] | None = None if mode is not None else {"guard_filter_fn": step_guards}
        self.compiled = torch.compile(step, fullgraph=True, dynamic=False, mode=mode, options=options)
        self.recompile_limit = recompile_limit
        self.shapes: set[tuple] = set()
        self.compile_seconds = 0.0  # the first calls of each shape (a compile and one step)

    def __call__(self, batch, A: int, buffers, sizes, view: int, draw) -> tuple[torch.Tensor, int | None]:
        key = shape_key(A, buffers, sizes, view, draw)
        started = None if key in self.shapes else time.perf_counter()
        self.shapes.add(key)
        with torch._dynamo.config.patch(recompile_limit=self.recompile_limit):
            out = self.compiled(batch, A, buffers, sizes, view, draw)
        if started is not None:
            self.compile_seconds += time.perf_counter() - started
        return out

    def stats(self) -> dict[str, Any]:
        """Shapes compiled (dynamo falls back to eager past ``recompile_limit``), the seconds their first calls
        took, and the limit."""
        return {"captures": len(self.shapes), "capture_seconds": round(self.compile_seconds, 3),
                "held": len(self.shapes), "cap": self.recompile_limit}


def step_guards(entries) -> list[bool]:
    """Dynamo guard filter: keep every guard except those on nn modules and on module globals."""
    not_global = torch.compiler.skip_guard_on_globals_unsafe(entries)
    not_module = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [a and b for a, b in zip(not_global, not_module)]


class ShapeRunner(FixedEagerStep):
    """The device step run once per shape to make a record of it (a captured graph, or the reads it made), and
    that record used at every later call of the shape. Records are held in an LRU of ``max_shapes`` (the memory
    plan's cap): the least recently used is dropped past it, and made again at its next use. A record keeps the
    tree buffers it was made with alive, so a lookup of that tree set finds the same tensors (decoding/tree.py).
    A reallocation of the tensors every record reads (the KV cache's or the uniform streams' growth) drops them
    all."""

    def __init__(self, step: DeviceStep, max_shapes: int = 64):
        super().__init__(step)
        self.max_shapes = max_shapes
        self.records: OrderedDict[tuple, Any] = OrderedDict()
        self.allocation: tuple[Any, ...] | None = None
        self.captures, self.capture_seconds, self.evictions = 0, 0.0, 0

    def _check_allocation(self, batch) -> None:
        now = (batch.cache.capacity, batch.uniforms.data_ptr())
        if now != self.allocation:
            self.records.clear()
            self.allocation = now

    def __call__(self, batch, A: int, buffers, sizes, view: int, draw) -> tuple[torch.Tensor, int | None]:
        self._check_allocation(batch)
        key = shape_key(A, buffers, sizes, view, draw)
        record = self.records.get(key)
        if record is not None:
            self.records.move_to_end(key)
            return self._replay(record, batch, A, buffers, sizes, view, draw)
        started = time.perf_counter()
        record, out = self._record(batch, A, buffers, sizes, view, draw)
        self.capture_seconds += time.perf_counter() - started
        self.captures += 1
        self.records[key] = record
        while len(self.records) > self.max_shapes:
            self.records.popitem(last=False)
            self.evictions += 1
        return out

    def stats(self) -> dict[str, Any]:
        """Captures made, their seconds, records held and dropped, and the cap (a worker's summary reports them)."""
        return {"captures": self.captures, "capture_seconds": round(self.capture_seconds, 3),
                "held": len(self.records), "evicted": self.evictions, "cap": self.max_shapes}

    def _record(self, batch, A, buffers, sizes, view, draw) -> tuple[Any, tuple[torch.Tensor, int | None]]:
        raise NotImplementedError

    def _replay(self, record, batch, A, buffers, sizes, view, draw) -> tuple[torch.Tensor, int | None]:
        raise NotImplementedError


class CudaGraphStep(ShapeRunner):
    """The device step captured as one CUDA graph per shape, replayed after (``torch.cuda.CUDAGraph``)."""

    def __init__(self, step: DeviceStep, max_shapes: int = 64, warmups: int = 2):
        super().__init__(step, max_shapes)
        self.warmups = warmups
        self.pool: Any = None  # the graphs' shared memory pool, made at the first capture

    def _record(self, batch, A, buffers, sizes, view, draw):
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
            out = self.step(batch, A, buffers, sizes, view, draw)
        graph.replay()
        return (graph, out, buffers), out

    def _replay(self, record, batch, A, buffers, sizes, view, draw):
        graph, out, _ = record
        graph.replay()
        return out


class StaleReplay(AssertionError):
    """A step of a recorded shape read a tensor at another address, shape, stride or dtype than the record:
    a CUDA graph replayed there would have read stale memory."""


class CheckedReplayStep(ShapeRunner):
    """For tests, on any device: what a CUDA graph would get wrong, found without one. A shape's first call records
    every tensor the step reads from outside itself (storage address and offset, shape, stride, dtype, in op
    order: the slots' state, the KV cache, the tree buffers, the prompt-token table, the sampling parameters and
    streams, the weights); every later call of that shape runs the step again under the same watch and raises
    ``StaleReplay`` at the first read that differs."""

    def _record(self, batch, A, buffers, sizes, view, draw):
        with ReadRecorder() as reads:
            out = self.step(batch, A, buffers, sizes, view, draw)
        return (reads.reads, buffers), out

    def _replay(self, record, batch, A, buffers, sizes, view, draw):
        recorded, _ = record
        with ReadRecorder() as reads:
            out = self.step(batch, A, buffers, sizes, view, draw)
        for i, (then, now) in enumerate(zip(recorded, reads.reads)):
            if then != now:
                raise StaleReplay(f"read {i} of the step at shape {shape_key(A, buffers, sizes, view, draw)}: "
                                  f"recorded {then}, now {now}")
        if len(recorded) != len(reads.reads):
            raise StaleReplay(f"the step made {len(reads.reads)} outside reads, its record {len(recorded)}")
        return out


LIFTED = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


class ReadRecorder(TorchDispatchMode):
    """Records, per op, each input tensor whose storage the watched code did not create: (op, storage address,
    offset, shape, stride, dtype, device)."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple] = []
        self.created: set[int] = set()
        self.outside: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LIFTED and args[0].numel() <= 64:
            # A constant the step makes from a Python value (``x[:, 0] = True``): a graph bakes its value in, so
            # its value is what must not change, not the fresh tensor's address.
            self.reads.append((str(func), "constant", tuple(args[0].flatten().tolist()), args[0].dtype))
            out = func(*args, **kwargs)
            self.created.add(out.untyped_storage().data_ptr())
            return out
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                address = t.untyped_storage().data_ptr()
                if address not in self.created:
                    self.outside.add(address)
                    self.reads.append((str(func), address, t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                                       t.dtype, t.device))
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.outside:
                self.created.add(t.untyped_storage().data_ptr())
        return out


def step_runner(mode: StepMode, step: DeviceStep, compile_mode: str | None = None,
                max_shapes: int = 64) -> EagerStep:
    """The runner of ``step`` (the unbound ``SlotBatch._device_step``) in this mode. ``max_shapes``: the graphs
    (or records) a runner holds at once."""
    if mode == "eager":
        return EagerStep(step)
    if mode == "fixed":
        return FixedEagerStep(step)
    if mode == "compile":
        return CompiledStep(step, compile_mode, recompile_limit=max_shapes)
    if mode == "cuda_graphs":
        if not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device")
        return CudaGraphStep(step, max_shapes)
    if mode == "checked_replay":
        return CheckedReplayStep(step, max_shapes)
    raise ValueError(f"unknown step mode {mode!r}")
