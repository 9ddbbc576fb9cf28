"""Step latency of the real PPD decode step on this device, by input slots per row and batch size.

A profile times ``PPDDecoder.step`` (tree forward, verification, KV compaction) over a live KV cache of a
fixed context length, for a grid of slot counts per row (1 = the root alone, i.e. plain decoding; the trees
of each size come from trees/synthetic.py) and the batch sizes asked for: a warm-up, a device sync around
each repeat, the median. It stops early when the time budget runs out (largest inputs last); sizes it did not
reach have no latency and are never chosen. Workers cache profiles on disk (workers/profiles.py).

``step_mode`` is the step the worker will run: "eager" times the decoder's step sized to the rows;
"cuda_graphs" (or "compile") times a SlotBatch's whole device step at fixed shapes, captured (compiled) at
each size's first call, the warm-up, and replayed after, timed with CUDA events on a GPU.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import torch
from pydantic import BaseModel, ConfigDict, Field

from decoding import PPDDecoder, PromptTokens
from decoding.runners import StepMode
from decoding.slot_cache import SlotCache, fixed_view
from decoding.slots import SlotBatch, one_step, prefill_slots
from decoding.tree import tree_set_buffers
from profiling.device import DeviceIdentity, identify
from trees.synthetic import max_tree_slots, synthetic_tree_set

log = logging.getLogger(__name__)

DEFAULT_SLOTS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class LatencyPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch: int
    slots: int
    seconds: float = Field(description="Median seconds of one decode step.")
    repeats: int


class LatencyProfile(BaseModel):
    """Measured step latencies of one model on one device."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    device: DeviceIdentity
    model_hash: str
    k: int
    ensemble: int
    context_len: int = Field(description="KV length the steps ran over.")
    step_mode: str = Field("eager", description="The step timed: eager, compile or cuda_graphs.")
    points: list[LatencyPoint]
    profile_seconds: float = Field(description="Wall time the measurement took.")
    measured_at: str

    def batches(self) -> list[int]:
        return sorted({p.batch for p in self.points})

    def measured_slots(self, batch: int) -> list[int]:
        return sorted(p.slots for p in self.points if p.batch == batch)

    def step_seconds(self, batch: int, slots: int) -> float:
        """Latency of a step with ``slots`` inputs per row: linear between measured slot counts of the
        nearest measured batch size at or above ``batch`` (the largest one beyond it); inf past the largest
        measured slot count."""
        batches = self.batches()
        b = next((x for x in batches if x >= batch), batches[-1])
        curve = sorted((p.slots, p.seconds) for p in self.points if p.batch == b)
        if slots > curve[-1][0]:
            return float("inf")
        lo = max((c for c in curve if c[0] <= slots), default=curve[0])
        hi = min((c for c in curve if c[0] >= slots), default=curve[-1])
        if hi[0] == lo[0]:
            return lo[1]
        return lo[1] + (hi[1] - lo[1]) * (slots - lo[0]) / (hi[0] - lo[0])


PROFILE_TOP_K = 10  # ranks per prompt token in the synthetic trees a profile times


def attempted_slots(k: int, n: int, slots: Sequence[int]) -> list[int]:
    """The slot counts ``measure_profile`` times at each batch size, unless its time budget runs out first."""
    return sorted(s for s in set(slots) if s <= max_tree_slots(k, PROFILE_TOP_K, n))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_profile(model, prompt_tokens: PromptTokens, *, model_hash: str, batch_sizes: Sequence[int],
                    slots: Sequence[int] = DEFAULT_SLOTS, context_len: int = 256, budget_s: float | None = None,
                    repeats: int | None = None, seed: int = 0, step_mode: StepMode = "eager",
                    interleaved: bool = False) -> LatencyProfile:
    """Time the decode step for every (batch, slots) the budget allows. ``interleaved``: every size is timed
    in each round of repeats, in turn, and no budget applies: a busy moment then slows every size alike, and
    the ratios between sizes (what a spot check compares) keep their shape."""
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    identity = identify(device, dtype)
    gpu = device.type == "cuda"
    budget_s = budget_s if budget_s is not None else (30.0 if gpu else 60.0)
    repeats = repeats or (7 if gpu else 3)
    warmups = 2 if gpu else 1
    k, n, top_k = prompt_tokens.k, prompt_tokens.n, PROFILE_TOP_K
    vocab = model.get_input_embeddings().weight.shape[0]
    decoder = PPDDecoder(model, prompt_tokens, synthetic_tree_set(k, top_k, 1, n))
    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    points: list[LatencyPoint] = []
    batch_sizes = sorted(set(batch_sizes))
    for bi, batch in enumerate(batch_sizes):
        batch_deadline = started + budget_s * (bi + 1) / len(batch_sizes)
        prompts = torch.randint(0, vocab, (batch, context_len), generator=g).tolist()
        root = torch.randint(0, vocab, (batch,), generator=g).to(device)
        guesses = torch.randint(0, vocab, (batch, k, top_k), generator=g).to(device)
        if step_mode == "eager":
            cache = SlotCache.for_model(model, batch, context_len + max(slots))
            prefill_slots(model, cache, 0, prompts)
            kv_len = torch.full((batch,), context_len, dtype=torch.long, device=device)
            state = torch.full((batch,), k, dtype=torch.long, device=device)
            step = _eager_step_timer(decoder, cache, kv_len, root, guesses, state)
        else:
            step = FixedStepTimer(decoder, batch, prompts, root, guesses, max(slots), step_mode)
        if interleaved:
            points += _interleaved_points(step, batch, k, n, top_k, attempted_slots(k, n, slots), warmups, repeats,
                                          device)
            del step
            continue
        previous: LatencyPoint | None = None  # this batch's last point
        for size in attempted_slots(k, n, slots):
            # Predict this point's cost as proportional to its slots (pessimistic where the curve is flat)
            # and stop before the deadline.
            if previous is not None:
                per_step = previous.seconds * size / previous.slots
                if time.perf_counter() + per_step * (warmups + repeats) > batch_deadline:
                    log.info("profile: batch %d stops before %d slots (time budget)", batch, size)
                    break
            buffers = tree_set_buffers(synthetic_tree_set(k, top_k, size, n), n, device)
            times = []
            for i in range(warmups + repeats):
                seconds = step(buffers)
                if i >= warmups:
                    times.append(seconds)
                if i >= warmups and time.perf_counter() > batch_deadline:
                    break
            actual = buffers.state_sizes[k].slots  # = size, or just below for a few ensemble sizes
            previous = LatencyPoint(batch=batch, slots=actual, seconds=statistics.median(times), repeats=len(times))
            points.append(previous)
        del step
    return LatencyProfile(device=identity, model_hash=model_hash, k=k, ensemble=n, context_len=context_len,
                          step_mode=step_mode,
                          points=points, profile_seconds=time.perf_counter() - started,
                          measured_at=datetime.now(UTC).isoformat(timespec="seconds"))


def _eager_step_timer(decoder, cache, kv_len, root, guesses, state):
    """Seconds of one eager step over these inputs, for a tree's buffers (its device drained before and after)."""
    device = kv_len.device

    def step(buffers) -> float:
        _sync(device)
        t0 = time.perf_counter()
        one_step(decoder, cache, buffers, kv_len, root, guesses, state)
        _sync(device)
        return time.perf_counter() - t0

    return step


def _interleaved_points(step, batch: int, k: int, n: int, top_k: int, sizes: Sequence[int], warmups: int,
                        repeats: int, device: torch.device) -> list[LatencyPoint]:
    """Each size's median over ``repeats`` rounds, a round timing every size once, in turn."""
    buffers = {size: tree_set_buffers(synthetic_tree_set(k, top_k, size, n), n, device) for size in sizes}
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(warmups):
        for size in sizes:
            step(buffers[size])
    for _ in range(repeats):
        for size in sizes:
            times[size].append(step(buffers[size]))
    return [LatencyPoint(batch=batch, slots=buffers[size].state_sizes[k].slots, seconds=statistics.median(times[size]),
                         repeats=repeats) for size in sizes]


class FixedStepTimer:
    """Seconds of one device step of ``batch`` full slots at fixed shapes in ``step_mode`` (a call per tree
    set's buffers), its effect on the slots undone after each: every call steps from the same ``prompts``' KV.
    ``slots`` is the SlotBatch the steps run in."""

    def __init__(self, decoder, batch: int, prompts: list[list[int]], root: torch.Tensor, guesses: torch.Tensor,
                 max_slots: int, step_mode: StepMode):
        assert step_mode != "eager", "an eager step is timed by _eager_step_timer"
        self.slots = slots = SlotBatch(decoder, batch, step_mode=step_mode)
        self.batch, self.context = batch, len(prompts[0])
        slots.cache.ensure_capacity(self.context + max_slots)
        prefill_slots(decoder.model, slots.cache, 0, prompts)
        slots.kv_len.fill_(self.context)
        slots.busy_slots.fill_(True)
        slots.root.copy_(root)
        slots.guesses.copy_(guesses)
        slots.state.fill_(decoder.k)
        self.snapshot = slots.slot_snapshot()
        cuda = slots.device.type == "cuda"
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None

    def __call__(self, buffers) -> float:
        slots, events = self.slots, self.events
        view = fixed_view(self.context, buffers.widest.slots, slots.cache.capacity)
        _sync(slots.device)
        t0 = time.perf_counter()
        if events:
            events[0].record()
        slots.trial_step(self.batch, PPDDecoder.plan_for(buffers, None), view)
        if events:
            events[1].record()
        _sync(slots.device)
        elapsed = events[0].elapsed_time(events[1]) / 1e3 if events else time.perf_counter() - t0
        slots.restore_slots(self.snapshot)
        return elapsed
