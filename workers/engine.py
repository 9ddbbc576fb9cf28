"""Row -> result logic for the batch job, free of Ray (and of pyarrow) so it can be tested alone.

A `DecodeEngine` owns one loaded model, one decoder and its `batch_size` decode slots (decoding/slots.py).
`add_shard(rows)` validates and encodes each row, resolves its sampling parameters (workers/sampling.py) and
queues the valid rows' completions; `step()` advances every busy slot by one decoding step, refilling a
finished row's slot at once (continuous batching) or once all are free (static). A shard is done when all its
completions are: one `RowOutput` per completion (n per row, in input order, then sample_index). A bad row never
fails the others: it comes back as one output with `error` set. `run_rows(rows)` does both for one shard.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import torch

from decoding import PPDDecoder, PromptTokens, SamplingParams, VanillaDecoder
from decoding.online_stats import LatencyModel
from decoding.propd import ProPDDecoder
from decoding.pruning import PruneHead
from decoding.results import RowResult
from decoding.slots import Request, SlotBatch
from decoding.tree import TreeSet, tree_set_buffers
from profiling.device import identify
from profiling.latency import DEFAULT_SLOTS
from trees.builder import estimate, tree_family, tree_set_slots
from trees.paths import fixed_size_tree_set
from workers.adaptation import GATE_TREE_NODES, AdaptOutcome, adapt_prompt_tokens
from workers.artifacts import (
    artifact_hash,
    find_shipped_artifact,
    load_prompt_tokens,
    prompt_tokens_from_files,
    reference_acceptance_table,
)
from workers.compile_choice import (
    CompileChoice,
    choose_compile,
    estimate_compile,
    record_compile,
    record_key,
    record_step_rate,
)
from workers.configs import AdaptationConfig, DecodingConfig, ModelConfig
from workers.cpu_linear import linear_kind, linear_rows_below
from workers.memory import PPD_STEP_ROOM, MemoryPlan, ModelShape, device_memory, job_capacity, plan_memory
from workers.models import LoadedModel, encode_row, load_model, resolve_cache_dir
from workers.numerics import DecisionBoard, numeric_path
from workers.planning import DecodingPlan, best_tree_set, plan_decoding
from workers.profiles import load_or_measure_profile
from workers.prune_heads import find_shipped_prune_head, load_prune_head
from workers.records import ErrorCode, RowError, RowOutput, row_error
from workers.sampling import StopStrings, resolve_sampling, text_before_stop

log = logging.getLogger(__name__)

# Steps a worker decodes before it records its step rate (compile=auto's speed-up): fewer say little.
RATE_MIN_STEPS = 50


def compile_record_key(lm: LoadedModel, numerics: str, method: str, batch_size: int, step_tokens: int) -> str:
    """The record of compile times (workers/compile_choice.py) this worker's compiled step reads and writes."""
    return record_key(identify(lm.device, lm.dtype).key(), lm.content_hash, numerics, method, batch_size,
                      step_tokens)

class DecodeEngine:
    """A loaded model plus a decoder; turns rows into `RowOutput`s."""

    def __init__(self, loaded: LoadedModel, decoding: DecodingConfig | None = None, *,
                 batch_size: int | Literal["auto"] = 1, max_batch_size: int = 64, cache_dir: str | None = None,
                 latency_profile: str | None = None, adaptable: bool = False,
                 prompt_files: tuple[str, dict[str, bytes]] | None = None, expected_rows: int | None = None):
        self.loaded = loaded
        self.expected_rows = expected_rows  # this worker's share of the job, for compile=auto (None: unknown)
        # Prompt tokens may be replaced mid-job (adopt_prompt_tokens): untrained ones then start from an empty
        # acceptance table, which plans plain decoding until adapted tokens bring a real one.
        self.adaptable = adaptable
        self.prompt_files = prompt_files  # (where from, the artifact's files): instead of decoding.prompts
        self.config = decoding or DecodingConfig()
        self.requested_batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.latency_profile = latency_profile
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.device_name = identify(loaded.device, loaded.dtype).readable
        self.numeric_path = numeric_path(loaded.model)
        self.batch_fallbacks = 0  # batches that failed and were decoded row by row (see _generate)
        self.adoptions = 0  # prompt tokens adopted mid-job
        # (first admission number, prompts_hash, tree_hash) of every set of prompt tokens, in adoption order: a row
        # names the one in force when it was admitted (set once the decoder is built)
        self.provenance: list[tuple[int, str | None, str | None]] = []
        self.adapt_progress: str | None = None  # what an adaptation running on this worker is at
        self.tree_info: dict[str, Any] = {}
        started = time.perf_counter()
        # The memory plan first bounds the batch sizes `auto` may choose, then settles the slots and the capacity
        # for the decoder built (its widest step), before any KV is allocated (workers/memory.py).
        self.model_shape = ModelShape.of(loaded.model)
        self.device_memory = device_memory(loaded.device)
        self.step_room = PPD_STEP_ROOM if self.config.method == "ppd" else 1
        self.max_batch_size = self._plan_memory(1, max_batch_size).max_slots
        self.decoder = self._build_decoder()  # also settles self.batch_size and self.step_mode
        self.step_room = max(self.step_room, self.decoder.max_step_tokens)
        self.memory = self._plan_memory(self.decoder.max_step_tokens, self.batch_size)
        if self.requested_batch_size == "auto" and self.memory.slots < self.batch_size:
            log.info("memory: batch size %d lowered to the %d slots that fit", self.batch_size, self.memory.slots)
            self.batch_size = self.memory.slots
            self.tree_info = {**self.tree_info, "batch_size": self.batch_size}
        plan_s = time.perf_counter() - started
        if self.step_mode != "eager":
            self.numeric_path += f" step={self.step_mode}"
        if self.step_mode == "compile":
            # inductor's on-disk caches beside the model's, so a restarted or second worker on the machine
            # reuses the compiled kernels (a first compile of the default model's step took ~2 minutes on the
            # 2-core CPU, a cached one ~30 s); torch reads the variable at its first compile
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.cache_dir / "inductor"))
        # batch_size decode slots; static batching refills them only once all are free
        self.batch = SlotBatch(self.decoder, self.batch_size,
                               refill="continuous" if self.config.batching == "continuous" else "when_empty",
                               step_mode=self.step_mode, capacity=self.memory.capacity,
                               max_shapes=self.memory.max_graphs)
        self.batch.allocate()  # the KV, once, at its planned size
        # The full batch's step is compiled or captured now, at start-up; other shapes at their first use.
        cuda = loaded.device.type == "cuda"
        if cuda:  # the warm-up's peak beside the plan's activation estimate
            torch.cuda.synchronize(loaded.device)
            held = torch.cuda.memory_allocated(loaded.device)
            torch.cuda.reset_peak_memory_stats(loaded.device)
        warmup_s = self.batch.warm_up()
        self.startup = {"plan_s": round(plan_s, 2), "warmup_s": round(warmup_s, 2)}
        self._record_compile_time()
        self._warmup_compile_s = self._compile_seconds()
        if cuda:
            self.startup["warmup_peak_bytes"] = torch.cuda.max_memory_allocated(loaded.device) - held
        self.provenance.append((0, self.prompts_hash, self.tree_hash))
        self._lock = threading.Lock()
        self._pending_prompts: list[PendingPrompts] = []  # adopted between steps, by the decode loop
        self._open: list[ShardJob] = []  # shards added and not yet done
        self._occupancy_reported: dict[str, int] = {}
        # The decode loop's time inside steps: wall seconds, and the CPU seconds of the thread that steps (on a
        # CPU, its OpenMP team's master). Against the job's decode time, the first says how much of it the loop
        # spent stepping; against each other, the second says how much of a step the thread ran rather than
        # waited (on its team, a preempted core, or the device).
        self.clock = StepClock()
        self.tokens_decoded = 0  # of every completion finished (the rate the compile record keeps)
        self._clock_reported = StepClock()

    @classmethod
    def from_config(cls, model: ModelConfig, decoding: DecodingConfig, batch_size: int | Literal["auto"] = 1,
                    board: DecisionBoard | None = None, **kwargs: Any) -> DecodeEngine:
        """Load the model (its numeric decisions from ``board``, the job's, when given) and build the engine."""
        return cls(load_model(model, board), decoding, batch_size=batch_size, cache_dir=model.cache_dir, **kwargs)

    @property
    def row_tokens(self) -> int:
        """A row's prompt and new tokens together fit this many KV columns (the capacity less one step's room)."""
        return min(self.loaded.max_context, self.memory.capacity - self.step_room)

    def _plan_memory(self, step_tokens: int, max_slots: int) -> MemoryPlan:
        """The memory plan for this worker's configuration: a fixed batch size's slots, or (``auto``) the most that
        fit, up to ``max_slots``; raises DoesNotFit with the numbers."""
        memory, lm = self.config.memory, self.loaded
        total, free = self.device_memory
        prompt_budget = min(memory.max_prompt_tokens, lm.max_context)
        fixed = None if self.requested_batch_size == "auto" else self.requested_batch_size
        return plan_memory(
            self.model_shape, device=str(lm.device), total=total, free=free,
            capacity=job_capacity(prompt_budget, self.config.max_new_tokens, lm.max_context, self.step_room),
            step_tokens=step_tokens, prefill_columns=prompt_budget,
            graphs=lm.device.type == "cuda" and self.config.cuda_graphs,
            batch_size=fixed, max_batch_size=max_slots,
            gpu_memory_utilization=memory.gpu_memory_utilization, cpu_memory_share=memory.cpu_memory_share)

    def _build_decoder(self):
        lm = self.loaded
        self.prompts_source = None
        self.prompts_hash = None
        prompt_tokens = None
        if self.config.method == "ppd" and self.prompt_files is not None:
            self.prompts_source, files = self.prompt_files
            prompt_tokens, self.prompts_hash = prompt_tokens_from_files(
                files, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype)
        elif self.config.method == "ppd":
            artifact = self.config.prompts
            if artifact == "auto":
                shipped = find_shipped_artifact(lm.content_hash)
                artifact = str(shipped) if shipped else "untrained"
                log.info("prompt tokens: %s", artifact)
            self.prompts_source = artifact
            if artifact != "untrained":
                prompt_tokens = load_prompt_tokens(
                    artifact, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype
                )
                self.prompts_hash = artifact_hash(artifact)
            else:
                prompt_tokens = PromptTokens.from_token_embeddings(
                    lm.model,
                    k=self.config.num_prompt_tokens,
                    n=1,
                    base_model_id=lm.model_id,
                    base_model_hash=lm.content_hash,
                )
                if self.adaptable and not self.config.tree_nodes:
                    prompt_tokens.meta.extra["acceptance"] = empty_acceptance_table(prompt_tokens.k)
        if prompt_tokens is None and self.config.prune_head not in ("none", "auto"):
            raise ValueError("prune_head prunes PPD's tree: it needs decoding method 'ppd'")
        prune_head = self._load_prune_head() if prompt_tokens is not None else None
        captured = (prune_head is None and self.loaded.device.type == "cuda" and self.config.cuda_graphs)
        # Profiles time the step the worker runs; a compiled step's profile is the eager one: compiling each
        # of a profile's ~30 shapes would take most of an hour on a CPU (ProPD re-prices from the steps it runs).
        plan = plan_decoding(
            lm.model, prompt_tokens, tree_nodes=self.config.tree_nodes,
            batch_size=None if self.requested_batch_size == "auto" else self.requested_batch_size,
            max_batch_size=self.max_batch_size, model_hash=lm.content_hash, cache_dir=self.cache_dir,
            profile_budget_s=self.config.profile_budget_s, latency_profile=self.latency_profile,
            step_mode="cuda_graphs" if captured else "eager")
        self.batch_size = plan.batch_size
        self.compile_key = compile_record_key(lm, self.numeric_path, self.config.method, plan.batch_size,
                                              PPD_STEP_ROOM if prompt_tokens is not None else 1)
        self._compile_recorded_s = 0.0  # the compile seconds last written to the record
        self._rate_recorded_steps = 0  # the decode loop's steps when its rate was last written to the record
        sizes_every_step = prompt_tokens is not None and self._sizes_every_step(prompt_tokens)
        # ProPD may step with a tree set per budget of its family (at most one per DEFAULT_SLOTS entry)
        self.compile_choice = self._choose_compile(plan, prompt_tokens, pruning=prune_head is not None,
                                                   captured=captured,
                                                   tree_sets=len(DEFAULT_SLOTS) if sizes_every_step else 1)
        self.step_mode = ("cuda_graphs" if captured else "compile" if self.compile_choice.compile else "eager")
        self.profile = plan.profile
        self.tree_info = {**plan.info, **self.tree_info}  # the prune head's entries, when one was loaded
        if prompt_tokens is None:
            return VanillaDecoder(lm.model, eos_token_ids=lm.eos_token_ids)
        if sizes_every_step:
            profile = plan.profile
            prior = [(p.batch, p.slots, float(profile.context_len), p.seconds) for p in profile.points]
            self.tree_info = {**self.tree_info, "tree": "propd (sized every step; starts from the planned tree)"}
            family = tree_family(prompt_tokens.k, DEFAULT_SLOTS, n=prompt_tokens.n)
            return ProPDDecoder(lm.model, prompt_tokens, family, prompt_tokens.meta.extra["acceptance"],
                                LatencyModel(prior), eos_token_ids=lm.eos_token_ids, prune_head=prune_head,
                                start=plan.tree_set)
        return PPDDecoder(lm.model, prompt_tokens, tree_set=plan.tree_set, eos_token_ids=lm.eos_token_ids,
                          prune_head=prune_head)

    def _choose_compile(self, plan: DecodingPlan, prompt_tokens: PromptTokens | None, *, pruning: bool,
                        captured: bool, tree_sets: int) -> CompileChoice:
        """torch.compile or not (workers/compile_choice.py): ``auto`` weighs this worker's share of the job,
        decoded at the eager speed its latency profile predicts, against the compile time."""
        choice = choose_compile(
            self.config.compile, device_type=self.loaded.device.type, captured=captured, pruning=pruning,
            expected_tokens=(self.expected_rows or 0) * self.config.max_new_tokens,
            eager_tokens_per_s=lambda: self._eager_tokens_per_s(plan, prompt_tokens),
            estimate=estimate_compile(self.cache_dir, self.compile_key, tree_sets))
        log.info("step: %s", choice.reason)
        return choice

    def _record_compile_time(self) -> None:
        """The seconds compiling took so far (the warm-up, and shapes compiled at their first use), for the next
        worker's compile=auto; written when they grew."""
        compile_s = self._compile_seconds()
        if compile_s > self._compile_recorded_s + 0.5:
            self._compile_recorded_s = compile_s
            try:
                record_compile(self.cache_dir, self.compile_key, self._compile_recorded_s)
            except OSError as exc:  # a read-only cache: the next estimate is a guess again
                log.warning("could not record the compile time: %s", exc)

    def _compile_seconds(self) -> float:
        """Seconds compiling took so far: the first calls of each shape (0 for a step that is not compiled)."""
        stats = self.batch.graph_stats() if self.step_mode == "compile" else None
        return float(stats.get("capture_seconds", 0.0)) if stats else 0.0

    def _record_step_rate(self) -> None:
        """The tokens per second decoded inside this worker's steps, compiled or eager (the steps that compiled a
        shape left out), for the next worker's compile=auto on this machine: written once RATE_MIN_STEPS steps
        are in, then each time the steps have doubled."""
        if self.loaded.device.type != "cpu" or self.step_mode not in ("compile", "eager"):
            return
        steps = self.clock.steps
        if steps < max(RATE_MIN_STEPS, 2 * self._rate_recorded_steps):
            return
        seconds = self.clock.wall_s - (self._compile_seconds() - self._warmup_compile_s)
        if seconds <= 0 or not self.tokens_decoded:
            return
        self._rate_recorded_steps = steps
        try:
            record_step_rate(self.cache_dir, self.compile_key, self.step_mode,  # type: ignore[arg-type]
                             self.tokens_decoded / seconds)
        except OSError as exc:
            log.warning("could not record the step rate: %s", exc)

    def _eager_tokens_per_s(self, plan: DecodingPlan, prompt_tokens: PromptTokens | None) -> float:
        """Tokens per second an eager step of the plan decodes: the plan's prediction, or (a plan that needed no
        profile) the plain or fixed-tree step timed by a latency profile at the plan's batch size (cached)."""
        if plan.info.get("predicted_tokens_per_s"):
            return float(plan.info["predicted_tokens_per_s"])
        lm = self.loaded
        profiled = prompt_tokens or PromptTokens.from_token_embeddings(lm.model, k=1, base_model_id="",
                                                                         base_model_hash=lm.content_hash)
        slots = tree_set_slots(plan.tree_set, profiled.n) if plan.tree_set is not None else 1
        profile, _ = load_or_measure_profile(
            lm.model, profiled, model_hash=lm.content_hash, cache_dir=self.cache_dir, batch_sizes=[plan.batch_size],
            slots=sorted({1, slots}), budget_s=self.config.profile_budget_s)
        return plan.batch_size * plan.info.get("predicted_tau", 1.0) / profile.step_seconds(plan.batch_size, slots)

    def _sizes_every_step(self, prompt_tokens: PromptTokens) -> bool:
        """Whether the decoder is ProPD's: 'auto' takes it wherever it can run. ProPD plans from an acceptance
        table, which untrained prompt tokens lack (they keep the built-in tree), and a fixed tree_nodes asks
        for one tree."""
        sizing, has_table = self.config.tree_sizing, bool(prompt_tokens.meta.extra.get("acceptance"))
        if sizing == "propd" and self.config.tree_nodes:
            raise ValueError("tree_nodes fixes the tree; tree_sizing 'propd' sizes it every step: pick one")
        if sizing == "auto":
            return has_table and not self.config.tree_nodes
        return sizing == "propd" and has_table

    def _load_prune_head(self) -> PruneHead | None:
        """The early-pruning head the config asks for (recorded in tree_info), or None."""
        lm, source = self.loaded, self.config.prune_head
        if source == "auto":
            shipped = find_shipped_prune_head(lm.content_hash)
            source = str(shipped) if shipped else "none"
            log.info("prune head: %s", source)
        if source == "none":
            return None
        head, _ = load_prune_head(source, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype,
                                  keep_top_k=self.config.keep_top_k)
        self.tree_info = {**self.tree_info, "prune_head": source, "prune_layer": head.layer,
                          "keep_top_k": head.keep_top_k}
        return head

    # -- prompt tokens replaced mid-job ------------------------------------------------------------------------
    def request_prompt_tokens(self, prompt_tokens: PromptTokens, prompts_hash: str, source: str) -> PendingPrompts:
        """Queue new prompt tokens for the decode loop to adopt at its next step boundary (any thread); the
        returned handle's ``done`` is set once adopted, with ``error`` set if they could not be."""
        pending = PendingPrompts(prompt_tokens, prompts_hash, source)
        with self._lock:
            self._pending_prompts.append(pending)
        return pending

    @property
    def has_pending_prompts(self) -> bool:
        return bool(self._pending_prompts)

    def adopt_pending_prompts(self) -> None:
        """Adopt the queued prompt tokens (the decode loop's thread, between steps); a failure leaves the old ones."""
        with self._lock:
            queued, self._pending_prompts = self._pending_prompts, []
        for pending in queued:
            try:
                self.adopt_prompt_tokens(pending.prompt_tokens, pending.prompts_hash, pending.source)
            except Exception as exc:  # noqa: BLE001 - reported to the caller; the worker keeps its old tokens
                log.warning("could not adopt prompt tokens %s: %r", pending.prompts_hash[:12], exc)
                pending.error = exc
            pending.done.set()

    def adopt_prompt_tokens(self, prompt_tokens: PromptTokens, prompts_hash: str, source: str) -> None:
        """Decode with ``prompt_tokens`` from the next step on, between steps, without draining the slots: the
        prompt-token table is overwritten in place, the tree (or ProPD's family and statistics) is rebuilt from
        their acceptance table, and rows admitted from the next step on name them in ``prompts_hash``; rows in
        flight name the tokens they were admitted with. Outputs are unchanged: only the steps they take change. Every
        check comes first: a refusal leaves the worker as it was."""
        lm = self.loaded
        decoder = self.decoder
        if not isinstance(decoder, PPDDecoder):
            raise ValueError("plain decoding has no prompt tokens to replace")
        if prompt_tokens.meta.base_model_hash != lm.content_hash:
            raise ValueError(f"the prompt tokens were made for model {prompt_tokens.meta.base_model_hash[:12]}…, "
                             f"not the loaded {lm.content_hash[:12]}…")
        decoder.check_adoptable(prompt_tokens)
        table = prompt_tokens.meta.extra.get("acceptance")
        tree_set = None
        if not isinstance(decoder, ProPDDecoder) and table:
            tree_set = self.tree_for(table, prompt_tokens)
            if (tree_set.k, tree_set.top_k) != (decoder.tree_set.k, decoder.tree_set.top_k):
                raise ValueError("the new prompt tokens' tree has another k or top_k than the slots' guesses")
            widest = tree_set_buffers(tree_set, prompt_tokens.n).widest.slots
            if widest > self.step_room:  # the KV capacity was planned with room for this many
                raise ValueError(f"the new prompt tokens' tree steps {widest} slots a row; the memory plan left "
                                 f"room for {self.step_room}")
        # Checked: from here on nothing is expected to fail.
        prompt_tokens = PromptTokens(prompt_tokens.embeddings.detach().to(device=lm.device, dtype=lm.dtype),
                                     prompt_tokens.meta)
        decoder.adopt_prompt_tokens(prompt_tokens)
        if tree_set is not None:
            decoder.use_tree_set(tree_set)
        self.batch.make_room()
        self.prompts_hash, self.prompts_source = prompts_hash, source
        # Rows admitted from here on were decoded with these tokens (the decode loop's thread admits rows).
        self.provenance.append((self.batch.admissions, prompts_hash, self.tree_hash))
        self.adoptions += 1

    def tree_for(self, table: list[list[float]], prompt_tokens: PromptTokens | None = None) -> TreeSet:
        """The tree set this worker would decode with at its batch size, were ``table`` its prompt tokens'
        acceptance table: the fixed-size tree with ``tree_nodes``, else the profile's hardware-aware choice
        (ProPD's choice at a full batch), else the tree it has."""
        pt = prompt_tokens or self.decoder.prompt_tokens
        if self.config.tree_nodes:
            return fixed_size_tree_set(table, self.config.tree_nodes, pt.k)
        if self.profile is not None:
            return best_tree_set(self.profile, table, pt.k, pt.n, self.batch_size).chosen.tree_set
        return self.decoder.tree_set

    def adaptation_outlook(self, settings: AdaptationConfig | None = None) -> dict[str, Any]:
        """What this worker's latency profile predicts at its batch size: the best tree's speed-up over plain
        decoding, tau and tokens/s with its prompt tokens as they are ("now") and as adaptation is expected to
        leave them ("expected": their own table when they were trained, else the acceptance of the shipped
        artifact, which training on a job's own rows came within 5% of), with the tau a 63-node tree would have
        ("tau_63"), and a rough estimate of adaptation's seconds here: a training row costs about one step of
        256 slots, a held-back row about one and a half per 64 replayed tokens (measured on the 2-core CPU with the
        default model)."""
        if self.profile is None or not isinstance(self.decoder, PPDDecoder):
            return {"profiled": False}
        settings = settings or AdaptationConfig()
        pt = self.decoder.prompt_tokens
        now = pt.meta.extra.get("acceptance")
        trained = now and any(any(row) for row in now)
        expected = now if trained else reference_acceptance_table(pt.k)
        widest = max(self.profile.measured_slots(1) or [1])
        row_seconds = self.profile.step_seconds(1, widest) * 256 / widest
        rows = (settings.steps_for(settings.train_rows) * settings.samples_per_step
                + 1.5 * settings.held_out_rows * settings.gate_tokens / 64)
        outlook: dict[str, Any] = {"profiled": True, "batch_size": self.batch_size,
                                   "train_seconds_estimate": round(rows * row_seconds, 1)}
        for name, table in (("now", now), ("expected", expected)):
            if table:
                choice = best_tree_set(self.profile, table, pt.k, pt.n, self.batch_size)
                tau_63 = estimate(table, fixed_size_tree_set(table, GATE_TREE_NODES, pt.k)).expected_tokens
                outlook[name] = {"speedup": round(choice.speedup, 3),
                                 "tau": round(choice.chosen.estimate.expected_tokens, 3), "tau_63": round(tau_63, 3),
                                 "tokens_per_s": round(self.batch_size * choice.chosen.estimate.expected_tokens
                                                       / choice.step_seconds, 2)}
        return outlook

    def adapt(self, rows: list[dict], outputs: list[list[int]], held_out: list[bool],
              settings: AdaptationConfig) -> AdaptOutcome:
        """Learn prompt tokens from completed rows (input rows and their output ids; ``held_out`` marks the
        gate's rows) in the caller's thread, beside decoding (workers/adaptation.py)."""
        if not isinstance(self.decoder, PPDDecoder):
            raise ValueError("plain decoding has no prompt tokens to adapt")
        sequences = [(self._encode(row), list(out)) for row, out in zip(rows, outputs)]
        train = [seq for seq, held in zip(sequences, held_out) if not held]
        held = [seq for seq, held in zip(sequences, held_out) if held]
        self.adapt_progress = "training"

        steps = settings.steps_for(len(train))

        def on_step(step: int, loss: float) -> None:
            self.adapt_progress = f"step {step}/{steps}, loss {loss:.3f}" if step < steps else "the gate's replay"

        return adapt_prompt_tokens(self.loaded.model, self.decoder.prompt_tokens, train, held, settings,
                                   self.tree_for, on_step=on_step)

    def describe(self) -> dict[str, Any]:
        lm = self.loaded
        decision = lm.rows_below_decision
        return {
            "model_id": lm.model_id,
            "model_hash": lm.content_hash,
            "device": self.device_name,
            "torch_device": str(lm.device),
            "dtype": self.dtype_name,
            "linear": linear_kind(lm.model),  # weight_stationary: workers/cpu_linear.py
            "linear_rows_below": linear_rows_below(lm.model),  # where W @ x.T runs (decided with cpu_linear=auto)
            "numeric_path": self.numeric_path,  # each output row's too (workers/numerics.py)
            # cpu_linear=auto: the linear kernel decided for this kind of machine ({key, rows_below, source})
            "linear_decision": asdict(decision) if decision else None,
            "max_context": lm.max_context,
            "decoding": self.config.method,
            "prompts": self.prompts_source,
            "prompts_hash": self.prompts_hash,
            "tree_hash": self.tree_hash,
            **self.tree_info,
            "batch_size": self.batch_size,
            "memory": self.memory.as_dict(),  # bytes: budget, weights, KV, slots x capacity, free (workers/memory.py)
            "step_mode": self.step_mode,  # eager, compile or cuda_graphs (decoding/runners.py)
            "compile": self.compile_choice.reason,  # why compiled or not (workers/compile_choice.py)
            # seconds spent at start-up planning (latency profile, tree choice) and compiling or capturing
            "startup": self.startup,
        }

    @property
    def dtype_name(self) -> str:
        return str(self.loaded.dtype).removeprefix("torch.")

    @property
    def tree_hash(self) -> str | None:
        """The static tree set's hash; with ProPD, "propd-" and a hash of the family and the tree it started
        from (workers on different devices plan different starting trees)."""
        if isinstance(self.decoder, ProPDDecoder):
            joined = ",".join([option.tree_set.tree_hash for option in self.decoder.initial_family]
                              + [self.decoder.start or ""])
            return "propd-" + hashlib.sha256(joined.encode()).hexdigest()[:12]
        tree_set = getattr(self.decoder, "tree_set", None)
        return tree_set.tree_hash if tree_set is not None else None

    def _encode(self, row: dict) -> list[int]:
        prompt = row.get("prompt")
        if isinstance(prompt, list):  # token ids (an OpenAI completions request's)
            vocab = self.loaded.model.get_input_embeddings().weight.shape[0]
            if any(not 0 <= t < vocab for t in prompt):
                raise ValueError(f"a prompt token id is outside the model's vocabulary of {vocab}")
            return list(prompt)
        return encode_row(self.loaded.tokenizer, messages=row.get("messages"), prompt=prompt)

    def _check_and_encode(self, row: Any, out: RowOutput) -> list[int] | None:
        """The row's prompt ids, or None with `out.error` set."""
        lm = self.loaded
        out.error = row_error(row)
        if out.error is not None:
            return None
        try:
            ids = self._encode(row)
        except Exception as exc:  # noqa: BLE001 - any encoding failure is this row's error
            out.error = RowError(ErrorCode.ENCODE_FAILED, f"could not encode the row: {exc}")
            return None
        out.prompt_tokens = len(ids)
        if not ids:
            out.error = RowError(ErrorCode.EMPTY_PROMPT, "prompt is empty after encoding")
        elif len(ids) >= lm.max_context:
            out.error = RowError(ErrorCode.PROMPT_TOO_LONG, f"prompt has {len(ids)} tokens, which leaves no room "
                                 f"in the model's max context of {lm.max_context}")
        elif len(ids) > self.config.memory.max_prompt_tokens:
            out.error = RowError(ErrorCode.PROMPT_TOO_LONG, f"prompt has {len(ids)} tokens, more than the job's "
                                 f"prompt budget of {self.config.memory.max_prompt_tokens} (--max-prompt-tokens)")
        return None if out.error else ids

    def _prepare(self, rows: list[dict]) -> tuple[list[RowOutput], list[Completion]]:
        """Every row's outputs (one per completion; one with `error` set for a row that cannot be decoded),
        and the completions to decode, in the same order."""
        lm = self.loaded
        outputs: list[RowOutput] = []
        pending: list[Completion] = []
        for row in rows:
            row_id = row.get("id") if isinstance(row, dict) else None
            out = RowOutput(id=str(row_id), decoding=self.config.method, model_id=lm.model_id,
                            model_hash=lm.content_hash, prompts_hash=self.prompts_hash, device=self.device_name,
                            dtype=self.dtype_name, numeric_path=self.numeric_path, tree_hash=self.tree_hash)
            if isinstance(row, dict):
                out.request = row.get("request") or {"endpoint": "chat" if row.get("messages") is not None
                                                     else "completions", "model": None, "n": 1}
            ids = self._check_and_encode(row, out)
            sampling = None
            if ids is not None:
                try:
                    sampling = resolve_sampling(self.config.sampling, self.config.max_new_tokens, out.id,
                                                row.get("sampling_params"))
                except ValueError as exc:
                    out.error = RowError(ErrorCode.INVALID_SAMPLING, str(exc))
            if sampling is None:
                outputs.append(out)
                continue
            out.sampling_params = sampling.to_record()
            budget = min(sampling.max_new_tokens, self.row_tokens - len(ids))
            stop = StopStrings(lm.tokenizer, sampling.stop) if sampling.stop else None
            for index in range(sampling.n):
                completion = replace(out, sample_index=index) if index else out
                outputs.append(completion)
                pending.append(Completion(completion, ids, budget, sampling.params(index), stop))
        return outputs, pending

    # -- decoding shards ----------------------------------------------------------------------------------------
    def add_shard(self, rows: list[dict]) -> ShardJob:
        """Queue a shard's completions behind those already waiting; returns the shard's handle, done once every
        completion is. Thread-safe against ``step`` (the actor adds shards while its loop steps)."""
        outputs, pending = self._prepare(rows)
        job = ShardJob(outputs, remaining=len(pending))
        with self._lock:
            self._open.append(job)
        self.batch.add([Request(c.prompt, c.budget, c.params, c.stop, tag=(job, c)) for c in pending])
        if not pending:
            self._close(job)
        return job

    @property
    def idle(self) -> bool:
        """No row is decoding or waiting."""
        return self.batch.idle

    def step(self) -> None:
        """One step of the slot batch: waiting rows fill the free slots, every busy slot advances, finished rows
        fill their outputs, finished shards are closed."""
        if self._pending_prompts:
            self.adopt_pending_prompts()
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            finished = self.batch.step()
        except Exception as exc:  # noqa: BLE001 - the rows in flight are decoded alone below
            finished = self._fall_back(exc)
        self.clock.add(time.perf_counter() - started, time.thread_time() - cpu_started)
        for request, result in finished:
            self._complete(request, result)

    def run_rows(self, rows: list[dict]) -> list[RowOutput]:
        """Decode one shard here and now (the caller's thread): one output per completion (n per row; one for a
        row that fails before decoding), in input order, then sample_index."""
        job = self.add_shard(rows)
        while not job.done.is_set():
            self.step()
        return job.outputs

    def _fall_back(self, exc: Exception) -> list[tuple[Request, RowResult | Exception]]:
        """A step failed: decode each row that was in flight alone, so one bad row does not take its neighbours
        down. Such a fallback is a bug in the batched path, never an expected slowdown: each is logged (the
        first with its traceback), counted in ``batch_fallbacks`` and marked on its rows (``batch_fallback``),
        which the job counts in summary.json and the per-device table."""
        requests = self.batch.take_in_flight()
        if len(requests) <= 1:
            return [(r, exc) for r in requests]
        self.batch_fallbacks += 1
        log.warning("a step over %d rows failed; they are decoded one by one (%d such steps on this worker): %r",
                    len(requests), self.batch_fallbacks, exc, exc_info=exc if self.batch_fallbacks == 1 else None)
        results: list[tuple[Request, RowResult | Exception]] = []
        for r in requests:
            r.tag[1].output.batch_fallback = True
            try:
                results.append((r, self.decoder.generate([r.prompt], [r.max_new_tokens], sampling=[r.sampling],
                                                         stop=[r.stop])[0]))
            except Exception as row_exc:  # noqa: BLE001 - this row's own failure
                results.append((r, row_exc))
        return results

    def _complete(self, request: Request, result: RowResult | Exception) -> None:
        job, completion = request.tag
        out = completion.output
        now = time.time()
        admitted = request.admitted_at or now
        out.latency_s = now - admitted
        out.started_at = datetime.fromtimestamp(admitted, UTC)
        out.finished_at = datetime.fromtimestamp(now, UTC)
        if request.admission is not None:  # the prompt tokens and tree in force when the row took its slot
            _, out.prompts_hash, out.tree_hash = next(
                version for version in reversed(self.provenance) if version[0] <= request.admission)
        if isinstance(result, Exception):
            out.error = RowError(ErrorCode.DECODE_FAILED, f"decoding failed: {type(result).__name__}: {result}")
        else:
            out.output_token_ids = [int(t) for t in result.token_ids]
            out.num_output_tokens = result.num_tokens
            out.num_steps = result.num_steps
            out.tau = result.tau
            out.finish_reason = getattr(result.finish_reason, "value", result.finish_reason)
            out.stop_reason = result.stop_reason
            text = self.loaded.tokenizer.decode(out.output_token_ids, skip_special_tokens=True)
            out.output_text = text_before_stop(text, result.stop_reason)
        job.tokens += out.num_output_tokens
        self.tokens_decoded += out.num_output_tokens
        job.remaining -= 1
        if job.remaining == 0:
            self._close(job)

    def _close(self, job: ShardJob) -> None:
        """The shard is done: it takes the slot counters gathered since the last shard closed (their sum over a
        worker's shards is the worker's)."""
        with self._lock:  # the actor's process() closes an empty shard from its own thread
            now = self.batch.occupancy.as_dict()
            job.occupancy = {key: now[key] - self._occupancy_reported.get(key, 0) if key != "slots" else now[key]
                             for key in now}
            self._occupancy_reported = now
            job.clock, self._clock_reported = self.clock.since(self._clock_reported), self.clock.copy()
            self._open.remove(job)
        self._record_compile_time()
        self._record_step_rate()
        job.done.set()

    def open_progress(self) -> dict[str, tuple[int, int]]:
        """Per open shard, by its first row's id: (input rows whose every completion has finished, the tokens
        of the completions finished). Any thread may ask; it reads without a lock (a row finishing meanwhile is
        counted at the next ask)."""
        progress = {}
        for job in [job for job in list(self._open) if job.outputs]:
            pending = {out.id for out in job.outputs if out.finished_at is None and out.error is None}
            progress[job.outputs[0].id] = (len({out.id for out in job.outputs} - pending), job.tokens)
        return progress

    def fail_open_shards(self, exc: BaseException) -> None:
        """The decode loop itself broke: every open shard is failed with ``exc`` (its caller re-raises)."""
        with self._lock:
            jobs, self._open = self._open, []
        for job in jobs:
            job.error = exc
            job.done.set()


@dataclass
class StepClock:
    """Steps taken, their wall seconds, and the stepping thread's CPU seconds in them."""

    steps: int = 0
    wall_s: float = 0.0
    thread_cpu_s: float = 0.0

    def add(self, wall_s: float, thread_cpu_s: float) -> None:
        self.steps += 1
        self.wall_s += wall_s
        self.thread_cpu_s += thread_cpu_s

    def copy(self) -> StepClock:
        return replace(self)

    def since(self, earlier: StepClock) -> StepClock:
        return StepClock(self.steps - earlier.steps, self.wall_s - earlier.wall_s,
                         self.thread_cpu_s - earlier.thread_cpu_s)

    def as_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "wall_s": round(self.wall_s, 4), "thread_cpu_s": round(self.thread_cpu_s, 4)}


@dataclass
class ShardJob:
    """One shard in the engine: its outputs (filled as its completions finish), the slot counters of the steps
    since the previous shard closed, and ``done``, set once all of its completions are."""

    outputs: list[RowOutput]
    remaining: int
    occupancy: dict[str, int] = field(default_factory=dict)
    tokens: int = 0  # of the completions finished so far (the progress line's, before the shard is done)
    clock: StepClock | None = None  # the decode loop's steps since the previous shard closed
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def empty_acceptance_table(k: int, top_k: int = 10) -> list[list[float]]:
    """No guess ever right: what untrained prompt tokens are planned with when they may be adapted (every tree
    then predicts one token a step, so plain decoding is chosen)."""
    return [[0.0] * top_k for _ in range(k)]


@dataclass
class PendingPrompts:
    """Prompt tokens queued for the decode loop; ``done`` once adopted (or refused: ``error``)."""

    prompt_tokens: PromptTokens
    prompts_hash: str
    source: str
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Completion:
    """One completion to decode: its output record, prompt ids, token budget and sampling."""

    output: RowOutput
    prompt: list[int]
    budget: int
    params: SamplingParams
    stop: StopStrings | None
