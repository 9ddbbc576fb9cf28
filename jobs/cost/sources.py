"""Measurements for the cost study, read from what earlier work left behind:

- a job's output directory: `summary.json` (the run's time per device, its workers and config) and the Parquet
  rows (each row's device, prompt and output lengths, steps);
- a `jobs/bench/propd.py --json` file: tokens/s and tau per batch size for plain, static PPD, ProPD (and
  ProPD with pruning), all on one device;
- a start-up latency profile (the workers' cache, `profiles/latency-*.json`): the plain decode step's time by
  batch size. That is a step over a fixed 256-token context, not a whole run, and is labelled as such.

Every reader returns `Measurement`s and refuses a file it cannot read with a message naming it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from jobs.cost.model import Measurement
from jobs.output import read_output

DTYPES = ("float32", "bfloat16", "float16")
BENCH_METHODS = {"plain": "vanilla", "static": "ppd", "propd": "ppd+propd", "pruned": "ppd+propd+prune"}


class SourceError(ValueError):
    """A measurement file or directory that cannot be used, and why."""


def method_of(worker: dict[str, Any], config: dict[str, Any]) -> str:
    """A job worker's method, from what it reported at start-up (falling back on the job config)."""
    if worker.get("decoding", config.get("decoding", {}).get("method")) == "vanilla":
        return "vanilla"
    propd = str(worker.get("tree", "")).startswith("propd") or config.get("decoding", {}).get("tree_sizing") == "propd"
    return "ppd" + ("+propd" if propd else "") + ("+prune" if worker.get("prune_head") else "")


def read_job(out_dir: str | Path) -> list[Measurement]:
    """One measurement per device type of a job run: tokens per busy device-second, tau and lengths from its
    rows, utilisation = busy device-seconds / (devices x the run's decoding seconds)."""
    out_dir = Path(out_dir)
    path = out_dir / "summary.json"
    if not path.is_file():
        raise SourceError(f"{out_dir}: no summary.json (not a finished job output directory)")
    summary = json.loads(path.read_text())
    try:
        by_device, workers, decode_s = summary["by_device"], summary["workers"], summary["decode_seconds"]
        config = summary["config"]
    except KeyError as exc:
        raise SourceError(f"{path}: no {exc.args[0]!r} (written by an older version?)") from None
    columns = ["id", "error", "device", "prompt_tokens", "num_output_tokens", "num_steps", "dtype", "started_at"]
    rows = [r for r in read_output(out_dir, columns=columns).to_pylist() if r["error"] is None]
    per_device: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        per_device[r["device"]].append(r)
    out = []
    for device, tally in sorted(by_device.items()):
        if not tally.get("tokens_per_device_s"):
            continue
        own = [w for w in workers if w.get("device") == device]
        methods = {method_of(w, config) for w in own} or {method_of({}, config)}
        if len(methods) > 1:
            raise SourceError(f"{path}: workers on {device} ran different methods ({', '.join(sorted(methods))})")
        batch_sizes = {w.get("batch_size") for w in own}
        device_rows = per_device.get(device, [])
        n = len(device_rows)
        out.append(Measurement(
            device=device, dtype=(own[0].get("dtype") if own else None) or (device_rows[0]["dtype"] if n else "?"),
            method=methods.pop(), batch_size=batch_sizes.pop() if len(batch_sizes) == 1 else None,
            tokens_per_s=tally["tokens_per_device_s"], mean_tau=tally.get("mean_tau"),
            utilisation=(tally["device_seconds"] / (tally["workers"] * decode_s)
                         if tally.get("workers") and decode_s > 0 else None),
            output_tokens=tally["output_tokens"], model_hash=own[0].get("model_hash") if own else None,
            mean_prompt_tokens=sum(r["prompt_tokens"] for r in device_rows) / n if n else None,
            mean_output_tokens=sum(r["num_output_tokens"] for r in device_rows) / n if n else None,
            source="job", origin=str(out_dir),
            measured_at=min((r["started_at"] for r in device_rows if r["started_at"]), default=None)))
    if not out:
        raise SourceError(f"{path}: no device decoded any token in this run")
    return out


def read_bench(path: str | Path) -> list[Measurement]:
    """A jobs.bench.propd JSON (optionally wrapped as {"provenance": ..., "bench": ...}, as shipped under
    artifacts/measurements/): one measurement per batch size and method, its median round."""
    path = Path(path)
    data = json.loads(path.read_text())
    provenance = data.get("provenance", {})
    bench = data.get("bench", data)
    if "results" not in bench or "device" not in bench:
        raise SourceError(f"{path}: not a jobs.bench.propd --json file (no 'device' and 'results')")
    device, dtype = bench.get("device_name"), bench.get("dtype") or provenance.get("dtype")
    if device is None:  # older files: "<device name> <dtype>", or the name alone
        device, _, last = bench["device"].rpartition(" ")
        if last in DTYPES:
            dtype = dtype or last
        else:
            device = bench["device"]
    model_hash = bench.get("model_hash") or provenance.get("model_hash")
    out = []
    for row in bench["results"]:
        for key, method in BENCH_METHODS.items():
            if key in row:
                out.append(Measurement(
                    device=device, dtype=dtype, method=method, batch_size=row["batch"],
                    tokens_per_s=row[key]["tok_s"], mean_tau=row[key]["tau"], model_hash=model_hash,
                    source="benchmark", origin=str(path),
                    measured_at=bench.get("measured_at") or provenance.get("measured_at")))
    return out


def read_profile(path: str | Path) -> list[Measurement]:
    """A latency profile: plain decoding's tokens/s at each profiled batch size, batch / step seconds."""
    path = Path(path)
    data = json.loads(path.read_text())
    try:
        identity, points = data["device"], data["points"]
    except (KeyError, TypeError):
        raise SourceError(f"{path}: not a latency profile (no 'device' and 'points')") from None
    name = identity["name"] if identity["kind"] != "cpu" else f"cpu: {identity['name']} ({identity['threads']} threads)"
    return [Measurement(device=name, dtype=identity["dtype"], method="vanilla", batch_size=p["batch"],
                        tokens_per_s=p["batch"] / p["seconds"], mean_tau=1.0, model_hash=data.get("model_hash"),
                        source="profile", origin=str(path),
                        measured_at=data.get("measured_at"))
            for p in points if p["slots"] == 1 and p["seconds"] > 0]


def read_any(path: str | Path) -> list[Measurement]:
    """A job output directory, a jobs.bench.propd JSON or a latency profile, told apart by content."""
    path = Path(path)
    if path.is_dir():
        return read_job(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file or directory")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise SourceError(f"{path}: not JSON ({exc})") from None
    if isinstance(data, dict) and "points" in data:
        return read_profile(path)
    return read_bench(path)
