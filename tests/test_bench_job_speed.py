"""jobs/bench/job_speed.py's rounds, with fake runs: which runs a round makes, in which order, and how each round's
pairs become the reported ratios."""

import argparse
from pathlib import Path

from jobs.bench import job_speed


def fake_rounds(monkeypatch, rounds: int, rates: dict[str, list[float]], no_load: bool = False) -> tuple[list, dict]:
    """speed_rounds over fake runs: each run's tokens/s is the next of ``rates[run key]``; the order they ran in."""
    ran: list[str] = []
    served = {key: iter(values) for key, values in rates.items()}

    def run(key: str) -> dict:
        ran.append(key)
        return {"tokens_per_s": next(served[key]), "in_steps": 1.0, "step_ms": 100.0, "thread_ran": 1.0,
                "plan": {"tree_slots": 1}}

    class Load:  # the busy loop, as a marker in the order
        def __enter__(self):
            ran.append("load on")

        def __exit__(self, *exc):
            ran.append("load off")

    name = {"vanilla": "plain", "ppd": "propd"}
    monkeypatch.setattr(job_speed, "measure_in_process", lambda rows, batch, method, tokens: run(
        f"{name[method]} in-process"))
    monkeypatch.setattr(job_speed, "run_job", lambda rows, out, batch, method, tokens: run(
        f"{name[method]} job" + (", loaded" if "-load-" in out.name else "")))
    monkeypatch.setattr(job_speed, "Load", Load)
    args = argparse.Namespace(rounds=rounds, methods=["plain", "propd"], max_new_tokens=8, no_load=no_load)
    return ran, job_speed.speed_rounds(Path("rows.jsonl"), Path("work"), 8, args)


def test_every_other_round_runs_backwards_and_pairs_stay_within_their_round(monkeypatch):
    keys = ["plain in-process", "plain job", "plain job, loaded", "propd in-process", "propd job", "propd job, loaded"]
    # Per round, the value's tenths say which run it is: a pair's ratio mixes rounds only if the pairing does.
    rates = {key: [10.0 + i, 20.0 + i, 30.0 + i] for i, key in enumerate(keys)}
    ran, result = fake_rounds(monkeypatch, 3, rates)
    forward = ["plain in-process", "plain job", "load on", "plain job, loaded", "load off",
               "propd in-process", "propd job", "load on", "propd job, loaded", "load off"]
    backward = ["load on", "propd job, loaded", "load off", "propd job", "propd in-process",
                "load on", "plain job, loaded", "load off", "plain job", "plain in-process"]
    assert ran == forward + backward + forward
    # Each round's own pair, then the median over rounds: plain job / in-process is (20+1)/(20+0) in round 2.
    assert result["job_vs_in_process"]["plain"] == round(21 / 20, 3)
    assert result["loaded_vs_quiet"]["propd"] == round(25 / 24, 3)
    assert result["propd_vs_plain"]["quiet"] == round(24 / 21, 3)
    assert result["propd_vs_plain"]["loaded"] == round(25 / 22, 3)
    assert result["tokens_per_s"]["propd job"] == 24.0
    assert result["propd_plans"] == {'{"tree_slots": 1}': 6}


def test_no_load_leaves_out_the_loaded_jobs(monkeypatch):
    rates = {key: [10.0, 10.0] for key in ("plain in-process", "plain job", "propd in-process", "propd job")}
    ran, result = fake_rounds(monkeypatch, 2, rates, no_load=True)
    assert ran == ["plain in-process", "plain job", "propd in-process", "propd job",
                   "propd job", "propd in-process", "plain job", "plain in-process"]
    assert result["loaded_vs_quiet"] == {"plain": None, "propd": None}
    assert result["propd_vs_plain"]["loaded"] is None


def test_the_host_pulse_times_its_bursts_in_a_process_of_its_own():
    pulse = job_speed.host_pulse(bursts=3, matmuls=20)
    assert len(pulse["burst_ms"]) == 3 and all(ms > 0 for ms in pulse["burst_ms"])
    assert pulse["spread"] == round(max(pulse["burst_ms"]) / min(pulse["burst_ms"]), 3) >= 1.0
