"""compile=auto's rule on fake times (workers/compile_choice.py), and the record that makes a second job's
estimate the last compile's."""

from __future__ import annotations

import pytest

from workers.compile_choice import (
    FIRST_COMPILE_S_GUESS,
    SPEEDUP_GUESS,
    CompileEstimate,
    choose_compile,
    estimate_compile,
    record_compile,
    record_key,
    record_path,
    record_step_rate,
)
from workers.configs import DecodingConfig

GUESS = CompileEstimate(compile_s=100.0, speedup=1.25, source="a test")


def auto(expected_tokens, eager_tokens_per_s, estimate=GUESS, **kwargs):
    args = {"device_type": "cpu", "captured": False, "pruning": False, **kwargs}
    return choose_compile("auto", expected_tokens=expected_tokens, eager_tokens_per_s=lambda: eager_tokens_per_s,
                          estimate=estimate, **args)


def test_auto_compiles_when_the_saving_passes_the_compile_time():
    # 1.25x saves a fifth of the eager time: 500 s of decoding saves 100 s, the compile's cost.
    assert not auto(50_000, 100.0).compile  # 500 s: saves exactly 100 s, no gain
    assert auto(50_100, 100.0).compile  # 501 s: saves 100.2 s
    assert not auto(40_000, 100.0).compile
    choice = auto(100_000, 100.0)
    assert choice.compile and "~1000 s of eager decoding" in choice.reason and "~200 s" in choice.reason
    # A cheaper compile (a warm inductor cache) pays sooner.
    assert auto(20_000, 100.0, CompileEstimate(30.0, 1.25, "warm")).compile


def test_auto_stays_eager_without_a_job_size_or_a_speed():
    assert not auto(None, 100.0).compile
    assert not auto(10**9, None).compile
    assert "no job size" in auto(0, 100.0).reason


def test_on_and_off_are_obeyed_and_cuda_graphs_and_pruning_come_first():
    def never_timed() -> float:
        raise AssertionError("the eager speed is timed only where auto weighs the compile")

    common = {"expected_tokens": 10**9, "eager_tokens_per_s": never_timed, "estimate": GUESS}
    assert choose_compile("on", device_type="cpu", captured=False, pruning=False, **common).compile
    assert not choose_compile("off", device_type="cpu", captured=False, pruning=False, **common).compile
    captured = choose_compile("on", device_type="cuda", captured=True, pruning=False, **common)
    assert not captured.compile and "CUDA graphs" in captured.reason
    assert not choose_compile("on", device_type="cpu", captured=False, pruning=True, **common).compile
    # auto compiles only on a CPU: a GPU without graphs stays eager; `on` compiles there.
    assert not choose_compile("auto", device_type="cuda", captured=False, pruning=False, **common).compile
    assert choose_compile("on", device_type="cuda", captured=False, pruning=False, **common).compile


def test_the_estimate_is_the_last_compile_recorded_here(tmp_path):
    key = record_key("cpu-x", "model", "numerics", "vanilla", 8, 1)
    assert key != record_key("cpu-x", "model", "numerics", "vanilla", 16, 1)
    first = estimate_compile(tmp_path, key)
    assert (first.compile_s, first.speedup) == (FIRST_COMPILE_S_GUESS, SPEEDUP_GUESS)
    assert estimate_compile(tmp_path, key, tree_sets=14).compile_s == 14 * FIRST_COMPILE_S_GUESS  # ProPD's family
    record_compile(tmp_path, key, 117.0)
    record_compile(tmp_path, key, 31.0)  # the second job, from a warm inductor cache
    assert estimate_compile(tmp_path, key).compile_s == 31.0
    assert '"first_compile_s": 117.0' in record_path(tmp_path, key).read_text()
    record_path(tmp_path, key).write_text("{not json")
    assert estimate_compile(tmp_path, key).compile_s == FIRST_COMPILE_S_GUESS
    assert estimate_compile(None, key).compile_s == FIRST_COMPILE_S_GUESS


def test_the_speedup_is_what_jobs_here_measured_and_one_that_gains_nothing_stays_eager(tmp_path):
    key = record_key("cpu-x", "model", "numerics", "vanilla", 8, 1)
    record_compile(tmp_path, key, 224.0)
    record_step_rate(tmp_path, key, "compile", 60.0)
    alone = estimate_compile(tmp_path, key)
    assert alone.speedup == SPEEDUP_GUESS and alone.eager_tokens_per_s is None  # one rate alone says nothing
    record_step_rate(tmp_path, key, "eager", 48.0)
    estimate = estimate_compile(tmp_path, key)
    assert (estimate.compile_s, estimate.speedup) == (224.0, 1.25)
    assert "60.0 tok/s compiled, 48.0 eager" in estimate.source
    record_compile(tmp_path, key, 30.0)  # the compile record and the rates keep each other
    assert estimate_compile(tmp_path, key).speedup == 1.25 and estimate_compile(tmp_path, key).compile_s == 30.0
    assert auto(10**7, 100.0, estimate_compile(tmp_path, key)).compile
    # the decode time is weighed at the eager rate jobs here measured, not the profile's (given here as 100.0)
    assert "(960000 tokens at 48.0 tok/s)" in auto(960_000, 100.0, estimate_compile(tmp_path, key)).reason

    record_step_rate(tmp_path, key, "compile", 45.0)  # a later compiled job measured slower steps
    slower = estimate_compile(tmp_path, key)
    assert slower.speedup == pytest.approx(45.0 / 48.0)

    def never_timed() -> float:
        raise AssertionError("no profile is timed where compiling cannot pay")

    choice = choose_compile("auto", device_type="cpu", captured=False, pruning=False, expected_tokens=10**9,
                            eager_tokens_per_s=never_timed, estimate=slower)
    assert not choice.compile and "gain nothing here (0.94x" in choice.reason


@pytest.mark.parametrize(("given", "mode"), [(True, "on"), (False, "off"), ("auto", "auto"), ("on", "on")])
def test_the_config_key_takes_a_mode_or_a_switch(given, mode):
    assert DecodingConfig(compile=given).compile == mode
    with pytest.raises(ValueError):
        DecodingConfig(compile="sometimes")
