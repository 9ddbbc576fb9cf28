"""Step-latency profiles cached on disk, so a restarted worker (or a second worker on the same kind of
device) reuses the measurement instead of paying for it again."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from decoding import PromptTokens
from profiling.device import DeviceIdentity, identify
from profiling.latency import DEFAULT_SLOTS, LatencyProfile, measure_profile
from workers.models import write_json_atomically

log = logging.getLogger(__name__)

# Bumped whenever the decode step's cost changes (2: the lm_head runs on the prompt tokens in use only), so a
# profile of older code is measured again instead of reused.
PROFILE_VERSION = 2

# A cached profile is re-checked at start-up against two fresh steps: plain decoding and a tree-sized step at
# its smallest batch size. One measured while something else loaded the machine keeps its distorted shape
# for good (seen: the 1-slot step at 1.4x its real cost, which made every tree look cheap next to plain
# decoding). Past this factor, in two probes running, the profile is measured again.
SPOT_CHECK_TOLERANCE = 1.3
SPOT_CHECK_SLOTS = 16  # the probe's tree: the measured slot count nearest this
# Below this plain step, timings are mostly interpreter overhead and scheduler noise (a tiny test model's 1 ms
# steps disagree with themselves by 1.3x one probe in five): no check.
SPOT_CHECK_MIN_SECONDS = 0.005


def profile_path(cache_dir: Path, identity: DeviceIdentity, model_hash: str, k: int, n: int,
                 batch_sizes: Sequence[int], slots: Sequence[int], context_len: int, budget_s: float | None) -> Path:
    """Everything that shapes the measurement is in the key: a short-budget profile never stands in for a
    full one."""
    key = json.dumps({"version": PROFILE_VERSION, "device": identity.key(), "model": model_hash, "k": k, "n": n,
                      "batches": sorted(set(batch_sizes)), "slots": sorted(set(slots)), "context": context_len,
                      "budget_s": budget_s},
                     sort_keys=True)
    return cache_dir / "profiles" / f"latency-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def load_or_measure_profile(model, prompt_tokens: PromptTokens, *, model_hash: str, cache_dir: Path | None,
                            batch_sizes: Sequence[int], slots: Sequence[int] = DEFAULT_SLOTS,
                            context_len: int = 256, budget_s: float | None = None,
                            spot_check: bool = True) -> tuple[LatencyProfile, bool]:
    """The cached profile for this device and model if there is one and it passes the spot check (see
    SPOT_CHECK_TOLERANCE), else a fresh measurement (then cached). Returns (profile, whether it came from
    the cache)."""
    weight = model.get_input_embeddings().weight
    identity = identify(weight.device, weight.dtype)
    path = None
    if cache_dir is not None:
        path = profile_path(cache_dir, identity, model_hash, prompt_tokens.k, prompt_tokens.n, batch_sizes,
                            slots, context_len, budget_s)
        if path.exists():
            try:
                cached = LatencyProfile.model_validate_json(path.read_text())
            except ValueError as exc:  # a damaged or outdated file: measure again
                log.warning("ignoring unreadable profile %s: %s", path, exc)
            else:
                # Both probes must disagree: one slow probe says more about now than about the profile.
                if not spot_check or any(shape_error(cached, model, prompt_tokens, model_hash) <= SPOT_CHECK_TOLERANCE
                                         for _ in range(2)):
                    return cached, True
                log.warning("cached profile %s is off in shape by over %.1fx against fresh steps: measuring again",
                            path, SPOT_CHECK_TOLERANCE)
    profile = measure_profile(model, prompt_tokens, model_hash=model_hash, batch_sizes=batch_sizes, slots=slots,
                              context_len=context_len, budget_s=budget_s)
    if path is not None:
        write_json_atomically(path, profile.model_dump(mode="json"))
    return profile, False


def shape_error(profile: LatencyProfile, model, prompt_tokens: PromptTokens, model_hash: str) -> float:
    """Time plain decoding and a tree-sized step afresh at the profile's smallest batch size; return how far
    the profile's ratio of the two is from the fresh one, as a factor >= 1 (1 when there is no tree point).
    Profiles of steps under SPOT_CHECK_MIN_SECONDS are not checked. The shape, not the scale: a profile is
    only ever used for relative costs (the choice of tree and batch size), and ProPD rescales it by the steps
    it runs."""
    batch = profile.batches()[0]
    measured = profile.measured_slots(batch)
    trees = [s for s in measured if s > 1]
    if 1 not in measured or not trees or profile.step_seconds(batch, 1) < SPOT_CHECK_MIN_SECONDS:
        return 1.0
    probe = min(trees, key=lambda s: abs(s - SPOT_CHECK_SLOTS))
    fresh = measure_profile(model, prompt_tokens, model_hash=model_hash, batch_sizes=[batch], slots=[1, probe],
                            context_len=profile.context_len, budget_s=1e9, repeats=9)
    if fresh.measured_slots(batch) != [1, probe]:
        return 1.0
    ratio = (profile.step_seconds(batch, probe) / profile.step_seconds(batch, 1)) / (
        fresh.step_seconds(batch, probe) / fresh.step_seconds(batch, 1))
    return max(ratio, 1 / ratio)
