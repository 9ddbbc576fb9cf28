#!/usr/bin/env python3
"""Cluster cost study: tokens/s, tau, utilisation and dollars per device type and method, from real
measurements, plus a projection of a target dataset onto a cluster mix.

    python -m jobs.cost.study --runs outputs/demo --output outputs/cost
    python -m jobs.cost.study --runs out/h100 out/a10 --rows 1000000 --mean-prompt-tokens 200 \\
        --mean-output-tokens 300 --deadline-hours 24 --mix H100=4 A10G=8 --output outputs/cost
    python -m jobs.cost.study --sweep --output outputs/cost     # also benchmark this machine now

Sources: job output directories (`--runs`: their summary.json and rows), `jobs/bench/propd.py --json` files
and workers' latency profiles (`--measurements`), the measurements shipped in `artifacts/measurements/`
(unless `--no-shipped`), and with `--sweep` a benchmark run on this machine now. Prices come from
`jobs/cost/prices.yaml` (each with its source and date) or `--prices`. Writes REPORT_DIR/report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.cost.model import (
    DEFAULT_PRICES,
    Measurement,
    PriceTable,
    Target,
    cheapest_mix,
    device_rates,
    project,
    resolve_counts,
)
from jobs.cost.report import write_report
from jobs.cost.sources import SourceError, read_any

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MEASUREMENTS = REPO_ROOT / "artifacts" / "measurements"


class SweepConfig(BaseModel):
    """A benchmark sweep run now on this machine (jobs/bench/propd.py), added to the measurements."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(default="auto", description="'auto' (cuda if present), 'cpu', 'cuda', ...")
    dtype: str = Field(default="float32", description="float32 keeps outputs identical to plain decoding.")
    batch_sizes: list[int] = Field(default=[1, 4, 16], description="Batch sizes to time.")
    rounds: int = Field(default=2, ge=1, description="Timed rounds per batch size (the median counts).")
    max_new_tokens: int = Field(default=48, ge=1)


class CostStudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs: list[str] = Field(default_factory=list, description="Job output directories (summary.json + parts).")
    measurements: list[str] = Field(default_factory=list, description="jobs.bench.propd --json files and latency "
                                    "profile JSONs.")
    shipped: bool = Field(default=True, description="Also read artifacts/measurements/ (real runs on the "
                          "devices named there, for the default model).")
    output: str = Field(description="Report directory.")
    prices: str = Field(default=str(DEFAULT_PRICES), description="Price table YAML.")
    target: Target | None = Field(default=None, description="Dataset and cluster to project (optional).")
    sweep: SweepConfig | None = Field(default=None, description="Benchmark this machine now (optional).")


def _counts(values: list[str] | None, flag: str) -> dict[str, int]:
    out = {}
    for item in values or []:
        name, sep, count = item.rpartition("=")
        if not sep or not name or not count.isdigit():
            raise SystemExit(f"{flag} takes DEVICE=COUNT items, got {item!r}")
        out[name] = int(count)
    return out


def parse_config(argv: list[str] | None) -> CostStudyConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.cost.study",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML with the keys of CostStudyConfig; flags override it")
    p.add_argument("--runs", nargs="+", help="job output directories")
    p.add_argument("--measurements", nargs="+", help="jobs.bench.propd --json files or latency profiles")
    p.add_argument("--no-shipped", action="store_true", help="leave out artifacts/measurements/")
    p.add_argument("--output", help="report directory (required, here or in --config)")
    p.add_argument("--prices", help=f"price table YAML (default {DEFAULT_PRICES.relative_to(REPO_ROOT)})")
    p.add_argument("--rows", type=int, help="target dataset: rows to generate (enables the projection)")
    p.add_argument("--mean-prompt-tokens", type=float)
    p.add_argument("--mean-output-tokens", type=float)
    p.add_argument("--deadline-hours", type=float, help="find the cheapest mix that finishes within this")
    p.add_argument("--mix", nargs="+", metavar="DEVICE=COUNT", help="cluster to project, e.g. H100=4 'EPYC'=2")
    p.add_argument("--available", nargs="+", metavar="DEVICE=COUNT", help="most rentable devices per kind")
    p.add_argument("--method", help="method to project: vanilla, ppd, ppd+propd, ... or best (default)")
    p.add_argument("--sweep", action="store_true", help="also benchmark this machine now (jobs/bench/propd.py)")
    p.add_argument("--sweep-batch-sizes", type=int, nargs="+")
    p.add_argument("--sweep-device")
    args = p.parse_args(argv)
    raw: dict = yaml.safe_load(Path(args.config).read_text()) or {} if args.config else {}
    for key, value in (("runs", args.runs), ("measurements", args.measurements), ("output", args.output),
                       ("prices", args.prices)):
        if value is not None:
            raw[key] = value
    if args.no_shipped:
        raw["shipped"] = False
    target = dict(raw.get("target") or {})
    for key, value in (("rows", args.rows), ("mean_prompt_tokens", args.mean_prompt_tokens),
                       ("mean_output_tokens", args.mean_output_tokens), ("deadline_hours", args.deadline_hours),
                       ("method", args.method)):
        if value is not None:
            target[key] = value
    if args.mix:
        target["mix"] = _counts(args.mix, "--mix")
    if args.available:
        target["available"] = _counts(args.available, "--available")
    if target:
        raw["target"] = target
    if args.sweep or args.sweep_batch_sizes or args.sweep_device:
        sweep = dict(raw.get("sweep") or {})
        if args.sweep_batch_sizes:
            sweep["batch_sizes"] = args.sweep_batch_sizes
        if args.sweep_device:
            sweep["device"] = args.sweep_device
        raw["sweep"] = sweep
    try:
        return CostStudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise SystemExit(f"bad cost-study config:\n{exc}") from None


def run_benchmark(argv: list[str]) -> None:
    """``python -m jobs.bench.propd ARGV`` in a process of its own, from the repository root (give it absolute
    paths)."""
    try:
        subprocess.run([sys.executable, "-m", "jobs.bench.propd", *argv], cwd=REPO_ROOT, check=True)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"the sweep's benchmark failed (exit code {exc.returncode}; its output is above)") from None


def run_sweep(sweep: SweepConfig, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (out_dir / "sweep.json").resolve()  # the benchmark runs from the repository root
    device = sweep.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    run_benchmark(["--device", device, "--dtype", sweep.dtype, "--rounds", str(sweep.rounds),
                   "--max-new-tokens", str(sweep.max_new_tokens), "--json", str(path),
                   "--batch-sizes", *map(str, sweep.batch_sizes)])
    return path


def collect(cfg: CostStudyConfig) -> tuple[list[Measurement], list[str]]:
    sources = [*cfg.runs, *cfg.measurements]
    if cfg.shipped and SHIPPED_MEASUREMENTS.is_dir():
        sources += [str(p) for p in sorted(SHIPPED_MEASUREMENTS.glob("*.json"))]
    if cfg.sweep is not None:
        sources.append(str(run_sweep(cfg.sweep, Path(cfg.output))))
    if not sources:
        raise SystemExit("nothing to study: give --runs, --measurements or --sweep (or keep the shipped ones)")
    measurements: list[Measurement] = []
    for source in sources:
        try:
            measurements += read_any(source)
        except (SourceError, OSError, ValueError) as exc:
            raise SystemExit(f"cannot read {source}: {exc}") from None
    models = {m.model_hash for m in measurements if m.model_hash}
    if len(models) > 1:
        raise SystemExit("the measurements are of different models (weights "
                         + ", ".join(h[:16] for h in sorted(models)) + "); study one model at a time "
                         "(--no-shipped leaves out the shipped default-model measurements)")
    return measurements, sources


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        prices = PriceTable.load(cfg.prices)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read the price table {cfg.prices}: {exc}") from None
    measurements, sources = collect(cfg)
    target, rates, mix, cheapest, note = cfg.target, None, None, None, ""
    if target is not None:
        try:
            rates = device_rates(measurements, prices, target.method)
            if not rates:
                raise ValueError(f"no whole-run measurement of method {target.method!r}")
            devices = sorted(rates)
            if target.mix:
                mix = project(target, rates, resolve_counts(target.mix, devices))
            if target.deadline_hours:
                available = resolve_counts(target.available, devices)
                cheapest = cheapest_mix(target, rates, target.deadline_hours, available)
                limited = ", ".join(f"{c} x {d}" for d, c in available.items())
                note = f" (available: {limited}; others unlimited)" if limited else " (no limit on any device)"
        except ValueError as exc:
            raise SystemExit(f"projection: {exc}") from None
    report = write_report(Path(cfg.output), measurements, prices, target=target, rates=rates, mix=mix,
                          cheapest=cheapest, cheapest_note=note, sources=sources)
    print(f"wrote {report} ({len(measurements)} measurements from {len(sources)} sources)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
