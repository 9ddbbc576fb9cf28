"""The arithmetic of the cost study: prices per device, dollars and GPU-hours per token, and projections of a
target dataset onto a cluster mix (wall time, cost, the cheapest mix that meets a deadline).

Pure functions over typed records; reading job outputs is jobs/cost/sources.py, writing the report
jobs/cost/report.py. Rates are output tokens per second of one device (one GPU, or one CPU worker with its
threads), as measured; a price is per device-hour.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")

# What was run: plain decoding, PPD with the worker's static tree, PPD with ProPD sizing, and each PPD variant
# with early pruning.
Method = Literal["vanilla", "ppd", "ppd+propd", "ppd+prune", "ppd+propd+prune"]
METHODS: tuple[str, ...] = ("vanilla", "ppd", "ppd+propd", "ppd+prune", "ppd+propd+prune")

# Where a figure comes from. "job" and "benchmark" time whole decoding runs; "profile" is a start-up latency
# profile's plain (1-slot) decode step over a 256-token context: a measured step time, without the per-row
# work (prefill, tokenising) a job also pays.
Source = Literal["job", "benchmark", "profile"]


class Price(BaseModel):
    """One line of the price table."""

    model_config = ConfigDict(extra="forbid")

    match: str = Field(description="Regular expression searched (case-insensitively) in the device's name as "
                                   "workers report it, e.g. 'H100' in 'NVIDIA H100 80GB HBM3'.")
    usd_per_hour: float = Field(gt=0, description="Dollars per hour of one unit.")
    unit: Literal["gpu", "cpu_thread"] = Field(
        default="gpu", description="'gpu': per GPU; 'cpu_thread': per vCPU, times the worker's torch threads.")
    offer: str = Field(description="What the price buys, e.g. 'RunPod serverless flex, H100 PRO 80 GB'.")
    source: str = Field(description="Where the price was read (a URL).")
    as_of: str = Field(description="When it was read (YYYY-MM-DD).")


class PriceTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    currency: Literal["USD"] = "USD"
    prices: list[Price]

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PRICES) -> PriceTable:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    def lookup(self, device: str) -> tuple[Price, float] | None:
        """The first price whose pattern matches ``device``, and the device's dollars per hour; None if none."""
        for price in self.prices:
            if re.search(price.match, device, flags=re.IGNORECASE):
                return price, price.usd_per_hour * (cpu_threads(device) if price.unit == "cpu_thread" else 1)
        return None


def cpu_threads(device: str) -> int:
    """Threads of a CPU worker from its name ('cpu: AMD EPYC 7B13 (8 threads)'); 1 when the name has none."""
    found = re.search(r"\((\d+) threads?\)", device)
    return int(found.group(1)) if found else 1


class Measurement(BaseModel):
    """One measured throughput: a device, a method, a batch size, and where it came from."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(description="The device's name as workers report it (profiling.device).")
    dtype: str
    model_hash: str | None = Field(default=None, description="The weights' hash (None: not recorded).")
    method: Method
    batch_size: int | None = Field(description="Rows decoded together (None: a job whose groups differ).")
    tokens_per_s: float = Field(gt=0, description="Output tokens per second of one device.")
    mean_tau: float | None = Field(default=None, description="Output tokens per forward pass.")
    utilisation: float | None = Field(default=None, description="Busy device-seconds over the devices' "
                                                                "wall seconds while the job decoded (jobs only).")
    output_tokens: int | None = None
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None
    source: Source
    origin: str = Field(description="The file or directory it was read from.")
    measured_at: str | None = None

    @field_validator("measured_at", mode="before")
    @classmethod
    def _iso(cls, value):
        return value.isoformat(timespec="seconds") if isinstance(value, datetime) else value


# --------------------------------------------------------------------------------------------- unit costs
def usd_per_million_tokens(tokens_per_s: float, usd_per_hour: float) -> float:
    """Dollars per 1M output tokens on one device: an hour buys tokens_per_s * 3600 tokens."""
    assert tokens_per_s > 0 and usd_per_hour >= 0
    return usd_per_hour / (tokens_per_s * 3600) * 1e6


def device_hours_per_billion_tokens(tokens_per_s: float) -> float:
    """Device-hours (GPU-hours for a GPU) to emit 1B output tokens on one device."""
    assert tokens_per_s > 0
    return 1e9 / tokens_per_s / 3600


def best_by_device_method(measurements: Sequence[Measurement],
                          sources: Sequence[str] = ("job", "benchmark")) -> dict[tuple[str, str], Measurement]:
    """(device, method) -> its fastest measurement over batch sizes, among whole-run sources only."""
    best: dict[tuple[str, str], Measurement] = {}
    for m in measurements:
        if m.source in sources and ((key := (m.device, m.method)) not in best
                                    or m.tokens_per_s > best[key].tokens_per_s):
            best[key] = m
    return best


# --------------------------------------------------------------------------------------------- projection
class Target(BaseModel):
    """A dataset to generate and the cluster to generate it on."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(gt=0, description="Rows (completions) to generate.")
    mean_prompt_tokens: float = Field(gt=0, description="Mean prompt length, in tokens.")
    mean_output_tokens: float = Field(gt=0, description="Mean completion length, in tokens.")
    deadline_hours: float | None = Field(default=None, gt=0, description="Wall-clock budget for the cheapest "
                                                                         "mix that meets it.")
    mix: dict[str, int] = Field(default_factory=dict, description="Cluster to project: device (a pattern "
                                "matching one measured device name) -> count.")
    available: dict[str, int] = Field(default_factory=dict, description="Most devices of each kind that can be "
                                      "rented (pattern -> count), for the cheapest mix; unlisted: no limit.")
    method: str = Field(default="best", description="Method to project: one of the methods, or 'best' "
                                                    "(each device's fastest measured method).")

    @property
    def output_tokens(self) -> float:
        return self.rows * self.mean_output_tokens


class DeviceRate(BaseModel):
    """What a projection knows of a device: its measured rate (for one method) and its price."""

    device: str
    method: str
    tokens_per_s: float
    usd_per_hour: float | None
    batch_size: int | None
    source: str


class ClusterProjection(BaseModel):
    counts: dict[str, int]
    tokens_per_s: float
    wall_hours: float
    usd: float | None  # None when a device in the mix has no price
    usd_per_million_tokens: float | None


def resolve_device(pattern: str, devices: Sequence[str]) -> str:
    """The one device name that ``pattern`` matches (exactly, else as a case-insensitive regex)."""
    if pattern in devices:
        return pattern
    found = [d for d in devices if re.search(pattern, d, flags=re.IGNORECASE)]
    if len(found) != 1:
        raise ValueError(f"{pattern!r} matches {len(found)} measured devices ({', '.join(found) or 'none'}); "
                         f"measured: {', '.join(devices)}")
    return found[0]


def device_rates(measurements: Sequence[Measurement], prices: PriceTable,
                 method: str = "best") -> dict[str, DeviceRate]:
    """device -> the rate a projection uses: the fastest whole-run measurement of ``method`` (any batch size),
    or with 'best' of any method."""
    if method != "best" and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)} or 'best'")
    rates: dict[str, DeviceRate] = {}
    for (device, m_method), m in best_by_device_method(measurements).items():
        if method != "best" and m_method != method:
            continue
        if device not in rates or m.tokens_per_s > rates[device].tokens_per_s:
            priced = prices.lookup(device)
            rates[device] = DeviceRate(device=device, method=m_method, tokens_per_s=m.tokens_per_s,
                                       usd_per_hour=priced[1] if priced else None, batch_size=m.batch_size,
                                       source=f"{m.source}: {m.origin}")
    return rates


def project(target: Target, rates: Mapping[str, DeviceRate], counts: Mapping[str, int]) -> ClusterProjection:
    """Wall time and cost of ``target`` on ``counts`` devices, every device busy at its measured rate until the
    end (the shard queue keeps them all busy; start-up and the last shard's tail are not counted)."""
    counts = {d: c for d, c in counts.items() if c > 0}
    if not counts:
        raise ValueError("the cluster mix has no device")
    for device in counts:
        if device not in rates:
            raise ValueError(f"no measurement of {device!r} for this method")
    rate = sum(c * rates[d].tokens_per_s for d, c in counts.items())
    wall_hours = target.output_tokens / rate / 3600
    priced = all(rates[d].usd_per_hour is not None for d in counts)
    usd = wall_hours * sum(c * rates[d].usd_per_hour for d, c in counts.items()) if priced else None
    return ClusterProjection(counts=dict(counts), tokens_per_s=rate, wall_hours=wall_hours, usd=usd,
                             usd_per_million_tokens=usd / target.output_tokens * 1e6 if usd is not None else None)


def cheapest_mix(target: Target, rates: Mapping[str, DeviceRate], deadline_hours: float,
                 available: Mapping[str, int] | None = None, max_search: int = 2_000_000) -> ClusterProjection | None:
    """The cheapest cluster that finishes ``target`` within ``deadline_hours``; None if none can.

    Every device is busy until the end, so a mix costs T * sum(c_i p_i) / sum(c_i r_i) (T tokens, c_i devices
    of price p_i and rate r_i): the work-weighted mean of the kinds' dollars per token. More devices of one
    kind finish sooner at the same cost, so a kind with no limit and the lowest $/token is the answer alone.
    With limits it is not simple: one fast dear device can overshoot the deadline's rate and take most of the
    work, where a slow one would have done. So every mix is tried (each kind from 0 to its limit, or to what
    would meet the deadline alone; the dearest kind at the fewest that meet it), up to ``max_search`` mixes;
    beyond that, kinds are taken in order of $/token, all of each that is available until the rate is met.
    Unpriced devices are left out; ties go to the fewer devices."""
    needed = target.output_tokens / (deadline_hours * 3600)  # tokens/s
    kinds = sorted((d for d, r in rates.items() if r.usd_per_hour is not None),
                   key=lambda d: rates[d].usd_per_hour / rates[d].tokens_per_s)
    if not kinds:
        return None
    available = available or {}

    def fewest(device: str, rate_left: float) -> int:
        return max(0, math.ceil(rate_left / rates[device].tokens_per_s - 1e-9))

    limit = {d: min(available.get(d, math.inf), fewest(d, needed)) for d in kinds}
    best: ClusterProjection | None = None
    if math.prod(limit[d] + 1 for d in kinds[:-1]) <= max_search:
        mixes = []
        for head in itertools.product(*(range(limit[d] + 1) for d in kinds[:-1])):
            rate = sum(c * rates[d].tokens_per_s for d, c in zip(kinds, head))
            last = fewest(kinds[-1], needed - rate)
            if last <= limit[kinds[-1]]:
                mixes.append(dict(zip(kinds, (*head, last))))
    else:
        counts, rate = {}, 0.0
        for d in kinds:
            counts[d] = min(limit[d], fewest(d, needed - rate))
            rate += counts[d] * rates[d].tokens_per_s
        mixes = [counts] if rate >= needed * (1 - 1e-9) else []
    for counts in mixes:
        if sum(counts.values()) == 0:
            continue
        option = project(target, rates, counts)
        if best is None or (option.usd, sum(option.counts.values())) < (best.usd, sum(best.counts.values())):
            best = option
    return best


def resolve_counts(patterns: Mapping[str, int], devices: Sequence[str]) -> dict[str, int]:
    """{pattern: count} -> {device name: count}, each pattern naming one measured device."""
    counts: dict[str, int] = {}
    for pattern, count in patterns.items():
        if count < 0:
            raise ValueError(f"negative count for {pattern!r}")
        device = resolve_device(pattern, devices)
        counts[device] = counts.get(device, 0) + count
    return counts
