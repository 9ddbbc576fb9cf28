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
                            context_len: int = 256, budget_s: float | None = None) -> tuple[LatencyProfile, bool]:
    """The cached profile for this device and model if there is one, else a fresh measurement (then cached).
    Returns (profile, whether it came from the cache)."""
    weight = model.get_input_embeddings().weight
    identity = identify(weight.device, weight.dtype)
    path = None
    if cache_dir is not None:
        path = profile_path(cache_dir, identity, model_hash, prompt_tokens.k, prompt_tokens.n, batch_sizes,
                            slots, context_len, budget_s)
        if path.exists():
            try:
                return LatencyProfile.model_validate_json(path.read_text()), True
            except ValueError as exc:  # a damaged or outdated file: measure again
                log.warning("ignoring unreadable profile %s: %s", path, exc)
    profile = measure_profile(model, prompt_tokens, model_hash=model_hash, batch_sizes=batch_sizes, slots=slots,
                              context_len=context_len, budget_s=budget_s)
    if path is not None:
        write_json_atomically(path, profile.model_dump(mode="json"))
    return profile, False
