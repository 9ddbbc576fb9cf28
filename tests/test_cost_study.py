"""The cost study: its arithmetic on known inputs, the readers of each source, and a report generated from
fixture job summaries, a benchmark file and a latency profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.cost import study as cost_study
from jobs.cost.model import (
    DeviceRate,
    Measurement,
    Price,
    PriceTable,
    Target,
    cheapest_mix,
    cpu_threads,
    device_hours_per_billion_tokens,
    device_rates,
    project,
    resolve_counts,
    usd_per_million_tokens,
)
from jobs.cost.sources import SourceError, read_any, read_bench, read_job, read_profile
from jobs.output import write_part, write_summary

H100 = "NVIDIA H100 80GB HBM3"
CPU = "cpu: AMD EPYC 7B13 (8 threads)"


def price(match, usd, unit="gpu"):
    return Price(match=match, usd_per_hour=usd, unit=unit, offer="test", source="test", as_of="2026-01-01")


PRICES = PriceTable(prices=[price("H100", 3.6), price("^cpu:", 0.05, "cpu_thread"), price("B200", 9.0)])


def rate(device, tokens_per_s, usd):
    return DeviceRate(device=device, method="ppd", tokens_per_s=tokens_per_s, usd_per_hour=usd, batch_size=8,
                      source="test")


# ------------------------------------------------------------------------------------------- arithmetic
def test_unit_costs_on_known_inputs():
    # $3.60 an hour at 1000 tokens/s: 3.6M tokens an hour, so $1 per 1M tokens.
    assert usd_per_million_tokens(1000.0, 3.6) == pytest.approx(1.0)
    assert usd_per_million_tokens(250.0, 3.6) == pytest.approx(4.0)
    # 1B tokens at 1000 tokens/s: 1e6 s = 277.8 device-hours.
    assert device_hours_per_billion_tokens(1000.0) == pytest.approx(1e6 / 3600)


def test_price_lookup_per_gpu_and_per_cpu_thread():
    assert PRICES.lookup(H100)[1] == 3.6
    assert PRICES.lookup(CPU)[1] == pytest.approx(8 * 0.05)  # per vCPU, times the worker's threads
    assert cpu_threads(CPU) == 8 and cpu_threads("cpu: something") == 1
    assert PRICES.lookup("NVIDIA A10G") is None
    first_wins = PriceTable(prices=[price("H100 PCIe", 2.0), price("H100", 3.0)])
    assert first_wins.lookup("NVIDIA H100 PCIe")[1] == 2.0 and first_wins.lookup(H100)[1] == 3.0


def test_the_shipped_price_table_loads_with_sources_and_dates():
    table = PriceTable.load()
    assert table.lookup(H100) is not None and table.lookup("cpu: AMD EPYC (2 threads)") is not None
    assert all(p.source.startswith("https://") and len(p.as_of) == 10 for p in table.prices)


def test_projection_of_a_mix():
    target = Target(rows=1000, mean_prompt_tokens=50, mean_output_tokens=360)  # 360k output tokens
    rates = {H100: rate(H100, 100.0, 3.6), CPU: rate(CPU, 20.0, 0.4)}
    one = project(target, rates, {H100: 1})
    assert one.wall_hours == pytest.approx(1.0) and one.usd == pytest.approx(3.6)
    assert one.usd_per_million_tokens == pytest.approx(10.0)
    both = project(target, rates, {H100: 2, CPU: 5})  # 200 + 100 tokens/s
    assert both.tokens_per_s == pytest.approx(300.0) and both.wall_hours == pytest.approx(1 / 3)
    assert both.usd == pytest.approx((2 * 3.6 + 5 * 0.4) / 3)
    unpriced = {**rates, "X": rate("X", 10.0, None)}
    assert project(target, unpriced, {"X": 1}).usd is None
    with pytest.raises(ValueError, match="no measurement"):
        project(target, rates, {"NVIDIA A10G": 1})


def test_cheapest_mix_prefers_the_lowest_dollars_per_token():
    target = Target(rows=1000, mean_prompt_tokens=50, mean_output_tokens=360)  # 360k tokens
    cheap, dear = rate("cheap", 10.0, 0.18), rate("dear", 100.0, 3.6)  # $5 and $10 per 1M tokens
    rates = {"cheap": cheap, "dear": dear}
    # No limits: the cheap kind alone, as many as the deadline needs (10 h -> 10 tokens/s -> 1 device).
    best = cheapest_mix(target, rates, deadline_hours=10.0)
    assert best.counts == {"cheap": 1} and best.usd == pytest.approx(1.8)
    best = cheapest_mix(target, rates, deadline_hours=1.0)  # 100 tokens/s: 10 cheap devices, same cost
    assert best.counts == {"cheap": 10} and best.usd == pytest.approx(1.8) and best.wall_hours <= 1.0
    # Only 4 cheap devices: the rest on the dear kind, as few as needed.
    best = cheapest_mix(target, rates, deadline_hours=1.0, available={"cheap": 4})
    assert best.counts == {"cheap": 4, "dear": 1} and best.wall_hours <= 1.0
    # Nothing can meet it.
    assert cheapest_mix(target, rates, deadline_hours=0.01, available={"cheap": 1, "dear": 1}) is None


def test_cheapest_mix_avoids_a_fast_device_that_would_take_most_of_the_work():
    """Greedy by $/token would add one 'fast' device (a little cheaper per token than 'slow'), which then does
    90% of the work; two 'slow' ones meet the deadline with a small share. The search finds that."""
    target = Target(rows=1, mean_prompt_tokens=1, mean_output_tokens=36_000)  # 36k tokens
    rates = {"cheap": rate("cheap", 10.0, 0.036),  # $1 per 1M
             "fast": rate("fast", 100.0, 3.6),  # $10 per 1M
             "slow": rate("slow", 1.0, 0.0396)}  # $11 per 1M
    best = cheapest_mix(target, rates, deadline_hours=36_000 / 12 / 3600, available={"cheap": 1})  # 12 tokens/s
    assert best.counts == {"cheap": 1, "slow": 2}
    fast = project(target, rates, {"cheap": 1, "fast": 1})
    assert best.usd < fast.usd and best.wall_hours <= 36_000 / 12 / 3600 + 1e-12


def test_mix_patterns_name_one_measured_device():
    devices = [H100, CPU, "NVIDIA H100 PCIe"]
    assert resolve_counts({"HBM3": 2, "EPYC": 1}, devices) == {H100: 2, CPU: 1}
    with pytest.raises(ValueError, match="matches 2"):
        resolve_counts({"H100": 1}, devices)
    with pytest.raises(ValueError, match="matches 0"):
        resolve_counts({"A10G": 1}, devices)


# ------------------------------------------------------------------------------------------- sources
def make_job(out_dir, device, *, method="ppd", tree="hardware-aware", tokens=1200, seconds=10.0, decode_s=12.0,
             model_hash="m" * 64, n_rows=4, prompt_tokens=40):
    out_dir.mkdir(parents=True)
    write_part(out_dir, 0, [{"id": f"r{i}", "sample_index": 0, "output_text": "x", "output_token_ids": [1],
                             "num_output_tokens": tokens // n_rows, "num_steps": tokens // n_rows // 2, "tau": 2.0,
                             "prompt_tokens": prompt_tokens, "error": None, "device": device, "dtype": "float32"}
                            for i in range(n_rows)])
    worker = {"device": device, "dtype": "float32", "decoding": method, "tree": tree, "batch_size": 8,
              "model_hash": model_hash}
    write_summary(out_dir, {
        "decode_seconds": decode_s, "workers": [worker],
        "config": {"decoding": {"method": method, "tree_sizing": "static"}},
        "by_device": {device: {"workers": 1, "rows": n_rows, "rows_failed": 0, "output_tokens": tokens,
                               "mean_tau": 2.0, "device_seconds": seconds, "tokens_per_device_s": tokens / seconds}}})
    return out_dir


def make_bench(path, device="NVIDIA H100 80GB HBM3", model_hash="m" * 64):
    results = [{"batch": b, "static_slots": 64,
                "plain": {"tok_s": 40.0 * b, "tau": 1.0}, "static": {"tok_s": 60.0 * b, "tau": 1.8},
                "propd": {"tok_s": 62.0 * b, "tau": 1.9}} for b in (1, 4, 16)]
    path.write_text(json.dumps({"device": f"{device} float32", "device_name": device, "dtype": "float32",
                                "model_hash": model_hash, "measured_at": "2026-11-22T23:00:00+00:00",
                                "results": results}))
    return path


def make_profile(path, model_hash="m" * 64):
    device = {"kind": "cuda", "name": H100, "memory_gib": 79.2, "compute_capability": "9.0", "threads": None,
              "torch_version": "2.11", "dtype": "float32"}
    points = [{"batch": b, "slots": s, "seconds": 0.01 * (1 + s / 100), "repeats": 7} for b in (1, 8) for s in (1, 16)]
    path.write_text(json.dumps({"device": device, "model_hash": model_hash, "k": 3, "ensemble": 1, "context_len": 256,
                                "points": points, "profile_seconds": 1.0, "measured_at": "2026-11-22T23:21:52+00:00"}))
    return path


def test_readers(tmp_path):
    (job,) = read_job(make_job(tmp_path / "job", CPU, tokens=1200, seconds=10.0, decode_s=12.0))
    assert (job.device, job.method, job.batch_size, job.source) == (CPU, "ppd", 8, "job")
    assert job.tokens_per_s == pytest.approx(120.0) and job.utilisation == pytest.approx(10 / 12)
    assert job.mean_prompt_tokens == 40 and job.mean_output_tokens == 300 and job.mean_tau == 2.0
    (propd,) = read_job(make_job(tmp_path / "propd", CPU, tree="propd (sized every step)"))
    (vanilla,) = read_job(make_job(tmp_path / "vanilla", CPU, method="vanilla", tree=None))
    assert (propd.method, vanilla.method) == ("ppd+propd", "vanilla")

    bench = read_bench(make_bench(tmp_path / "bench.json"))
    assert {(m.method, m.batch_size) for m in bench} == {(m, b) for m in ("vanilla", "ppd", "ppd+propd")
                                                           for b in (1, 4, 16)}
    assert all(m.device == H100 and m.dtype == "float32" and m.source == "benchmark" for m in bench)

    profile = read_profile(make_profile(tmp_path / "latency.json"))
    assert [(m.batch_size, m.method) for m in profile] == [(1, "vanilla"), (8, "vanilla")]
    assert profile[1].tokens_per_s == pytest.approx(8 / 0.0101)  # batch / the 1-slot step
    assert [m.source for m in read_any(tmp_path / "latency.json")] == ["profile"] * 2

    with pytest.raises(SourceError, match="no summary.json"):
        read_job(tmp_path)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(SourceError, match="not a jobs.bench.propd"):
        read_any(tmp_path / "junk.json")


def test_profiles_never_price_or_project():
    """A profile's step-only figure is plotted and listed, but costs and projections use whole runs only."""
    m = Measurement(device=H100, dtype="float32", method="vanilla", batch_size=8, tokens_per_s=999.0,
                    source="profile", origin="p")
    assert device_rates([m], PRICES) == {}


# ------------------------------------------------------------------------------------------- the report
def test_report_from_fixture_summaries(tmp_path):
    runs = [make_job(tmp_path / "cpu-run", CPU, tokens=1200, seconds=10.0),  # 120 tokens/s
            make_job(tmp_path / "h100-run", H100, tree="propd (sized every step)", tokens=9000, seconds=3.0)]
    bench, profile = make_bench(tmp_path / "bench.json"), make_profile(tmp_path / "latency.json")
    prices = tmp_path / "prices.yaml"
    prices.write_text(json.dumps(PRICES.model_dump()))  # YAML is a superset of JSON
    out = tmp_path / "report"
    assert cost_study.main(["--runs", *map(str, runs), "--measurements", str(bench), str(profile), "--no-shipped",
                            "--prices", str(prices), "--output", str(out), "--rows", "100000",
                            "--mean-prompt-tokens", "45", "--mean-output-tokens", "360", "--deadline-hours", "2",
                            "--mix", "H100=2", "EPYC=4"]) == 0
    text = (out / "report.md").read_text()
    measured, projected = text.split("## Projected (not measured)")
    projected, prices_section = projected.split("## Prices")
    # Measured: the job's H100 ProPD rate 3000 tokens/s at $3.60/h -> $0.333 per 1M tokens; the CPU job's 120
    # tokens/s at 8 x $0.05/h -> $0.926 per 1M; the benchmark's best H100 ppd (batch 16, 960 tokens/s).
    assert f"| {H100} | float32 | ppd+propd | 8 | 3000.0 | 2.00 |" in measured
    assert "| 0.333 |" in measured and "| 0.926 |" in measured and "| 960.0 |" in measured
    assert f"| {H100} | float32 | vanilla | 8 | {8 / 0.0101:.1f} | 1.00 | profile |" in measured
    # Projected: 36M tokens on 2 x H100 (3000 tokens/s each) + 4 CPU workers (120 each) = 6480 tokens/s.
    assert f"{36e6 / 6480 / 3600:,.2f} h" in projected
    # The cheapest mix within 2 h needs 5000 tokens/s: H100 at $0.333 per 1M is cheapest -> 2 of them.
    assert f"2 x {H100}: {36e6 / 6000 / 3600:,.2f} h, **${36e6 / 6000 / 3600 * 7.2:,.2f}**" in projected
    # A priced device that was never measured has no figure anywhere.
    assert "B200" not in measured + projected and "not measured" in prices_section
    for png in ("throughput_vs_batch.png", "usd_per_million_tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measurements_of_different_models_are_refused(tmp_path):
    run = make_job(tmp_path / "run", CPU, model_hash="a" * 64)
    bench = make_bench(tmp_path / "bench.json", model_hash="b" * 64)
    with pytest.raises(SystemExit, match="different models"):
        cost_study.main(["--runs", str(run), "--measurements", str(bench), "--no-shipped",
                         "--output", str(tmp_path / "r")])


def test_bad_inputs_get_clear_errors(tmp_path):
    run = make_job(tmp_path / "run", CPU)
    with pytest.raises(SystemExit, match="cannot read"):
        cost_study.main(["--runs", str(tmp_path / "missing"), "--no-shipped", "--output", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="DEVICE=COUNT"):
        cost_study.main(["--runs", str(run), "--no-shipped", "--output", str(tmp_path / "r"), "--rows", "10",
                         "--mean-prompt-tokens", "1", "--mean-output-tokens", "1", "--mix", "H100"])
    with pytest.raises(SystemExit, match="matches 0"):
        cost_study.main(["--runs", str(run), "--no-shipped", "--output", str(tmp_path / "r"), "--rows", "10",
                         "--mean-prompt-tokens", "1", "--mean-output-tokens", "1", "--mix", "H100=1"])


def test_sweep_benchmarks_this_machine_and_reports_it(tmp_path, monkeypatch):
    """--sweep runs bench_propd with the sweep's settings into the report directory and reads what it wrote
    (the benchmark itself is replaced here: it needs the default model)."""
    calls = []

    def fake_bench(argv):
        calls.append(argv)
        make_bench(Path(argv[argv.index("--json") + 1]), device="cpu: Test CPU (2 threads)")

    monkeypatch.setattr(cost_study, "run_benchmark", fake_bench)
    out = tmp_path / "report"
    assert cost_study.main(["--sweep", "--sweep-device", "cpu", "--sweep-batch-sizes", "1", "4", "--no-shipped",
                            "--output", str(out)]) == 0
    (argv,) = calls
    assert argv[argv.index("--device") + 1] == "cpu" and argv[argv.index("--batch-sizes") + 1:] == ["1", "4"]
    text = (out / "report.md").read_text()
    assert str(out / "sweep.json") in text and "| cpu: Test CPU (2 threads) | float32 | ppd+propd | 16 |" in text
