"""The cost study's report: `report.md` and two PNG plots. Measured figures and projected ones are in separate
sections, and every projected figure says so; a device that was never measured gets no figures at all."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from jobs.cost.model import (
    METHODS,
    ClusterProjection,
    DeviceRate,
    Measurement,
    PriceTable,
    Target,
    best_by_device_method,
    device_hours_per_billion_tokens,
    usd_per_million_tokens,
)

THROUGHPUT_PNG = "throughput_vs_batch.png"
COST_PNG = "usd_per_million_tokens.png"


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def plot_throughput(measurements: Sequence[Measurement], path: Path) -> None:
    """Tokens/s against batch size, one panel per device (their scales differ by orders of magnitude), one
    line per method; profile-derived plain decoding dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({m.device for m in measurements if m.batch_size})
    fig, axes = plt.subplots(1, max(len(devices), 1), figsize=(5.5 * max(len(devices), 1), 4.2), squeeze=False)
    for ax, device in zip(axes[0], devices):
        lines: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        for m in measurements:
            if m.device == device and m.batch_size:
                lines[(m.method, m.source)].append((m.batch_size, m.tokens_per_s))
        for (method, source), points in sorted(lines.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
            points.sort()
            label = f"{method} ({source})" + (": step only" if source == "profile" else "")
            ax.plot([b for b, _ in points], [t for _, t in points], marker="o", linestyle="--" if source == "profile"
                    else "-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (rows decoded together)")
        ax.set_ylabel("output tokens/s per device (measured)")
        ax.set_title(device, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(costs: Sequence[tuple[str, str, float]], path: Path) -> None:
    """$ per 1M output tokens, grouped by device, one bar per method: (device, method, usd) triples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({d for d, _, _ in costs})
    methods = [m for m in METHODS if any(mm == m for _, mm, _ in costs)]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(devices) * max(len(methods), 1) / 2), 4.2))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        xs, ys = [], []
        for j, device in enumerate(devices):
            for d, m, usd in costs:
                if d == device and m == method:
                    xs.append(j + (i - (len(methods) - 1) / 2) * width)
                    ys.append(usd)
        bars = ax.bar(xs, ys, width, label=method)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(devices)), [d if len(d) < 40 else d[:38] + "…" for d in devices], fontsize=8)
    values = [usd for _, _, usd in costs]
    if max(values) > 30 * min(values):  # a CPU next to a GPU can differ by orders of magnitude
        ax.set_yscale("log")
    ax.set_ylabel("$ per 1M output tokens (measured rate x listed price)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mix(p: ClusterProjection) -> str:
    return ", ".join(f"{c} x {d}" for d, c in p.counts.items() if c)


def write_report(out_dir: Path, measurements: Sequence[Measurement], prices: PriceTable, *,
                 target: Target | None = None, rates: dict[str, DeviceRate] | None = None,
                 mix: ClusterProjection | None = None, cheapest: ClusterProjection | None = None,
                 cheapest_note: str = "", sources: Sequence[str] = ()) -> Path:
    """Write report.md and the plots into ``out_dir``; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Cost study", "",
             f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} by `jobs/cost/study.py` from "
             f"{len(sources)} source(s):", ""]
    lines += [f"- `{s}`" for s in sources] + [""]
    models = sorted({m.model_hash for m in measurements if m.model_hash})
    if models:
        lines += [f"Model weights: {', '.join(h[:16] for h in models)}.", ""]

    # ---------------------------------------------------------------------------------------- measured
    lines += ["## Measured", "",
              "Throughput is output tokens per second of one device (one GPU, or one CPU worker with its "
              "threads), timed over whole decoding runs: job runs (busy device-seconds) and benchmark runs. "
              "Each (device, method) shows its fastest batch size.", ""]
    best = best_by_device_method(measurements)
    rows, costs = [], []
    for (device, method), m in sorted(best.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]))):
        priced = prices.lookup(device)
        usd_h = priced[1] if priced else None
        per_m = usd_per_million_tokens(m.tokens_per_s, usd_h) if usd_h is not None else None
        if per_m is not None:
            costs.append((device, method, per_m))
        rows.append([device, m.dtype, method, str(m.batch_size or "-"), f"{m.tokens_per_s:.1f}", _f(m.mean_tau),
                     _f(m.utilisation), _f(usd_h, ".3f"), _f(per_m, ".3f"),
                     f"{device_hours_per_billion_tokens(m.tokens_per_s):,.0f}", m.source])
    lines += _table(["device", "dtype", "method", "batch", "tokens/s", "mean tau", "utilisation", "$/hour",
                     "$ per 1M tokens", "device-hours per 1B tokens", "source"], rows)
    lines += ["", "Utilisation (job runs only): busy device-seconds over devices x the run's decoding time. "
              "$/hour is the listed price (see Prices); $ per 1M tokens = $/hour / (tokens/s x 3600). "
              "A dash: no price for that device.", ""]
    plot_throughput(measurements, out_dir / THROUGHPUT_PNG)
    lines += [f"![throughput against batch size]({THROUGHPUT_PNG})", ""]
    if costs:
        plot_cost(costs, out_dir / COST_PNG)
        lines += [f"![$ per 1M output tokens]({COST_PNG})", ""]

    lines += ["### Every measurement", "",
              "`profile` rows are a worker's start-up latency profile: batch / the plain decode step's seconds over "
              "a 256-token context. A measured step, but not a whole run (no prefill, no per-row work): an upper "
              "bound on plain decoding, plotted dashed and never used for costs or projections.", ""]
    rows = [[m.device, m.dtype, m.method, str(m.batch_size or "-"), f"{m.tokens_per_s:.1f}", _f(m.mean_tau),
             m.source, f"`{m.origin}`", m.measured_at or "-"]
            for m in sorted(measurements, key=lambda m: (m.device, METHODS.index(m.method), m.source,
                                                         m.batch_size or 0))]
    lines += _table(["device", "dtype", "method", "batch", "tokens/s", "tau", "source", "from", "measured at"], rows)
    lines += [""]

    # ---------------------------------------------------------------------------------------- projected
    if target is not None and rates is not None:
        lines += ["## Projected (not measured)", "",
                  f"Target: {target.rows:,} rows, mean prompt {target.mean_prompt_tokens:g} tokens, mean output "
                  f"{target.mean_output_tokens:g} tokens ({target.output_tokens:,.0f} output tokens); method "
                  f"`{target.method}`.", "",
                  "Every figure below is a projection: the measured rate of each device (fastest batch size, "
                  "above) times the target's output tokens, every device busy until the end. Not included: "
                  "worker start-up (model load and profiling, about a minute each), the last shard's tail, and "
                  "prompt lengths unlike those measured (prefill cost grows with the prompt).", ""]
        rows = []
        for device, r in sorted(rates.items()):
            hours = target.output_tokens / r.tokens_per_s / 3600
            rows.append([device, r.method, f"{r.tokens_per_s:.1f}", f"{hours:,.1f}",
                         _f(hours * r.usd_per_hour if r.usd_per_hour is not None else None, ",.2f")])
        lines += ["### One device alone (projected)", ""]
        lines += _table(["device", "method", "measured tokens/s", "projected hours", "projected $"], rows) + [""]
        if mix is not None:
            lines += ["### The given mix (projected)", "",
                      f"{_mix(mix)}: {mix.tokens_per_s:,.1f} tokens/s, **{mix.wall_hours:,.2f} h**, "
                      f"**{'$' + format(mix.usd, ',.2f') if mix.usd is not None else 'no price for every device'}**"
                      + (f" (${mix.usd_per_million_tokens:.3f} per 1M tokens)" if mix.usd_per_million_tokens else "")
                      + ".", ""]
        if target.deadline_hours:
            lines += [f"### Cheapest mix within {target.deadline_hours:g} h (projected)", ""]
            if cheapest is None:
                lines += [f"No mix of the priced, measured devices meets the deadline{cheapest_note}.", ""]
            else:
                lines += [f"{_mix(cheapest)}: {cheapest.wall_hours:,.2f} h, **${cheapest.usd:,.2f}** "
                          f"(${cheapest.usd_per_million_tokens:.3f} per 1M tokens){cheapest_note}.", ""]
        measured_lengths = [m for m in measurements if m.source == "job" and m.mean_prompt_tokens]
        for m in measured_lengths:
            ratio = target.mean_prompt_tokens / m.mean_prompt_tokens
            if not 0.5 <= ratio <= 2:
                lines += [f"Caution: the target's prompts are {ratio:.1f}x as long as those measured on {m.device} "
                          f"({m.mean_prompt_tokens:.0f} tokens, `{m.origin}`).", ""]

    # ---------------------------------------------------------------------------------------- prices
    measured_devices = {m.device for m in measurements}
    lines += ["## Prices", "", "The price table the costs use (`--prices`). Rows that match no measured device are "
              "listed for reference only: no figure above is derived for a device that was not measured.", ""]
    price_of = {d: priced[0] for d in measured_devices if (priced := prices.lookup(d))}
    rows = []
    for p in prices.prices:
        hits = sorted(d for d, q in price_of.items() if q is p)
        rows.append([f"`{p.match}`", f"{p.usd_per_hour:.4g}", p.unit, p.offer, p.source, p.as_of,
                     ", ".join(hits) if hits else "not measured"])
    lines += _table(["pattern", "$/hour", "unit", "offer", "source", "as of", "measured devices"], rows) + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
