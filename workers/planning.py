"""What a worker decodes with on its device: the tree set and the batch size, chosen from a latency profile.

The profile is this device's own measurement (cached per device and model, workers/profiles.py), or one
given as a file (a profile measured on another machine of the same kind, or a simulated device in tests).
The trees come from the prompt tokens' acceptance table by tree search (trees/builder.py, trees/paths.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decoding import PromptTokens, TreeSet, default_tree_set
from decoding.runners import StepMode
from profiling.latency import DEFAULT_SLOTS, LatencyProfile
from trees.builder import BudgetChoice, choose_budget, estimate, tree_set_slots
from trees.paths import fixed_size_tree_set
from workers.profiles import load_or_measure_profile

log = logging.getLogger(__name__)

# Batch sizes an `auto` worker measures (up to the job's shard size). Powers of 4 keep the profile short.
AUTO_BATCH_CANDIDATES = (1, 4, 16, 64, 256)
# `auto` takes the smallest batch within this fraction of the best measured throughput: bigger batches
# waste more slots on rows that already finished, which the profile does not see.
AUTO_BATCH_TOLERANCE = 0.9


@dataclass
class DecodingPlan:
    tree_set: TreeSet | None  # None: vanilla decoding
    batch_size: int
    info: dict[str, Any] = field(default_factory=dict)  # what the driver prints and summary.json records
    profile: LatencyProfile | None = None  # the step latencies planned with (None when none was needed)


def load_profile_file(path: str | Path, prompt_tokens: PromptTokens, model_hash: str) -> LatencyProfile:
    """A latency profile from a file, checked against what it will be used for."""
    profile = LatencyProfile.model_validate_json(Path(path).read_text())
    if (profile.k, profile.ensemble) != (prompt_tokens.k, prompt_tokens.n):
        raise ValueError(f"latency profile {path} was measured for k={profile.k}, n={profile.ensemble}; "
                         f"the prompt tokens have k={prompt_tokens.k}, n={prompt_tokens.n}")
    if profile.model_hash != model_hash:
        raise ValueError(f"latency profile {path} was measured for model {profile.model_hash[:12]}…, "
                         f"not the loaded model {model_hash[:12]}…")
    return profile


def best_tree_set(profile: LatencyProfile, acceptance, k: int, n: int, batch_size: int) -> BudgetChoice:
    """The hardware-aware tree set for this batch size: the slot budget whose expected tokens per measured second
    are highest under ``acceptance``, over the budgets the profile measured."""
    return choose_budget(acceptance, k, lambda s: profile.step_seconds(batch_size, s),
                         profile.measured_slots(batch_size) or profile.measured_slots(profile.batches()[-1]), n=n)


def plan_decoding(model, prompt_tokens: PromptTokens | None, *, tree_nodes: int | None, batch_size: int | None,
                  max_batch_size: int, model_hash: str, cache_dir: Path | None, profile_budget_s: float | None,
                  latency_profile: str | None = None, step_mode: StepMode = "eager") -> DecodingPlan:
    """Choose the tree set and batch size. `prompt_tokens` None means vanilla decoding; `batch_size` None
    means `auto` (the measured best up to `max_batch_size`). `step_mode`: the step a measured profile times
    (profiling/latency.py)."""
    acceptance = prompt_tokens.meta.extra.get("acceptance") if prompt_tokens is not None else None
    fixed: TreeSet | None = None
    info: dict[str, Any] = {}
    if prompt_tokens is None:
        info["tree"] = "none (vanilla)"
    elif tree_nodes:
        if not acceptance:
            raise ValueError("--tree-nodes needs prompt tokens with an acceptance table (a trained artifact)")
        fixed = fixed_size_tree_set(acceptance, tree_nodes, prompt_tokens.k)
        info = {"tree": f"fixed, {tree_nodes} nodes", "predicted_tau": estimate(acceptance, fixed).expected_tokens}
    elif not acceptance:
        fixed = default_tree_set(k=prompt_tokens.k)
        info["tree"] = "default (the prompt tokens have no acceptance table)"
    hardware_aware = prompt_tokens is not None and fixed is None
    if not hardware_aware and batch_size is not None:
        return DecodingPlan(fixed, batch_size, {**info, "batch_size": batch_size})

    # Everything else needs step latencies: the hardware-aware tree, or an `auto` batch size.
    profiled = prompt_tokens or PromptTokens.from_token_embeddings(model, k=1, base_model_id="",
                                                                      base_model_hash=model_hash)
    fixed_slots = tree_set_slots(fixed, prompt_tokens.n) if fixed is not None else 1
    candidates = ([batch_size] if batch_size is not None
                  else [b for b in AUTO_BATCH_CANDIDATES if b <= max_batch_size] or [1])
    if latency_profile:
        profile, source = load_profile_file(latency_profile, profiled, model_hash), f"from {latency_profile}"
        if batch_size is None:
            candidates = [b for b in profile.batches() if b <= max_batch_size] or profile.batches()[:1]
    else:
        profile, cached = load_or_measure_profile(
            model, profiled, model_hash=model_hash, cache_dir=cache_dir, batch_sizes=sorted({1, *candidates}),
            slots=DEFAULT_SLOTS if hardware_aware else sorted({1, fixed_slots}), budget_s=profile_budget_s,
            step_mode=step_mode)
        source = "cached" if cached else f"measured in {profile.profile_seconds:.1f} s"

    # Rows per second at each candidate batch size, with the best tree for that batch size.
    options = []
    for b in candidates:
        if hardware_aware:
            choice = best_tree_set(profile, acceptance, prompt_tokens.k, prompt_tokens.n, b)
            tokens, seconds = choice.chosen.estimate.expected_tokens, choice.step_seconds
            options.append((b * tokens / seconds, b, choice))
        else:
            seconds = profile.step_seconds(b, fixed_slots)
            if seconds != float("inf"):
                options.append((b * info.get("predicted_tau", 1.0) / seconds, b, None))
    if not options:
        raise ValueError("the latency profile has no measurement for this tree at any candidate batch size")
    best_rate = max(rate for rate, _, _ in options)
    rate, chosen_batch, choice = min((o for o in options if o[0] >= AUTO_BATCH_TOLERANCE * best_rate),
                                     key=lambda o: o[1])
    info.update(batch_size=chosen_batch, profile=source, predicted_tokens_per_s=rate,
                batch_size_choice=("fixed" if batch_size is not None else
                                   {str(b): round(r, 2) for r, b, _ in options}))
    if choice is None:
        return DecodingPlan(fixed, chosen_batch, info, profile)
    chosen = choice.chosen
    info.update(tree="hardware-aware", tree_budget=chosen.budget, tree_slots=chosen.slots,
                predicted_tau=chosen.estimate.expected_tokens, predicted_speedup=choice.speedup,
                predicted_step_s=choice.step_seconds)
    log.info("batch %d: tree of %d slots per row (%s), predicted tau %.2f, %.2fx over plain decoding; profile %s",
             chosen_batch, chosen.slots, [len(t.paths) for t in chosen.tree_set.trees],
             chosen.estimate.expected_tokens, choice.speedup, source)
    return DecodingPlan(chosen.tree_set, chosen_batch, info, profile)
