"""Whether a worker runs its decode step through torch.compile (``decoding.compile``: auto, on, off).

Contract of ``choose_compile``: ``on`` and ``off`` are obeyed (``on`` still yields to CUDA graphs on a CUDA device
and to early pruning, whose steps stay eager). ``auto`` compiles only on a CPU, and only when the worker's share
of the job, decoded eagerly, would take long enough that compiling's speed-up wins back the compile time:

    expected_tokens / eager_tokens_per_s * (1 - 1 / speedup) > compile_s

``expected_tokens`` is the worker's share of the job's rows times ``max_new_tokens`` (an upper bound: a workload
of short answers is credited more decoding than it has). ``eager_tokens_per_s`` is what eager jobs here decoded
inside their steps where recorded (``record_step_rate``), else the worker's latency profile's prediction (timed
on a quiet machine over short rows: faster than a job). ``compile_s`` is what the last compile of this step took
on this machine, its shapes met mid-job included (the inductor cache beside the model's makes a second one
cheaper), else a guess measured on the 2-core VM for plain decoding, times the tree sets the decoder may step
with (ProPD's family: each is its own graphs).
``speedup`` is what jobs here measured: the tokens per second inside compiled steps (the steps that compiled a
shape left out) over those inside eager steps, each recorded by a job's worker as it decodes
(``record_step_rate``); until both are recorded, a guess. A speed-up of 1 or less never pays.

Pure arithmetic on given numbers, plus the record of compile times on disk: tested with fake times.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from workers.models import write_json_atomically

CompileMode = Literal["auto", "on", "off"]

# Measured on the 2-core VM, default model, plain decoding at batch 8, in a 500-row job (python -m
# jobs.bench.job_speed --compile-rows 500): compiling took 272 s, 55 s at start-up and as much again for each of
# the 4 more attention views its rows grew into; compiled steps then decoded 72.7 tok/s against 69.2 in an eager
# job (1.05x). Guesses for a step never compiled on this machine, until records replace them.
FIRST_COMPILE_S_GUESS = 270.0
SPEEDUP_GUESS = 1.05


@dataclass(frozen=True)
class CompileEstimate:
    """What compiling is expected to cost and give."""

    compile_s: float
    speedup: float
    source: str  # where compile_s and speedup come from
    eager_tokens_per_s: float | None = None  # what eager jobs here decoded inside their steps, where recorded


@dataclass(frozen=True)
class CompileChoice:
    compile: bool
    reason: str


def choose_compile(mode: CompileMode, *, device_type: str, captured: bool, pruning: bool,
                   expected_tokens: int | None, eager_tokens_per_s: Callable[[], float | None],
                   estimate: CompileEstimate) -> CompileChoice:
    """Compile or not, and why (see the module docstring). ``captured``: the step runs as CUDA graphs.
    ``eager_tokens_per_s`` is asked only where ``auto`` weighs the compile (it may time steps)."""
    if pruning:
        return CompileChoice(False, "eager: early pruning keeps a data-dependent number of slots")
    if captured:
        return CompileChoice(False, "the step is captured as CUDA graphs")
    if mode != "auto":
        return CompileChoice(mode == "on", f"compile {mode}")
    if device_type != "cpu":
        return CompileChoice(False, f"eager: compile auto compiles only on a CPU, not on {device_type}")
    if estimate.speedup <= 1.0:
        return CompileChoice(False, f"compile auto: eager, compiled steps gain nothing here ({estimate.speedup:.2f}x: "
                                    f"{estimate.source})")
    rate = (estimate.eager_tokens_per_s or eager_tokens_per_s()) if expected_tokens else None
    if not expected_tokens or not rate:
        return CompileChoice(False, "eager: no job size or no eager speed to weigh the compile time against")
    decode_s = expected_tokens / rate
    saved = decode_s * (1 - 1 / estimate.speedup)
    weighed = (f"~{decode_s:.0f} s of eager decoding ({expected_tokens} tokens at {rate:.1f} tok/s) "
               f"would save ~{saved:.0f} s at {estimate.speedup:.2f}x, against ~{estimate.compile_s:.0f} s of "
               f"compiling ({estimate.source})")
    if saved > estimate.compile_s:
        return CompileChoice(True, f"compile auto: compiled, {weighed}")
    return CompileChoice(False, f"compile auto: eager, {weighed}")


def record_key(device_key: str, model_hash: str, numeric_path: str, method: str, batch_size: int,
               step_tokens: int) -> str:
    """The name of the compiled step's record: what shapes its graphs."""
    text = json.dumps([device_key, model_hash, numeric_path, method, batch_size, step_tokens])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "compile" / f"{key}.json"


def estimate_compile(cache_dir: Path | None, key: str, tree_sets: int = 1) -> CompileEstimate:
    """The compile time this step last took here (record_compile), else FIRST_COMPILE_S_GUESS for each of the
    ``tree_sets`` the decoder may step with; the speed-up jobs here measured (record_step_rate), else
    SPEEDUP_GUESS."""
    record = _read_record(record_path(cache_dir, key)) if cache_dir is not None else {}
    try:
        compile_s = float(record["last_compile_s"])
        source = f"the last compile here took {compile_s:.0f} s"
    except (KeyError, TypeError, ValueError):
        compile_s = FIRST_COMPILE_S_GUESS * tree_sets
        source = "a first compile, guessed" + (f" for {tree_sets} tree sets" if tree_sets > 1 else "")
    rates = record.get("step_tokens_per_s")
    rates = rates if isinstance(rates, dict) else {}
    compiled, eager = (_positive(rates.get(mode)) for mode in ("compile", "eager"))
    if compiled and eager:
        return CompileEstimate(compile_s, compiled / eager, f"{source}; jobs here stepped at {compiled:.1f} tok/s "
                               f"compiled, {eager:.1f} eager", eager_tokens_per_s=eager)
    return CompileEstimate(compile_s, SPEEDUP_GUESS, f"{source}; the speed-up guessed", eager_tokens_per_s=eager)


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _update_record(cache_dir: Path, key: str, **fields: object) -> None:
    path = record_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, {**_read_record(path), **fields})


def record_compile(cache_dir: Path | None, key: str, compile_s: float) -> None:
    """Remember what this compile took, for the next worker's estimate."""
    if cache_dir is None:
        return
    first = _positive(_read_record(record_path(cache_dir, key)).get("first_compile_s")) or compile_s
    _update_record(cache_dir, key, first_compile_s=round(first, 2), last_compile_s=round(compile_s, 2))


def record_step_rate(cache_dir: Path | None, key: str, step_mode: Literal["compile", "eager"],
                     tokens_per_s: float) -> None:
    """Remember the tokens per second this worker decoded inside its steps, compiled or eager (compiling steps
    left out), for the next worker's estimate of what compiling gives."""
    if cache_dir is None:
        return
    rates = _read_record(record_path(cache_dir, key)).get("step_tokens_per_s")
    rates = rates if isinstance(rates, dict) else {}
    _update_record(cache_dir, key, step_tokens_per_s={**rates, step_mode: round(tokens_per_s, 3)})
