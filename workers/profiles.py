"""Step-latency profiles cached on disk, so a restarted worker (or a second worker on the same kind of
device, or one of a batch size that a cached profile covers) reuses the measurement instead of paying for it
again."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from decoding import PromptTokens
from decoding.runners import StepMode
from profiling.device import DeviceIdentity, identify
from profiling.latency import DEFAULT_SLOTS, LatencyProfile, attempted_slots, measure_profile
from trees.builder import choose_budget
from workers.models import write_json_atomically
from workers.numerics import numeric_path

log = logging.getLogger(__name__)

# Bumped whenever the decode step's cost changes (the commit log says how), so a profile of older code is
# measured again instead of reused.
PROFILE_VERSION = 8

# A cached profile is re-checked at start-up, first for its shape alone (no timing), then against fresh steps:
# a profile measured while something else loaded the machine would keep its distorted shape for good
# (measured on the 2-core VM at batch 1: 1 slot 60.8 ms against ~45 quiet, 4 slots 109.8, 8 slots 92.4,
# 16 slots 102.8; static planning chose the 8-slot tree from it and lost 5-13% to plain decoding).
#
# Shape alone: a larger slot count measured faster than a smaller one at the same batch size by more than
# this factor. A real step does not get cheaper with more input tokens; quiet steps on the 2-core VM invert by
# up to 1.14x (3 repeats each), the loaded profile above by 1.19x.
SPOT_CHECK_MONOTONE_TOLERANCE = 1.15
# A fresh measurement inverted by more than that is timed again where it inverts (retime_inversions), at most
# this many times, before it is cached: the slot counts it spans cost a few steps each.
RETIME_ROUNDS = 3
# Against fresh steps: plain decoding and a few tree sizes are timed at the profile's smallest batch size,
# and each tree's ratio to the plain step is compared with the profile's. Past this factor for one of them,
# in two probes running and the same way in both (the profile too dear for that tree twice, or too cheap
# twice), the profile is measured again: a change of the machine shows the same way every time, a busy
# moment wherever it falls (measured: with any size off in both probes as the rule, one job in twelve threw
# a good profile away on this VM, costing 56 s). A probe times the sizes in turn, round after round
# (measure_profile's ``interleaved``): a busy moment slows every size of its round alike, so the ratios hold,
# where timing each size's repeats in one block put the whole moment on one size.
SPOT_CHECK_TOLERANCE = 1.3
# The probe's trees: the measured slot counts nearest these, and the tree static planning would choose from
# the profile at that batch size (when the prompt tokens carry an acceptance table): that is where a
# profile's optimism does its harm. A probe costs (1 warm-up + SPOT_CHECK_REPEATS) steps of each size, plus
# 0.02-0.25 s to build the planner's candidate trees; twice when the first disagrees. Measured on the 2-core
# VM at batch 1 (default model: 1 slot ~45 ms, 4-16 slots ~70-85 ms): 2.5 s a probe (4 and 16 slots) to
# 3.2-3.8 s (and the planner's 8-slot tree).
SPOT_CHECK_SLOTS = (4, 16)
SPOT_CHECK_REPEATS = 9
# Below this plain step, timings are mostly interpreter overhead and scheduler noise (a tiny test model's 1 ms
# steps disagree with themselves by 1.3x one probe in five): no check, neither of shape nor against fresh steps.
SPOT_CHECK_MIN_SECONDS = 0.005


def profile_key(identity: DeviceIdentity, model_hash: str, k: int, n: int, batch_sizes: Sequence[int],
                slots: Sequence[int], context_len: int, budget_s: float | None, numerics: str,
                step_mode: str = "eager") -> dict:
    """Everything that shapes the measurement: a short-budget profile never stands in for a full one, nor one
    of nn.Linear for one of weight-stationary linear layers, or of one attention kernel for another
    (``numerics``: workers.numerics.numeric_path), or of eager steps for one of captured steps."""
    return {"version": PROFILE_VERSION, "device": identity.key(), "model": model_hash, "k": k, "n": n,
            "batches": sorted(set(batch_sizes)), "slots": sorted(set(slots)), "context": context_len,
            "budget_s": budget_s, "numerics": numerics, "step": step_mode}


def profile_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "profiles" / f"latency-{digest}.json"


def _key_path(path: Path) -> Path:
    return path.with_suffix(".key")  # beside the profile; not *.json: not a profile


def covering_profile(cache_dir: Path, key: dict) -> Path | None:
    """A cached profile measured as ``key`` asks in everything but the batch sizes, which it has all of (and
    more), each with every slot count a measurement attempts: each batch size is timed on its own, so its
    points are what measuring ``key`` would give, unless the time budget (shared by the batch sizes) ran out
    before the largest trees, hence the count. A worker of batch 8 then reuses the profile a worker of batch
    32 measured (52 s on the 2-core VM). The one with the fewest batch sizes, if several; None if none."""
    want, rest = set(key["batches"]), {name: v for name, v in key.items() if name != "batches"}
    best: tuple[int, Path] | None = None
    for side in sorted((cache_dir / "profiles").glob("latency-*.key")):
        try:
            other = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(other, dict) or not isinstance(other.get("batches"), list):
            continue
        if {name: v for name, v in other.items() if name != "batches"} == rest and want <= set(other["batches"]):
            candidate = side.with_suffix(".json")
            if (best is None or len(other["batches"]) < best[0]) and _complete(candidate, key):
                best = (len(other["batches"]), candidate)
    return None if best is None else best[1]


def _complete(path: Path, key: dict) -> bool:
    """Whether the profile at ``path`` timed every slot count a measurement attempts at ``key``'s batch sizes."""
    try:
        profile = LatencyProfile.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return False
    attempted = len(attempted_slots(key["k"], key["n"], key["slots"]))
    return all(len(profile.measured_slots(batch)) >= attempted for batch in key["batches"])


def load_or_measure_profile(model, prompt_tokens: PromptTokens, *, model_hash: str, cache_dir: Path | None,
                            batch_sizes: Sequence[int], slots: Sequence[int] = DEFAULT_SLOTS,
                            context_len: int = 256, budget_s: float | None = None,
                            spot_check: bool = True, step_mode: StepMode = "eager") -> tuple[LatencyProfile, bool]:
    """The cached profile for this device and model if there is one and it passes the spot check (see
    SPOT_CHECK_MONOTONE_TOLERANCE and SPOT_CHECK_TOLERANCE), else a fresh measurement (then cached).
    Returns (profile, whether it came from the cache)."""
    weight = model.get_input_embeddings().weight
    identity = identify(weight.device, weight.dtype)
    path = None
    if cache_dir is not None:
        key = profile_key(identity, model_hash, prompt_tokens.k, prompt_tokens.n, batch_sizes, slots,
                          context_len, budget_s, numerics=numeric_path(model), step_mode=step_mode)
        path = profile_path(cache_dir, key)  # where a fresh measurement goes
        source = path if path.exists() else covering_profile(cache_dir, key)
        if source is not None:
            try:
                cached = LatencyProfile.model_validate_json(source.read_text())
            except ValueError as exc:  # a damaged or outdated file: measure again
                log.warning("ignoring unreadable profile %s: %s", source, exc)
            else:
                if not spot_check:
                    return cached, True
                inversion = worst_inversion(cached)  # first: it costs no timing
                if inversion.factor > SPOT_CHECK_MONOTONE_TOLERANCE and not _inversions_accepted(source, cached):
                    log.warning("cached profile %s is not monotone in slots (%s): measuring again", source,
                                inversion)
                # Both probes must disagree, on the same tree the same way: one slow probe says more about now
                # than about the profile.
                elif not consistently_off(cached, model, prompt_tokens, model_hash, step_mode):
                    return cached, True
                else:
                    log.warning("cached profile %s is off in shape by over %.1fx against fresh steps: measuring "
                                "again", source, SPOT_CHECK_TOLERANCE)
    profile = measure_profile(model, prompt_tokens, model_hash=model_hash, batch_sizes=batch_sizes, slots=slots,
                              context_len=context_len, budget_s=budget_s, step_mode=step_mode)
    profile = retime_inversions(profile, model, prompt_tokens, model_hash, step_mode)
    if path is not None:
        write_json_atomically(path, profile.model_dump(mode="json"))
        write_json_atomically(_key_path(path), key)  # after the profile: a key never names a missing profile
        marker = _inversions_accepted_path(path)
        inversion = worst_inversion(profile)
        if inversion.factor > SPOT_CHECK_MONOTONE_TOLERANCE:
            # Timed again and inverted still: this is what the device measures (a step whose cost hardly depends
            # on its slots shows its noise as inversions; the shipped H100 profile of the default model inverts
            # by 2.1x at batch 1). Refusing it at the next start-up would only measure it again there: this
            # profile is not refused for its shape (the check against fresh steps stays).
            log.warning("the fresh profile %s is not monotone in slots (%s), timed again: kept", path, inversion)
            write_json_atomically(marker, _identity_of(profile))
        else:
            marker.unlink(missing_ok=True)
    return profile, False


def retime_inversions(profile: LatencyProfile, model, prompt_tokens: PromptTokens, model_hash: str,
                      step_mode: StepMode = "eager", rounds: int = RETIME_ROUNDS) -> LatencyProfile:
    """A fresh profile with its worst inversion beyond SPOT_CHECK_MONOTONE_TOLERANCE timed again: the slot counts
    from the inversion's smaller to its larger, at its batch size, interleaved (a busy moment slows them alike),
    each point keeping the faster of its two timings (noise only adds time); up to ``rounds`` times, while an
    inversion is left. A busy moment's distortion is mended in a few steps, where a profile refused for it at
    the next start-up is measured again whole (~55 s on the 2-core VM)."""
    for _ in range(rounds):
        inversion = worst_inversion(profile)
        if inversion.factor <= SPOT_CHECK_MONOTONE_TOLERANCE:
            break
        span = [s for s in profile.measured_slots(inversion.batch) if inversion.slots <= s <= inversion.faster_slots]
        again = measure_profile(model, prompt_tokens, model_hash=model_hash, batch_sizes=[inversion.batch],
                                slots=span, context_len=profile.context_len, budget_s=1e9, step_mode=step_mode,
                                interleaved=True)
        faster = {p.slots: p.seconds for p in again.points}
        points = [p.model_copy(update={"seconds": min(p.seconds, faster.get(p.slots, p.seconds))})
                  if p.batch == inversion.batch else p for p in profile.points]
        profile = profile.model_copy(update={"points": points,
                                             "profile_seconds": profile.profile_seconds + again.profile_seconds})
    return profile


class Inversion(NamedTuple):
    """A larger slot count measured faster than a smaller one: ``factor`` = the smaller one's seconds over
    the larger one's (1.0 and no slots when there is none)."""

    factor: float
    batch: int = 0
    slots: int = 0
    faster_slots: int = 0
    seconds: float = 0.0
    faster_seconds: float = 0.0

    def __str__(self) -> str:
        return (f"batch {self.batch}: {self.slots} slots {self.seconds * 1e3:.1f} ms, {self.faster_slots} slots "
                f"{self.faster_seconds * 1e3:.1f} ms, {self.factor:.2f}x")


def worst_inversion(profile: LatencyProfile) -> Inversion:
    """The largest factor by which a step of more slots per row was measured faster than one of fewer, at
    any batch size: no timing, only the profile. Batch sizes whose smallest step is under
    SPOT_CHECK_MIN_SECONDS are left out (their timings are mostly noise)."""
    worst = Inversion(1.0)
    for batch in profile.batches():
        curve = sorted((p.slots, p.seconds) for p in profile.points if p.batch == batch)
        if curve[0][1] < SPOT_CHECK_MIN_SECONDS:
            continue
        slowest = curve[0]  # the slowest step of fewer slots than the current one
        for slots, seconds in curve[1:]:
            if seconds > 0 and slowest[1] / seconds > worst.factor:
                worst = Inversion(slowest[1] / seconds, batch, slowest[0], slots, slowest[1], seconds)
            if seconds > slowest[1]:
                slowest = (slots, seconds)
    return worst


def _inversions_accepted_path(path: Path) -> Path:
    return path.with_name(path.stem + ".inversions-accepted")  # not *.json: not a profile


def _identity_of(profile: LatencyProfile) -> dict:
    return {"measured_at": profile.measured_at, "profile_seconds": profile.profile_seconds}


def _inversions_accepted(path: Path, profile: LatencyProfile) -> bool:
    """Whether this very profile was measured because its predecessor was refused as inverted, and was
    inverted as well (then kept)."""
    try:
        return json.loads(_inversions_accepted_path(path).read_text()) == _identity_of(profile)
    except (OSError, ValueError):
        return False


def probe_slots(profile: LatencyProfile, prompt_tokens: PromptTokens, batch: int) -> list[int]:
    """The tree sizes the spot check times at ``batch``: the measured slot counts nearest SPOT_CHECK_SLOTS,
    and the slot count of the tree static planning would choose from this profile (workers/planning.py,
    with the prompt tokens' acceptance table, if they carry one), unless that is plain decoding."""
    trees = [s for s in profile.measured_slots(batch) if s > 1]
    probes = {min(trees, key=lambda s: (abs(s - target), s)) for target in SPOT_CHECK_SLOTS} if trees else set()
    acceptance = prompt_tokens.meta.extra.get("acceptance")
    if acceptance and trees:
        choice = choose_budget(acceptance, prompt_tokens.k, lambda s: profile.step_seconds(batch, s),
                               profile.measured_slots(batch), n=prompt_tokens.n)
        if choice.chosen.slots > 1:
            probes.add(choice.chosen.slots)
    return sorted(probes)


def consistently_off(profile: LatencyProfile, model, prompt_tokens: PromptTokens, model_hash: str,
                     step_mode: StepMode = "eager") -> bool:
    """Whether two probes (``shape_errors``) both find one tree's ratio off by over SPOT_CHECK_TOLERANCE, the same
    way (the second probe runs only when the first finds one)."""
    first = {s: r for s, r in shape_errors(profile, model, prompt_tokens, model_hash, step_mode).items() if _off(r)}
    if not first:
        return False
    second = shape_errors(profile, model, prompt_tokens, model_hash, step_mode)
    both = {s: (r, second[s]) for s, r in first.items()
            if s in second and _off(second[s]) and (second[s] > 1) == (r > 1)}
    if both:  # what the start-up's warning cannot say: which trees, and by how much (above 1: priced too dear)
        log.warning("the profile's tree / plain step ratios against fresh steps, two probes: %s", ", ".join(
            f"{s} slots {a:.2f}x then {b:.2f}x" for s, (a, b) in sorted(both.items())))
    return bool(both)


def _off(ratio: float) -> bool:
    """Whether a shape error (a ratio, either way from 1) is beyond SPOT_CHECK_TOLERANCE."""
    return max(ratio, 1 / ratio) > SPOT_CHECK_TOLERANCE


def shape_error(profile: LatencyProfile, model, prompt_tokens: PromptTokens, model_hash: str,
                step_mode: StepMode = "eager") -> float:
    """The worst of ``shape_errors`` as a factor >= 1 (1 when none was timed)."""
    return max([max(r, 1 / r) for r in shape_errors(profile, model, prompt_tokens, model_hash, step_mode).values()],
               default=1.0)


def shape_errors(profile: LatencyProfile, model, prompt_tokens: PromptTokens, model_hash: str,
                 step_mode: StepMode = "eager") -> dict[int, float]:
    """Time plain decoding and the probe's trees (probe_slots) afresh at the profile's smallest batch size;
    return, for each tree timed (by slots), the profile's ratio of its step to the plain step over the fresh
    ratio (above 1: the profile prices the tree too dear). None is timed for profiles of steps under
    SPOT_CHECK_MIN_SECONDS. The shape, not the scale: a profile is only ever used for relative costs (the choice
    of tree and batch size), and ProPD rescales it by the steps it runs."""
    batch = profile.batches()[0]
    if 1 not in profile.measured_slots(batch) or profile.step_seconds(batch, 1) < SPOT_CHECK_MIN_SECONDS:
        return {}
    probes = probe_slots(profile, prompt_tokens, batch)
    if not probes:
        return {}
    fresh = measure_profile(model, prompt_tokens, model_hash=model_hash, batch_sizes=[batch], slots=[1, *probes],
                            context_len=profile.context_len, budget_s=1e9, repeats=SPOT_CHECK_REPEATS,
                            step_mode=step_mode, interleaved=True)
    # With ensembles a few slot counts cannot be built and the next one down is timed: compared as timed.
    timed = [s for s in fresh.measured_slots(batch) if s > 1]
    if 1 not in fresh.measured_slots(batch):
        return {}
    return {slots: (profile.step_seconds(batch, slots) / profile.step_seconds(batch, 1))
            / (fresh.step_seconds(batch, slots) / fresh.step_seconds(batch, 1)) for slots in timed}
