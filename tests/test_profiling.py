"""Device profiling: the synthetic trees the profiler times, latency interpolation, a real (short) profile of a
tiny model, the profile cache, and the engine choosing its tree from the profile."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoding import PPDDecoder, PromptTokens, VanillaDecoder
from decoding.propd import ProPDDecoder
from decoding.tree import tree_set_buffers
from profiling import latency
from profiling.device import identify
from profiling.latency import LatencyPoint, LatencyProfile, measure_profile
from tests.helpers_models import save_trained_artifact, tiny_loaded_model
from trees.builder import tree_set_slots
from trees.synthetic import max_tree_slots, synthetic_tree_set
from workers import profiles
from workers.configs import DecodingConfig
from workers.cpu_linear import use_weight_stationary_linears
from workers.engine import DecodeEngine
from workers.profiles import load_or_measure_profile, probe_slots, shape_error, worst_inversion


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 400), n=st.integers(1, 3), k=st.integers(1, 4))
def test_synthetic_tree_has_the_slots_asked(slots, n, k):
    if slots > max_tree_slots(k, 10, n):
        with pytest.raises(ValueError, match="no tree"):
            synthetic_tree_set(k, 10, slots, n)
        return
    ts = synthetic_tree_set(k, 10, slots, n)
    got = tree_set_slots(ts, n)
    assert tree_set_buffers(ts, n=n).state_sizes[k].slots == got
    if n == 1:
        assert got == slots
    else:  # every prompt token takes n slots: a few sizes are out of reach, and the next one down is taken
        assert slots - n < got <= slots


def profile_of(points):
    return LatencyProfile(device=identify("cpu", torch.float32), model_hash="m", k=3, ensemble=1, context_len=8,
                          points=[LatencyPoint(batch=b, slots=s, seconds=t, repeats=1) for b, s, t in points],
                          profile_seconds=0.0, measured_at="now")


def test_step_seconds_interpolates_measured_points_only():
    p = profile_of([(1, 1, 1.0), (1, 4, 1.0), (1, 8, 3.0), (4, 1, 2.0), (4, 8, 9.0)])
    assert p.step_seconds(1, 6) == pytest.approx(2.0)
    assert p.step_seconds(1, 8) == 3.0
    assert p.step_seconds(1, 9) == float("inf")  # never measured: never chosen
    assert p.step_seconds(2, 1) == 2.0  # the next measured batch size up
    assert p.step_seconds(9, 8) == 9.0  # past the largest: the largest
    assert p.measured_slots(4) == [1, 8] and p.batches() == [1, 4]


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded_model()


class StepClock:
    """A clock for ``measure_profile`` that moves only when a decode step runs, by 1 ms per slot of its tree: the
    profile's budget logic then runs the same on a quiet machine and a loaded one."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        step = PPDDecoder.step

        def timed_step(decoder, cache, buffers, *args, **kwargs):
            self.now += 1e-3 * buffers.widest.slots
            return step(decoder, cache, buffers, *args, **kwargs)

        monkeypatch.setattr(PPDDecoder, "step", timed_step)
        monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: self.now))


def test_measure_profile_on_a_tiny_model(tiny, monkeypatch):
    pt = PromptTokens.from_token_embeddings(tiny.model, k=3, base_model_id="tiny", base_model_hash="tinyhash")
    clock = StepClock(monkeypatch)
    profile = measure_profile(tiny.model, pt, model_hash="tinyhash", batch_sizes=[2, 1], slots=[1, 4, 16, 64],
                              context_len=32, budget_s=20)
    assert profile.batches() == [1, 2] and profile.measured_slots(2) == [1, 4, 16, 64]
    assert [p.seconds for p in profile.points if p.batch == 2] == pytest.approx([1e-3, 4e-3, 16e-3, 64e-3])
    assert all(p.repeats == 3 for p in profile.points)
    assert profile.device.kind == "cpu" and profile.device.threads == torch.get_num_threads()
    # A budget too small for the larger sizes stops before a size it predicts would overrun it (slots x the
    # last point's time per slot, for a warm-up and 3 repeats), keeping what it measured: 1 slot takes 4 ms, 4
    # slots 16 ms, and 16 slots would end at 84 ms.
    clock.now = 0.0
    short = measure_profile(tiny.model, pt, model_hash="tinyhash", batch_sizes=[1], slots=[1, 4, 16, 64, 4096],
                            context_len=32, budget_s=0.05)
    assert short.measured_slots(1) == [1, 4] and short.profile_seconds == pytest.approx(0.02)


def test_an_interleaved_measurement_keeps_its_shape_through_a_busy_moment(tiny, monkeypatch):
    """The spot check's timing: a busy moment (8 steps running 3x slower) lands on one size when each size's
    repeats run in one block, and on every size alike, a round or so each, when the sizes take turns."""
    pt = PromptTokens.from_token_embeddings(tiny.model, k=3, base_model_id="tiny", base_model_hash="tinyhash")
    calls = []
    step = PPDDecoder.step

    def busy_step(decoder, cache, buffers, *args, **kwargs):
        calls.append(buffers.widest.slots)
        clock["now"] += 1e-3 * buffers.widest.slots * (3.0 if 12 <= len(calls) < 20 else 1.0)
        return step(decoder, cache, buffers, *args, **kwargs)

    monkeypatch.setattr(PPDDecoder, "step", busy_step)
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    args = dict(model_hash="tinyhash", batch_sizes=[1], slots=[1, 4, 16], context_len=32, budget_s=1e9, repeats=9)
    for interleaved, expected in ((False, [1e-3, 12e-3, 16e-3]), (True, [1e-3, 4e-3, 16e-3])):
        clock, calls = {"now": 0.0}, []
        profile = measure_profile(tiny.model, pt, interleaved=interleaved, **args)
        assert [p.seconds for p in profile.points] == pytest.approx(expected), interleaved
    assert calls[:6] == [1, 4, 16, 1, 4, 16]  # a warm-up of each, then rounds


@pytest.mark.parametrize("probes, refused", [
    ([{4: 1.0, 16: 1.2}], False),  # within the tolerance: one probe, kept
    ([{4: 1.5, 16: 1.0}, {4: 0.6, 16: 1.0}], False),  # the same tree off both times, but the other way
    ([{4: 1.5, 16: 1.0}, {4: 1.1, 16: 1.5}], False),  # off both times, on different trees
    ([{4: 1.5, 16: 1.0}, {4: 1.4, 16: 0.9}], True),  # the 4-slot tree priced too dear twice: a real change
    ([{4: 0.7, 16: 1.0}, {4: 0.5, 16: 1.0}], True),  # too cheap twice
])
def test_the_spot_check_measures_again_only_on_a_consistent_change(monkeypatch, caplog, probes, refused):
    """Two probes must find the same tree off, the same way: a busy moment falls anywhere, a changed machine
    shows the same way every time (measured: with any tree off in both probes as the rule, one job in twelve
    re-measured a good profile, 56 s)."""
    answers = iter(probes)
    monkeypatch.setattr(profiles, "shape_errors", lambda *args: next(answers))
    with caplog.at_level("WARNING", logger="workers.profiles"):
        assert profiles.consistently_off(None, None, None, "h") == refused
    assert next(answers, None) is None  # every probe given was taken, and no more
    # A refusal says which trees both probes found off, and by how much.
    if refused and probes[0] == {4: 0.7, 16: 1.0}:
        assert "4 slots 0.70x then 0.50x" in caplog.text and "16 slots" not in caplog.text
    assert ("two probes" in caplog.text) == refused


def test_profile_is_cached_per_device_and_model(tiny, tmp_path, monkeypatch):
    # The spot check of a cached profile (tested on its own) is passed here, so that a busy machine cannot make a
    # cached profile look stale: its timing of live steps, and its monotone check, which a loaded machine's
    # slowed tiny steps (over SPOT_CHECK_MIN_SECONDS) can fail.
    monkeypatch.setattr(profiles, "consistently_off", lambda *args, **kwargs: False)
    monkeypatch.setattr(profiles, "worst_inversion", lambda profile: profiles.Inversion(1.0))
    pt = PromptTokens.from_token_embeddings(tiny.model, k=3, base_model_id="tiny", base_model_hash="tinyhash")
    kwargs = dict(model_hash="tinyhash", cache_dir=tmp_path, batch_sizes=[1], slots=[1, 8], budget_s=5)
    first, cached_first = load_or_measure_profile(tiny.model, pt, **kwargs)
    again, cached_again = load_or_measure_profile(tiny.model, pt, **kwargs)
    assert (cached_first, cached_again) == (False, True) and again == first
    other, cached_other = load_or_measure_profile(tiny.model, pt, **{**kwargs, "model_hash": "other"})
    assert not cached_other
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2
    # The same weights with weight-stationary linear layers step at another cost: measured on their own.
    stationary = tiny_loaded_model().model
    use_weight_stationary_linears(stationary)
    _, cached_stationary = load_or_measure_profile(stationary, pt, **kwargs)
    assert not cached_stationary
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 3



def test_a_profile_covering_the_batch_sizes_asked_is_reused(tiny, tmp_path, monkeypatch):
    """A worker of batch 8 reuses the profile of a worker that measured batch 1 to 32 (each batch size is
    measured on its own); a profile missing a batch size asked, or measured otherwise, is not reused."""
    device = {1: 0.010, 16: 0.020}  # seconds per step, by slots (a fixed table: no timing in this test)
    measured = []

    def measure(model, prompt_tokens, *, batch_sizes, slots, **kwargs):
        measured.append(sorted(batch_sizes))
        return profile_of([(b, s, device[s] * b) for b in batch_sizes for s in slots])
    monkeypatch.setattr(profiles, "measure_profile", measure)
    monkeypatch.setattr(profiles, "consistently_off", lambda *args: False)  # the spot check passes (tested above)
    pt = PromptTokens.from_token_embeddings(tiny.model, k=3, base_model_id="tiny", base_model_hash="tinyhash")
    kwargs = dict(model_hash="tinyhash", cache_dir=tmp_path, slots=[1, 16], budget_s=5)
    wide, _ = load_or_measure_profile(tiny.model, pt, batch_sizes=[1, 2, 8, 32], **kwargs)
    narrow, _ = load_or_measure_profile(tiny.model, pt, batch_sizes=[1, 4], **kwargs)
    assert measured == [[1, 2, 8, 32], [1, 4]]
    reused, cached = load_or_measure_profile(tiny.model, pt, batch_sizes=[8, 1], **kwargs)
    assert cached and reused == wide and measured == [[1, 2, 8, 32], [1, 4]]
    assert load_or_measure_profile(tiny.model, pt, batch_sizes=[1], **kwargs) == (narrow, True)  # the fewest
    _, cached = load_or_measure_profile(tiny.model, pt, batch_sizes=[1, 16], **kwargs)  # 16 is in neither
    assert not cached and measured[-1] == [1, 16]
    _, cached = load_or_measure_profile(tiny.model, pt, batch_sizes=[1], **{**kwargs, "budget_s": 1})
    assert not cached and measured[-1] == [1]  # a shorter budget measures on its own
    # Only *.json files are profiles; the keys beside them are not.
    assert len(list((tmp_path / "profiles").glob("*.json"))) == len(list((tmp_path / "profiles").glob("*.key"))) == 4
    # A profile whose time budget ran out before the 16-slot step at batch 32 does not stand in for batch 32.
    wide_path = next(p for p in (tmp_path / "profiles").glob("*.json")
                     if LatencyProfile.model_validate_json(p.read_text()) == wide)
    cut = wide.model_copy(update={"points": [p for p in wide.points if (p.batch, p.slots) != (32, 16)]})
    wide_path.write_text(cut.model_dump_json())
    assert load_or_measure_profile(tiny.model, pt, batch_sizes=[2, 8], **kwargs) == (cut, True)  # complete there
    _, cached = load_or_measure_profile(tiny.model, pt, batch_sizes=[32], **kwargs)
    assert not cached and measured[-1] == [32]


def test_a_cached_profile_of_the_wrong_shape_is_measured_again(tiny, tmp_path, monkeypatch):
    """A profile measured on a busy machine (its 1-slot step priced 3x against its tree step) is caught by the
    start-up spot check and replaced. The device's steps are a fixed table (see the probe test below)."""
    device = {1: 0.010, 16: 0.040}  # seconds per step at batch 1, by slots
    measured = []

    def measure(model, prompt_tokens, *, batch_sizes, slots, **kwargs):
        measured.append(slots)
        return profile_of([(b, s, device[s]) for b in batch_sizes for s in slots])
    monkeypatch.setattr(profiles, "measure_profile", measure)
    pt = PromptTokens.from_token_embeddings(tiny.model, k=3, base_model_id="tiny", base_model_hash="tinyhash")
    kwargs = dict(model_hash="tinyhash", cache_dir=tmp_path, batch_sizes=[1], slots=[1, 16], budget_s=5)
    first, _ = load_or_measure_profile(tiny.model, pt, **kwargs)
    (path,) = (tmp_path / "profiles").glob("*.json")
    poisoned = first.model_copy(update={"points": [
        p.model_copy(update={"seconds": p.seconds * (3.0 if p.slots == 1 else 1.0)}) for p in first.points]})
    assert shape_error(poisoned, tiny.model, pt, "tinyhash") == pytest.approx(3.0)
    path.write_text(poisoned.model_dump_json())
    measured.clear()
    again, cached = load_or_measure_profile(tiny.model, pt, **kwargs)
    assert measured == [[1, 16], [1, 16], [1, 16]]  # two probes disagreed, then the profile was measured again
    assert not cached and again == first
    assert shape_error(again, tiny.model, pt, "tinyhash") == pytest.approx(1.0)
    assert LatencyProfile.model_validate_json(path.read_text()) == again  # the cache now holds the new one
    # Without the spot check the poisoned file would have been trusted.
    path.write_text(poisoned.model_dump_json())
    assert load_or_measure_profile(tiny.model, pt, **kwargs, spot_check=False) == (poisoned, True)
    # Nor is a profile of steps too short to time checked.
    monkeypatch.setattr(profiles, "SPOT_CHECK_MIN_SECONDS", 1.0)
    assert shape_error(poisoned, tiny.model, pt, "tinyhash") == 1.0


# Measured on the 2-core VM at batch 1 (SmolLM2-135M, float32, context 256), ms by slots per row.
BUSY_VM_PROFILE = {1: 60.8, 2: 96.1, 4: 109.8, 8: 92.4, 12: 105.3, 16: 102.8, 24: 120.0, 32: 128.0}  # a busy moment
QUIET_VM_PROFILE = {1: 43.2, 2: 70.9, 4: 72.4, 8: 87.2, 12: 80.5, 16: 76.5, 24: 88.9, 32: 113.1}
# The shipped artifact's acceptance table for that model (rounded).
VM_ACCEPTANCE = [[0.298, 0.148, 0.082, 0.052, 0.032, 0.029, 0.021, 0.021, 0.016, 0.014],
                 [0.166, 0.087, 0.069, 0.048, 0.042, 0.031, 0.027, 0.025, 0.026, 0.022],
                 [0.101, 0.07, 0.061, 0.05, 0.038, 0.034, 0.031, 0.025, 0.027, 0.018]]


def ms_profile(curves: dict[int, dict[int, float]]):
    return profile_of([(b, s, ms / 1e3) for b, curve in curves.items() for s, ms in curve.items()])


def test_a_profile_not_monotone_in_slots_is_refused_before_any_timing(tiny, tmp_path, monkeypatch):
    """The busy-moment profile (its 8-slot step 1.19x faster than its 4-slot one) passed the old check, whose
    16-slot probe happened to agree with it; it is refused now from its shape alone, without timing a step."""
    busy = ms_profile({1: BUSY_VM_PROFILE})
    worst = worst_inversion(busy)
    assert worst.factor == pytest.approx(109.8 / 92.4) and (worst.batch, worst.slots, worst.faster_slots) == (1, 4, 8)
    assert worst.factor > profiles.SPOT_CHECK_MONOTONE_TOLERANCE
    # A quiet-moment profile of the same model inverts by less (its 8-slot point is the noisy one), and a
    # batch size whose steps are under the floor is not looked at.
    quiet = ms_profile({1: QUIET_VM_PROFILE, 4: {1: 1.0, 4: 0.5, 16: 0.9}})
    assert 1.0 < worst_inversion(quiet).factor <= profiles.SPOT_CHECK_MONOTONE_TOLERANCE
    assert worst_inversion(ms_profile({1: {1: 40.0, 4: 40.0, 16: 50.0}, 4: {1: 60.0, 16: 90.0}})).factor == 1.0

    pt = PromptTokens.from_token_embeddings(tiny.model, k=3, base_model_id="tiny", base_model_hash="tinyhash")
    kwargs = dict(model_hash="tinyhash", cache_dir=tmp_path, batch_sizes=[1], slots=sorted(BUSY_VM_PROFILE),
                  budget_s=5)
    load_or_measure_profile(tiny.model, pt, **kwargs)
    (path,) = (tmp_path / "profiles").glob("*.json")
    path.write_text(busy.model_dump_json())

    def no_timing(*args, **kwargs):
        raise AssertionError("the shape alone refuses this profile: nothing is timed")
    monkeypatch.setattr(profiles, "shape_errors", no_timing)
    again, cached = load_or_measure_profile(tiny.model, pt, **kwargs)
    assert not cached and again != busy and LatencyProfile.model_validate_json(path.read_text()) == again


def fake_measurements(monkeypatch, full: dict[int, float], device: dict[int, float]) -> list[dict]:
    """measure_profile replaced, at batch 1: a whole measurement gives ``full`` (seconds by slots), a timing
    again (interleaved) gives ``device``'s seconds for the slots it asks. Returns the calls: slots, interleaved."""
    calls: list[dict] = []

    def measure(model, prompt_tokens, *, batch_sizes, slots, interleaved=False, **kwargs):
        assert batch_sizes == [1]
        calls.append({"slots": sorted(slots), "interleaved": interleaved})
        times = device if interleaved else full
        return profile_of([(1, s, times[s]) for s in sorted(slots)]).model_copy(
            update={"measured_at": f"t{len(calls)}"})
    monkeypatch.setattr(profiles, "measure_profile", measure)
    monkeypatch.setattr(profiles, "consistently_off", lambda *args: False)  # only the shape is at stake here
    return calls


def test_a_fresh_profile_inverted_by_a_busy_moment_is_timed_again_where_it_inverts(tiny, tmp_path, monkeypatch):
    """The whole measurement caught a busy moment on its 4-slot point (80 ms, slower than 16 slots' 60): the
    slot counts from 4 to 16 are timed again, interleaved, each point keeps its faster timing, and the mended
    profile is cached and reused, where it used to be refused (and measured whole again) at the next start."""
    calls = fake_measurements(monkeypatch, full={1: 0.05, 4: 0.08, 8: 0.07, 16: 0.06},
                              device={1: 0.05, 4: 0.052, 8: 0.058, 16: 0.062})
    pt = PromptTokens.from_token_embeddings(tiny.model, k=3, base_model_id="tiny", base_model_hash="tinyhash")
    kwargs = dict(model_hash="tinyhash", cache_dir=tmp_path, batch_sizes=[1], slots=[1, 4, 8, 16], budget_s=5)
    profile, cached = load_or_measure_profile(tiny.model, pt, **kwargs)
    assert not cached and calls == [{"slots": [1, 4, 8, 16], "interleaved": False},
                                    {"slots": [4, 8, 16], "interleaved": True}]
    assert {p.slots: p.seconds for p in profile.points} == {1: 0.05, 4: 0.052, 8: 0.058, 16: 0.06}
    assert worst_inversion(profile).factor == 1.0
    assert not list((tmp_path / "profiles").glob("*.inversions-accepted"))
    assert load_or_measure_profile(tiny.model, pt, **kwargs) == (profile, True)
    assert len(calls) == 2


def test_a_fresh_profile_inverted_on_the_device_is_kept_after_its_retimes(tiny, tmp_path, monkeypatch):
    """On a device whose steps hardly depend on their slots (the shipped H100 profile inverts by 2.1x), timing
    again inverts too: after RETIME_ROUNDS tries the profile is kept, and not refused for its shape later."""
    inverted = {1: 0.05, 4: 0.08, 16: 0.06}
    calls = fake_measurements(monkeypatch, full=inverted, device=inverted)
    pt = PromptTokens.from_token_embeddings(tiny.model, k=3, base_model_id="tiny", base_model_hash="tinyhash")
    kwargs = dict(model_hash="tinyhash", cache_dir=tmp_path, batch_sizes=[1], slots=[1, 4, 16], budget_s=5)
    profile, cached = load_or_measure_profile(tiny.model, pt, **kwargs)
    assert not cached and worst_inversion(profile).factor == pytest.approx(0.08 / 0.06)
    assert [c["interleaved"] for c in calls] == [False] + [True] * profiles.RETIME_ROUNDS
    assert load_or_measure_profile(tiny.model, pt, **kwargs) == (profile, True)
    assert load_or_measure_profile(tiny.model, pt, **kwargs) == (profile, True)
    assert len(calls) == 1 + profiles.RETIME_ROUNDS
    # A cached profile inverted beyond the tolerance that was not measured so (an older one) is refused.
    (path,) = (tmp_path / "profiles").glob("*.json")
    path.write_text(profile.model_copy(update={"measured_at": "older"}).model_dump_json())
    again, cached = load_or_measure_profile(tiny.model, pt, **kwargs)
    assert not cached and again.measured_at != "older" and len(calls) == 2 * (1 + profiles.RETIME_ROUNDS)


def test_the_probe_times_more_than_one_tree(tiny, tmp_path, monkeypatch):
    """A profile poisoned at its 4-slot point alone (monotone still) passed the old check, which timed only a
    16-slot tree: the probe now times the slot counts nearest 4 and 16, and the tree the planner would take.
    The device's steps are a fixed table here: timed, a tiny model's ~1 ms steps disagree with themselves by
    up to 2x under load, which made this test flaky."""
    device = {1: 0.010, 2: 0.012, 4: 0.015, 16: 0.060}  # seconds per step at batch 1, by slots

    def measure(model, prompt_tokens, *, batch_sizes, slots, **kwargs):
        return profile_of([(b, s, device[s]) for b in batch_sizes for s in slots])
    monkeypatch.setattr(profiles, "measure_profile", measure)
    pt = PromptTokens.from_token_embeddings(tiny.model, k=3, base_model_id="tiny", base_model_hash="tinyhash")
    kwargs = dict(model_hash="tinyhash", cache_dir=tmp_path, batch_sizes=[1], slots=[1, 2, 4, 16], budget_s=60)
    first, _ = load_or_measure_profile(tiny.model, pt, **kwargs)
    assert probe_slots(first, pt, 1) == [4, 16]  # no acceptance table: no planner's choice
    assert shape_error(first, tiny.model, pt, "tinyhash") == pytest.approx(1.0)
    (path,) = (tmp_path / "profiles").glob("*.json")
    poisoned = first.model_copy(update={"points": [
        p.model_copy(update={"seconds": p.seconds * (3.0 if p.slots == 4 else 1.0)}) for p in first.points]})
    assert worst_inversion(poisoned).factor <= 1.0  # monotone: only the probe can catch it
    assert shape_error(poisoned, tiny.model, pt, "tinyhash") == pytest.approx(3.0)
    path.write_text(poisoned.model_dump_json())
    again, cached = load_or_measure_profile(tiny.model, pt, **kwargs)
    assert not cached and again == first and LatencyProfile.model_validate_json(path.read_text()) == first
    # With an acceptance table the planner's tree is timed too: on the busy profile, the 8-slot tree static
    # planning took from it.
    pt.meta.extra["acceptance"] = VM_ACCEPTANCE
    assert probe_slots(ms_profile({1: BUSY_VM_PROFILE}), pt, 1) == [4, 8, 16]
    assert probe_slots(ms_profile({1: QUIET_VM_PROFILE}), pt, 1) == [4, 16]  # plain decoding: nothing to add


def test_engine_builds_its_tree_from_the_profile(tiny, tmp_path, monkeypatch):
    # The second engine must reuse the first one's profile: its spot check (tested on its own) is passed, so
    # that a busy machine cannot make the profile look stale.
    monkeypatch.setattr(profiles, "consistently_off", lambda *args, **kwargs: False)
    monkeypatch.setattr(profiles, "worst_inversion", lambda profile: profiles.Inversion(1.0))
    path = save_trained_artifact(tiny, tmp_path / "pt")
    config = DecodingConfig(prompts=str(path), profile_budget_s=5, tree_sizing="static")
    engine = DecodeEngine(tiny, config, batch_size=2, cache_dir=str(tmp_path / "cache"))
    info = engine.describe()
    assert info["tree"] == "hardware-aware" and info["batch_size"] == 2
    assert info["tree_slots"] <= info["tree_budget"] and info["predicted_tau"] >= 1.0
    assert info["profile"].startswith("measured") and info["device"].startswith("cpu: ")
    again = DecodeEngine(tiny, config, batch_size=2, cache_dir=str(tmp_path / "cache"))
    assert again.describe()["profile"] == "cached" and again.tree_hash == engine.tree_hash
    out = engine.run_rows([{"id": "a", "prompt": "x"}, {"id": "b"}])
    assert [(o.device, o.tree_hash) for o in out] == [(info["device"], engine.tree_hash)] * 2
    # The chosen tree decodes losslessly.
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    plain = VanillaDecoder(tiny.model, eos_token_ids=tiny.eos_token_ids).generate(prompts, 20)
    assert [r.token_ids for r in engine.decoder.generate(prompts, 20)] == [r.token_ids for r in plain]


def _profile_file(path, seconds: dict[tuple[int, int], float], model_hash: str = "tinyhash", k: int = 3):
    points = [LatencyPoint(batch=b, slots=s, seconds=t, repeats=1) for (b, s), t in seconds.items()]
    profile = LatencyProfile(device=identify(torch.device("cpu"), torch.float32), model_hash=model_hash, k=k,
                             ensemble=1, context_len=256, points=points, profile_seconds=0.0, measured_at="now")
    path.write_text(profile.model_dump_json())
    return str(path)


def test_auto_batch_size_is_the_smallest_near_the_best_throughput(tiny, tmp_path):
    from decoding import default_tree_set
    from workers.planning import plan_decoding

    pt = PromptTokens.from_token_embeddings(tiny.model, k=3, base_model_id="tiny", base_model_hash="tinyhash")
    slots = tree_set_slots(default_tree_set(k=3), 1)  # no acceptance table: the default tree
    # Rows per second: batch 1 -> 100, batch 4 -> 333, batch 16 -> 356. Batch 4 is within 10% of the best.
    path = _profile_file(tmp_path / "p.json", {(1, 1): 0.005, (1, slots): 0.01, (4, slots): 0.012,
                                               (16, slots): 0.045})
    def plan(**kw):
        return plan_decoding(tiny.model, pt, tree_nodes=None, model_hash="tinyhash", cache_dir=None,
                             profile_budget_s=None, latency_profile=path, **kw)

    auto = plan(batch_size=None, max_batch_size=64)
    assert auto.batch_size == 4 and auto.info["batch_size_choice"] == {"1": 100.0, "4": 333.33, "16": 355.56}
    assert plan(batch_size=None, max_batch_size=2).batch_size == 1  # the shard size caps the batch
    assert plan(batch_size=16, max_batch_size=64).batch_size == 16  # a fixed batch size is kept
    with pytest.raises(ValueError, match="measured for model"):
        plan_decoding(tiny.model, pt, tree_nodes=None, batch_size=None, max_batch_size=64, model_hash="other",
                      cache_dir=None, profile_budget_s=None, latency_profile=path)


def test_auto_batch_size_is_measured_on_the_device(tiny, tmp_path):
    engine = DecodeEngine(tiny, DecodingConfig(method="vanilla", profile_budget_s=3), batch_size="auto",
                          max_batch_size=4, cache_dir=str(tmp_path / "cache"))
    info = engine.describe()
    assert engine.batch_size in (1, 4) and set(info["batch_size_choice"]) == {"1", "4"}
    assert info["profile"].startswith("measured")
    rows = [{"id": str(i), "prompt": "x" * (i + 1)} for i in range(6)]
    assert [o.id for o in engine.run_rows(rows)] == [str(i) for i in range(6)]


def test_engine_with_propd_sizing_decodes_losslessly(tiny, tmp_path):
    path = save_trained_artifact(tiny, tmp_path / "pt")
    latency = _profile_file(tmp_path / "p.json", {(2, s): 0.01 + 0.0001 * s for s in (1, 8, 32, 128)})
    engine = DecodeEngine(tiny, DecodingConfig(prompts=str(path), tree_sizing="propd"), batch_size=2,
                          latency_profile=latency)
    assert engine.describe()["tree"].startswith("propd") and engine.tree_hash.startswith("propd-")
    rows = [{"id": "a", "prompt": "x y z"}, {"id": "b", "prompt": "hello"}, {"id": "c", "prompt": "1 2"}]
    vanilla = DecodeEngine(tiny, DecodingConfig(method="vanilla"), batch_size=2)
    assert [o.output_token_ids for o in engine.run_rows(rows)] == [o.output_token_ids for o in vanilla.run_rows(rows)]
    with pytest.raises(ValueError, match="pick one"):
        DecodeEngine(tiny, DecodingConfig(prompts=str(path), tree_sizing="propd", tree_nodes=5), batch_size=2,
                     latency_profile=latency)


def test_tree_sizing_auto_is_propd_wherever_it_can_run(tiny, tmp_path):
    """The default: ProPD with a trained artifact; a static tree when tree_nodes fixes one, and the built-in
    tree for untrained prompt tokens (no acceptance table to size from), also when propd is asked for."""
    path = save_trained_artifact(tiny, tmp_path / "pt")
    latency = _profile_file(tmp_path / "p.json", {(2, s): 0.01 + 0.0001 * s for s in (1, 8, 32, 128)})

    def engine(**config):
        return DecodeEngine(tiny, DecodingConfig(**config), batch_size=2, latency_profile=latency)

    assert DecodingConfig().tree_sizing == "auto"
    default = engine(prompts=str(path))
    assert type(default.decoder) is ProPDDecoder and default.describe()["tree"].startswith("propd")
    static = engine(prompts=str(path), tree_sizing="static").decoder
    assert type(static) is PPDDecoder and default.decoder.start == static.tree_set.tree_hash  # starts from it
    fixed = engine(prompts=str(path), tree_nodes=5)
    assert type(fixed.decoder) is PPDDecoder and fixed.describe()["tree"] == "fixed, 5 nodes"
    for sizing in ("auto", "propd"):
        untrained = engine(prompts="untrained", tree_sizing=sizing)
        assert type(untrained.decoder) is PPDDecoder and untrained.describe()["tree"].startswith("default")


def test_engine_with_a_prune_head_decodes_losslessly(tiny, tmp_path):
    """A prune head from an artifact, with static and ProPD trees: the rows equal plain decoding's, the worker
    describes its pruning, and a head for another model or with vanilla decoding is refused."""
    from decoding.pruning import PruneHead
    from workers.artifacts import ArtifactModelMismatch
    from workers.prune_heads import save_prune_head

    path = save_trained_artifact(tiny, tmp_path / "pt")
    head = PruneHead(tiny.model.config.hidden_size, layer=1, rank=4, keep_top_k=3)
    head_dir = tmp_path / "head"
    save_prune_head(head, head_dir, base_model_id=tiny.model_id, base_model_hash=tiny.content_hash)
    latency = _profile_file(tmp_path / "p.json", {(2, s): 0.001 * s for s in (1, 8, 32, 128)})
    rows = [{"id": "a", "prompt": "x y z"}, {"id": "b", "prompt": "hello"}, {"id": "c", "prompt": "1 2"}]
    vanilla = DecodeEngine(tiny, DecodingConfig(method="vanilla"), batch_size=2).run_rows(rows)
    for sizing in ("static", "propd"):
        engine = DecodeEngine(tiny, DecodingConfig(prompts=str(path), tree_sizing=sizing, prune_head=str(head_dir),
                                                   keep_top_k=2), batch_size=2, latency_profile=latency)
        info = engine.describe()
        assert (info["prune_layer"], info["keep_top_k"]) == (1, 2) and engine.decoder.prune_head is not None
        assert [o.output_token_ids for o in engine.run_rows(rows)] == [o.output_token_ids for o in vanilla]
    save_prune_head(head, tmp_path / "other", base_model_id="x", base_model_hash="0" * 64)
    with pytest.raises(ArtifactModelMismatch):
        DecodeEngine(tiny, DecodingConfig(prompts=str(path), prune_head=str(tmp_path / "other")), batch_size=2,
                     latency_profile=latency)
    with pytest.raises(ValueError, match="needs decoding method 'ppd'"):
        DecodeEngine(tiny, DecodingConfig(method="vanilla", prune_head=str(head_dir)), batch_size=2)
    assert DecodeEngine(tiny, DecodingConfig(prompts=str(path), prune_head="auto"), batch_size=2,
                        latency_profile=latency).decoder.prune_head is None  # nothing shipped for a tiny model
