"""Continuous batching: a fixed set of decode slots, each finished row's slot refilled at the next step.

``SlotBatch`` owns the slots' state, all of it in tensors of a fixed leading size (the slot count) indexed by
slot: the KV cache (decoding/slot_cache.py), each row's KV length, root token, guesses and depth state, and its
sampling parameters and uniform stream. The rows now decoding sit in slots 0..A-1. Each ``step()``:

1. admits waiting rows into the free slots (all of them; or, ``refill="when_empty"``, only once every slot is
   free: static batching, each batch run until its longest row ends), prefilling their prompts but the last
   token into their slots in one forward beside the step;
2. runs one decoding step of the decoder over slots 0..A-1 (one token per row for plain decoding, a
   guess-and-verify tree for PPD and ProPD), which keeps the accepted KV in place;
3. commits each row's tokens (EOS, stop strings and its own ``max_new_tokens`` honoured exactly) and returns
   the rows that finished, moving the last rows into their slots.

Lossless: a row's tokens do not depend on which rows share its steps or on when it joined. Each row attends to
its own columns only, positions are its own, and a sampled row draws its t-th token with the t-th uniform of
its own stream. ``tests/test_continuous.py`` checks rows joining at every step offset against the naive
reference of each row alone.

A decoder plugs in through ``decoding.protocol.Decoder`` (``VanillaDecoder``, ``PPDDecoder``, ``ProPDDecoder``):
a plan per step on the host, the step on the device, and what it learns from the step back on the host. The step
runs through a runner chosen once from the step mode (decoding/runners.py): eager, at fixed shapes, compiled,
captured as CUDA graphs, or checked as a replay would be. The decoders' own ``generate`` is a ``SlotBatch`` with a
slot per prompt.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from decoding.batch import StopCheck, additive_mask, pad_prompts
from decoding.protocol import ActiveView, Decoder, StepPlan, StepReport
from decoding.results import FinishReason, RowResult
from decoding.runners import ADVANCED, StepMode, slot_bucket, step_runner
from decoding.sampling import GREEDY, SamplingParams, uniform_stream
from decoding.slot_cache import CAPACITY_BUCKET, SlotCache, capacity_for, fixed_view, step_view
from decoding.tree import StepSizes, TreeSetBuffers

Refill = Literal["continuous", "when_empty"]


@dataclass
class Request:
    """One row to decode. ``tag`` is the caller's, handed back with the result."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    stop: StopCheck | None = None
    tag: Any = None
    admitted_at: float | None = None  # time.time() when it took a slot
    admission: int | None = None  # its number among the SlotBatch's admissions (increasing; its row id)

    def __post_init__(self) -> None:
        if len(self.prompt) == 0:
            raise ValueError("a prompt is empty: a decoder needs at least one prompt token")
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")


@dataclass
class _Row:
    request: Request
    id: int  # unique for the SlotBatch's life: the decoders' per-row statistics are keyed by it
    kv_len: int  # host copies of the slot's KV length, depth state and guesses (flat [k * top_k])
    state: int = 0
    guesses: list[int] = field(default_factory=list)
    result: RowResult = field(default_factory=RowResult)


@dataclass
class Occupancy:
    """Busy slots per step, over the steps that began with rows waiting for a slot (and over all steps)."""

    slots: int
    steps: int = 0
    busy: int = 0  # sum of busy slots over all steps
    steps_waiting: int = 0
    busy_waiting: int = 0

    @property
    def while_waiting(self) -> float | None:
        """Mean busy slots / slots over the steps while rows waited; None when rows never waited."""
        return self.busy_waiting / (self.steps_waiting * self.slots) if self.steps_waiting else None

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class SlotBatch:
    """``step_mode``: how the device step runs (decoding/runners.py): "eager" (each step sized to its rows),
    "fixed" (eager at fixed shapes), "compile" (torch.compile, one graph per shape), "cuda_graphs" (one captured
    CUDA graph per shape, replayed; at most ``max_shapes`` held) or "checked_replay" (tests: every step of a
    shape is checked to read what its first did, as a replay would). The tokens are the same in every mode.
    ``capacity``: KV columns per slot, allocated once (a worker's memory plan); default: grown as rows need.
    """

    def __init__(self, decoder: Decoder, num_slots: int, refill: Refill = "continuous",
                 eos_token_ids: Sequence[int] | None = None, step_mode: StepMode = "eager",
                 capacity: int | None = None, max_shapes: int = 64):
        assert num_slots >= 1
        self.decoder, self.num_slots, self.refill = decoder, num_slots, refill
        self.step_mode = step_mode
        self.runner = step_runner(step_mode, SlotBatch._device_step, max_shapes=max_shapes)
        if self.runner.fixed_shapes and decoder.varies_shape:
            raise ValueError("early pruning keeps a data-dependent number of slots: its steps run eager, not at "
                             "fixed shapes")
        self.eos = set(int(e) for e in (decoder.eos_token_ids if eos_token_ids is None else eos_token_ids))
        model = decoder.model
        self.device = decoder.device
        # capacity given (a memory plan): the KV and the streams are allocated once, at that many columns per slot
        self.cache = SlotCache.for_model(model, num_slots, capacity or CAPACITY_BUCKET, fixed=capacity is not None)
        S, k, top_k = num_slots, decoder.k, decoder.top_k
        long: dict[str, Any] = dict(dtype=torch.long, device=self.device)
        self.kv_len = torch.zeros(S, **long)  # [S] (0 in a free slot)
        self.busy_slots = torch.zeros(S, dtype=torch.bool, device=self.device)  # [S] slots 0..A-1
        self.root = torch.zeros(S, **long)  # [S] the last emitted token, not yet in the cache
        self.state = torch.zeros(S, **long)  # [S] depth state: how many guesses the row holds
        self.emitted = torch.zeros(S, **long)  # [S] tokens emitted: the sampler's position in the row's stream
        self.guesses = torch.zeros(S, k, top_k, **long)  # [S, k, top_k]
        f64: dict[str, Any] = dict(dtype=torch.float64, device=self.device)
        self.temperature, self.top_p = torch.zeros(S, **f64), torch.ones(S, **f64)  # [S]
        self.top_k = torch.zeros(S, **long)  # [S]
        self.uniforms = torch.zeros(S, capacity or CAPACITY_BUCKET, **f64)  # [S, L]: each sampled row's stream
        self.rows: list[_Row] = []  # slots 0..A-1
        self._admitting: list[_Row] = []  # taking slots A.. (prefill running)
        self.waiting: deque[Request] = deque()
        self.occupancy = Occupancy(num_slots)
        self.admissions = 0  # rows admitted so far: the next row's id
        self.decoder.begin()

    def graph_stats(self) -> dict[str, Any] | None:
        """The step runner's captures (or compiles), their seconds, what it holds and its cap; None when eager."""
        return self.runner.stats()

    # -- the queue ---------------------------------------------------------------------------------------------
    def add(self, requests: Sequence[Request] | Request) -> None:
        self.waiting.extend([requests] if isinstance(requests, Request) else requests)

    @property
    def busy(self) -> int:
        return len(self.rows)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting

    def make_room(self) -> None:
        """Room in the cache for the rows in slots for their longest step under the decoder as it is now (after
        the decoder changed its tree; admission makes room for newcomers)."""
        if self.rows:
            need = max(len(r.request.prompt) + r.request.max_new_tokens for r in self.rows)
            self.cache.ensure_capacity(need + self.decoder.max_step_tokens)

    @torch.inference_mode()
    def allocate(self) -> None:
        """Allocate every layer's KV now (at its capacity) rather than at the first prefill: a one-token prompt is
        run into slot 0, which is free, so the column it writes is scratch. The model's own attention gives the
        keys' and values' shapes, whatever its architecture."""
        assert not self.rows and not self._admitting, "allocate before the first row"
        prefill_slots(self.decoder.model, self.cache, 0, [[0]])

    def view(self) -> ActiveView:
        rows = self.rows
        return ActiveView([r.id for r in rows], [r.result for r in rows], [r.kv_len for r in rows],
                          [r.state for r in rows], [r.guesses for r in rows])

    # -- one step ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, RowResult]]:
        """Admit, decode one step, commit. Returns the rows that finished (a row with max_new_tokens 0
        finishes at admission, without a step)."""
        finished: list[tuple[Request, RowResult]] = []
        waited = bool(self.waiting)
        if self.waiting and (self.refill == "continuous" or not self.rows):
            finished += self._admit()
        A = len(self.rows)
        if A == 0:
            return finished
        occ = self.occupancy
        occ.steps += 1
        occ.busy += A
        if waited:
            occ.steps_waiting += 1
            occ.busy_waiting += A
        before = self.view()
        plan = self.decoder.plan_step(before)
        longest = max(before.kv_lens)
        run, sizes, columns = self.runner.shape(A, plan, longest, self.num_slots, self.cache.capacity)
        assert longest + sizes.slots <= self.cache.capacity, "admission makes room for every row's longest step"
        draw = self.runner.draw(self, [r.request.sampling for r in self.rows])
        packed, late_width = self.runner(self, run, plan.buffers, sizes, columns, draw)
        # The step's one read of the device (it waits for the step to finish); the idle slots' rows come along,
        # since slicing first is one more host op.
        host = packed.tolist()[:A]
        D1 = sizes.depth + 1
        keep = self._commit([h[:D1] for h in host], [h[D1] for h in host])
        for row, h in zip(self.rows, host):
            row.kv_len += h[D1]
            row.state, row.guesses = h[D1 + 1], h[D1 + 2:]
        done = [b for b in range(A) if not keep[b]]
        gone = [self.rows[b].id for b in done]
        finished += [(self.rows[b].request, self.rows[b].result) for b in done]
        self._release(done)
        self.decoder.finish_step(plan, StepReport(before, keep, self.view(), self.guesses, run, sizes, late_width))
        for row_id in gone:
            self.decoder.row_finished(row_id)
        return finished

    def _device_step(self, A: int, buffers, sizes: StepSizes, view: int, draw) -> tuple[torch.Tensor, int | None]:
        """The decoder's step over slots 0..A-1 (those past the busy ones idle along) and the slots'
        bookkeeping, all on the device: KV lengths, sampler positions, roots, depth states and guesses advance
        in place. Returns what the host reads, one row per slot [A, D+1 tokens | count | next state | k * top_k
        next guesses], and the step's ``late_width`` (decoding/protocol.StepOutput). Nothing here reads the
        device from the host: this is the part compiled and captured."""
        kv_len, emitted = self.kv_len[:A], self.emitted[:A]
        out = self.decoder.step(self.cache, buffers, kv_len, self.root[:A], self.guesses[:A], self.state[:A], draw,
                                sizes=sizes, view=view)
        advance = out.counts * self.busy_slots[:A]  # an idle slot stays empty
        kv_len += advance
        emitted += advance  # exact for every row still decoding (EOS and limits end a row)
        self.root[:A] = out.root
        self.state[:A] = out.state
        guesses = self.guesses[:A]
        guesses.copy_(out.guesses)
        packed = torch.cat([out.tokens, out.counts[:, None], out.state[:, None], guesses.flatten(1)], 1)
        return packed, out.late_width

    # -- steps outside the loop: warm-ups and timing ---------------------------------------------------------
    @torch.inference_mode()
    def trial_step(self, A: int, plan: StepPlan, view: int) -> torch.Tensor:
        """One greedy device step over slots 0..A-1 at fixed shapes (the plan's widest sizes, ``view`` attention
        columns) through this batch's runner: the first call of a shape compiles or captures it. It advances the
        slots like a real step: take a ``slot_snapshot`` before and ``restore_slots`` after. Whatever it wrote to
        the KV cache lies past each slot's kv_len once restored: scratch. Returns the packed step output."""
        assert self.runner.fixed_shapes and A <= self.num_slots and view <= self.cache.capacity
        return self.runner(self, A, plan.buffers, plan.widest, view, None)[0]

    @torch.inference_mode()
    def warm_up(self, rows: int | None = None, columns: int = CAPACITY_BUCKET) -> float:
        """Compile or capture the step of a full slot bucket (``rows``: default all slots) with the decoder's
        own tree at its widest, over ``columns`` attention columns (a fixed view: a power of two): the shape
        of a full batch of short rows. Other shapes are compiled or captured at their first use. Returns the
        seconds it took (0 when nothing is compiled or captured)."""
        if self.runner.stats() is None or self.rows or self._admitting:
            return 0.0
        started = time.perf_counter()
        plan = self.decoder.plan_step(None)
        snapshot = self.slot_snapshot()
        self.trial_step(slot_bucket(rows or self.num_slots, self.num_slots), plan,
                        fixed_view(columns, 0, self.cache.capacity))
        self.restore_slots(snapshot)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    @torch.inference_mode()
    def slot_snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the slot tensors a device step advances."""
        return {name: getattr(self, name).clone() for name in ADVANCED}

    @torch.inference_mode()
    def restore_slots(self, snapshot: dict[str, torch.Tensor]) -> None:
        for name, value in snapshot.items():
            getattr(self, name).copy_(value)

    def run(self) -> list[tuple[Request, RowResult]]:
        """Step until every row added has finished; the finished rows in the order they finished."""
        out = []
        while not self.idle:
            out += self.step()
        return out

    def take_in_flight(self) -> list[Request]:
        """After a step failed: the requests in the slots and those being admitted, taken out (every slot is
        free again; the waiting queue is kept)."""
        rows, self.rows, self._admitting = self.rows + self._admitting, [], []
        self.busy_slots.zero_()
        self.kv_len.zero_()
        for row in rows:
            self.decoder.row_finished(row.id)
        return [row.request for row in rows]

    def _commit(self, tokens: list[list[int]], counts: list[int]) -> list[bool]:
        """Append ``tokens[b, :counts[b]]`` to each row, honouring EOS, stop checks and max_new_tokens exactly.
        Returns, per slot, whether the row is still decoding."""
        keep = []
        for row, toks, count in zip(self.rows, tokens, counts):
            res, req = row.result, row.request
            new = toks[: min(count, req.max_new_tokens - len(res.token_ids))]
            for i, t in enumerate(new):
                if t in self.eos:
                    new = new[: i + 1]
                    res.finish_reason = FinishReason.STOP
                    break
            start = len(res.token_ids)
            res.token_ids.extend(new)
            stopped = req.stop(res.token_ids, start) if req.stop is not None and new else None
            if stopped is not None:
                keep_len, res.stop_reason = stopped
                del res.token_ids[keep_len:]
                new = res.token_ids[start:]
                res.finish_reason = FinishReason.STOP
            res.num_steps += 1
            res.accepted_per_step.append(len(new))
            if res.finish_reason is None and len(res.token_ids) >= req.max_new_tokens:
                res.finish_reason = FinishReason.LENGTH
            keep.append(res.finish_reason is None)
        return keep

    # -- slots in and out --------------------------------------------------------------------------------------
    def _admit(self) -> list[tuple[Request, RowResult]]:
        """Move waiting rows into the free slots and prefill them (one forward for all newcomers)."""
        finished: list[tuple[Request, RowResult]] = []
        newcomers: list[_Row] = []
        while self.waiting and len(self.rows) + len(newcomers) < self.num_slots:
            req = self.waiting.popleft()
            row = _Row(req, self.admissions, kv_len=len(req.prompt) - 1)
            req.admission, self.admissions = self.admissions, self.admissions + 1
            if req.max_new_tokens == 0:
                row.result.finish_reason = FinishReason.LENGTH
                finished.append((req, row.result))
                continue
            newcomers.append(row)
        if not newcomers:
            return finished
        self._admitting = newcomers  # in flight from here on (take_in_flight)
        now = time.time()
        for row in newcomers:
            row.request.admitted_at = now
        first, R = len(self.rows), len(newcomers)
        need = max(len(r.request.prompt) + r.request.max_new_tokens for r in self.rows + newcomers)
        self.cache.ensure_capacity(need + self.decoder.max_step_tokens)
        slots = torch.arange(first, first + R, device=self.device)
        self.kv_len[slots] = torch.tensor([r.kv_len for r in newcomers], device=self.device)
        self.busy_slots[slots] = True
        self.root[slots] = torch.tensor([r.request.prompt[-1] for r in newcomers], device=self.device)
        self.state[slots] = 0
        self.emitted[slots] = 0
        self.guesses[slots] = 0
        self._admit_sampling(first, newcomers)
        prompts = [r.request.prompt[:-1] for r in newcomers]
        for start, stop in prefill_chunks([len(p) for p in prompts]):
            prefill_slots(self.decoder.model, self.cache, first + start, prompts[start:stop])
        self.rows += newcomers
        self._admitting = []
        return finished

    def _admit_sampling(self, first: int, newcomers: list[_Row]) -> None:
        # Draws below a row's last allowed token are made and thrown away: k uniforms of lookahead.
        length = max(r.request.max_new_tokens for r in newcomers) + self.decoder.k + 1
        if length > self.uniforms.shape[1]:
            grown = self.uniforms.new_zeros(self.num_slots, capacity_for(length))
            grown[:, : self.uniforms.shape[1]] = self.uniforms
            self.uniforms = grown
        for i, row in enumerate(newcomers):
            p, slot = row.request.sampling, first + i
            self.temperature[slot], self.top_k[slot], self.top_p[slot] = p.temperature, p.top_k, p.top_p
            if not p.greedy:
                self.uniforms[slot] = uniform_stream(p.seed, self.uniforms.shape[1]).to(self.device)

    def _release(self, done: list[int]) -> None:
        """Free the finished rows' slots: the last rows move into them, so slots 0..A'-1 stay the busy ones."""
        if not done:
            return
        gone = set(done)
        survivors = len(self.rows) - len(done)
        holes = [b for b in done if b < survivors]
        movers = [b for b in range(survivors, len(self.rows)) if b not in gone]
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            self.cache.move_slots(src, dst, max(self.rows[b].kv_len for b in movers))
            for t in (self.kv_len, self.root, self.state, self.emitted, self.guesses, self.temperature, self.top_k,
                      self.top_p, self.uniforms):
                t[dst] = t[src]
            for h, m in zip(holes, movers):
                self.rows[h] = self.rows[m]
        del self.rows[survivors:]
        self.busy_slots[survivors:] = False
        self.kv_len[survivors:] = 0


PREFILL_TOKENS = 8192  # padded prompt tokens one prefill forward takes at most (workers/memory.py budgets it)


def prefill_chunks(lengths: Sequence[int], limit: int | None = None) -> list[tuple[int, int]]:
    """Consecutive [start, stop) groups of prompts whose right-padded forward (rows x the longest) stays within
    ``limit`` tokens (default PREFILL_TOKENS); a longer prompt goes alone."""
    limit = PREFILL_TOKENS if limit is None else limit
    chunks, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, length) > limit:
            chunks.append((start, i))
            start, longest = i, 0
        longest = max(longest, length)
    if lengths:
        chunks.append((start, len(lengths)))
    return chunks


@torch.inference_mode()
def prefill_slots(model, cache: SlotCache, first: int, prompts: Sequence[Sequence[int]]) -> None:
    """Run the prompts into slots first.. of ``cache``, from column 0, in one right-padded forward. Rows with the
    same prompt (several completions of one prompt) share one pass of it."""
    distinct: dict[tuple[int, ...], int] = {}
    source = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    device = model.get_input_embeddings().weight.device
    ids, _, attend, positions = pad_prompts([list(p) for p in distinct], device)  # [U, P] ...
    if ids.shape[1] == 0:
        return
    sources = None if len(distinct) == len(prompts) else torch.tensor(source, device=device)
    cache.for_prefill(first, len(prompts), ids.shape[1], sources)
    mask = additive_mask(attend.new_zeros(len(distinct), 0), attend, model.dtype)  # [U, 1, P, P]
    model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)


def generate(decoder: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
             sampling: Sequence[SamplingParams] | None = None,
             stop: Sequence[StopCheck | None] | None = None) -> list[RowResult]:
    """Decode the prompts together, a slot each (static batching), and return their results in input order."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    for name, values in (("max_new_tokens", limits), ("sampling", sampling), ("stop", stop)):
        if values is not None and len(values) != len(prompts):
            raise ValueError(f"{name} has {len(values)} entries for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: a decoder needs at least one prompt token")
    requests = [Request(p, limit, sampling[i] if sampling else GREEDY, stop[i] if stop else None, tag=i)
                for i, (p, limit) in enumerate(zip(prompts, limits))]
    results: list[RowResult | None] = [None] * len(prompts)
    if not prompts:
        return []
    batch = SlotBatch(decoder, len(prompts), refill="when_empty")
    batch.add(requests)
    for req, res in batch.run():
        results[req.tag] = res
    return results  # type: ignore[return-value]


def one_step(decoder: Decoder, cache: SlotCache, buffers: TreeSetBuffers, kv_len: torch.Tensor, root: torch.Tensor,
             guesses: torch.Tensor, state: torch.Tensor, draw=None):
    """One ``decoder.step`` of a tree set's ``buffers`` over slots 0..A-1 outside a SlotBatch (the latency profile,
    tests), sized to the rows: the trees of ``state`` [A], attention over the columns ``kv_len`` [A] needs (both
    read from the device here). Returns the ``StepOutput``."""
    sizes = buffers.sizes(state.tolist())
    view = step_view(int(kv_len.max()), sizes.slots, cache.capacity)
    return decoder.step(cache, buffers, kv_len, root, guesses, state, draw, sizes=sizes, view=view)
