"""Live progress (rows done, tokens/s, ETA, throughput per worker group) and the per-device summary table."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass
class Tally:
    prompts: int = 0  # input rows
    rows: int = 0  # output rows: one per completion
    rows_failed: int = 0
    output_tokens: int = 0
    steps: int = 0
    device_seconds: float = 0.0
    batch_fallback_rows: int = 0  # rows whose batch failed and that were decoded alone (a bug: workers/engine.py)
    # Decode slots over the steps that began with rows waiting for a slot (decoding/slots.Occupancy): busy
    # slot-steps, and slot-steps offered (steps x slots).
    busy_slot_steps: int = 0
    slot_steps: int = 0
    # The decode loops' time inside steps (workers/engine.StepClock): wall seconds, and the stepping threads' CPU
    # seconds in them.
    loop_steps: int = 0
    step_seconds: float = 0.0
    step_thread_cpu_seconds: float = 0.0

    def add_part(self, summary: dict[str, Any], seconds: float, slots: dict[str, int] | None = None,
                 clock: dict[str, float] | None = None) -> None:
        """A written part, from its summary (jobs/output.part_summary, with its ``tally``)."""
        tally = summary["tally"]
        self.prompts += len(summary["ids"])
        self.rows += summary["rows"]
        self.rows_failed += summary["failed"]
        self.output_tokens += tally["output_tokens"]
        self.steps += tally["steps"]
        self.device_seconds += seconds
        self.batch_fallback_rows += tally["batch_fallback"]
        self._add_slots(slots)
        if clock:
            self.loop_steps += int(clock["steps"])
            self.step_seconds += clock["wall_s"]
            self.step_thread_cpu_seconds += clock["thread_cpu_s"]

    def _add_slots(self, slots: dict[str, int] | None) -> None:
        if slots:
            self.busy_slot_steps += slots["busy_waiting"]
            self.slot_steps += slots["steps_waiting"] * slots["slots"]

    @property
    def occupancy(self) -> float | None:
        """Mean busy slots per step over slots, over the steps while rows waited (None: rows never waited)."""
        return self.busy_slot_steps / self.slot_steps if self.slot_steps else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "rows": self.rows,
            "rows_failed": self.rows_failed,
            "output_tokens": self.output_tokens,
            "mean_tau": self.output_tokens / self.steps if self.steps else None,
            "device_seconds": self.device_seconds,
            "tokens_per_device_s": self.output_tokens / self.device_seconds if self.device_seconds else None,
            "batch_fallback_rows": self.batch_fallback_rows,
            "slot_occupancy": self.occupancy,
            "decode_loop": self.decode_loop(),
        }

    def decode_loop(self) -> dict[str, Any]:
        """The decode loops' steps, their wall seconds and their threads' CPU seconds in them."""
        return {"steps": self.loop_steps, "step_seconds": round(self.step_seconds, 3),
                "thread_cpu_seconds": round(self.step_thread_cpu_seconds, 3)}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Input rows done of the input rows to do, tokens/s and ETA over this run, tokens/s per worker group.

    On a terminal it redraws one line in place; otherwise (a log, `ray job submit`) it prints a line every
    `interval_s` seconds.
    """

    def __init__(self, rows_to_do: int, rows_skipped: int, *, interval_s: float = 10.0, stream: TextIO | None = None):
        self.rows_to_do, self.rows_skipped = rows_to_do, rows_skipped
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval_s = 0.5 if self.live else interval_s
        self.started = time.perf_counter()
        self.last_shown = 0.0
        self.total = Tally()
        self.groups: dict[str, Tally] = defaultdict(Tally)
        self.devices: dict[str, Tally] = defaultdict(Tally)
        self.group_started: dict[str, float] = {}
        self.status: Callable[[], str | None] = lambda: None  # a few more words for the line (the adaptation's)
        # Input rows finished (and tokens) in shards still on a worker, by the shard's first row id; dropped
        # once the shard is written, so nothing counts twice.
        self.open: dict[str, tuple[int, int]] = {}
        self.written: set[str] = set()

    def worker_ready(self, group: str) -> None:
        if not self.group_started:  # rates count from the first worker ready, not from model loading
            self.started = time.perf_counter()
        self.group_started.setdefault(group, time.perf_counter())

    def add_part(self, summary: dict[str, Any], *, group: str | None, device: str | None, seconds: float,
                 slots: dict[str, int] | None = None, clock: dict[str, float] | None = None) -> None:
        """A written part, from its summary (jobs/output.part_summary), its worker's slot counters and step time: the
        driver need not look at its rows. group and device are None for rows given up on (their workers died)."""
        for tally in (self.total, *([self.groups[group]] if group is not None else []),
                      *([self.devices[device]] if device is not None else [])):
            tally.add_part(summary, seconds, slots, clock)
        if summary["ids"]:
            self.written.add(summary["ids"][0])
            self.open.pop(summary["ids"][0], None)
        self.show()

    def in_flight(self, counts: dict[str, tuple[int, int]]) -> None:
        """A worker's open shards: input rows finished so far and their tokens, by each shard's first row id."""
        self.open.update({first: tuple(c) for first, c in counts.items() if first not in self.written})

    def line(self) -> str:
        now = time.perf_counter()
        elapsed = now - self.started
        # rows done: the written shards' input rows, and the rows finished in shards still decoding
        done = self.total.prompts + sum(c for c, _ in self.open.values())
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.rows_to_do - done) / rate) if rate > 0 else "?"
        tokens = self.total.output_tokens + sum(t for _, t in self.open.values())
        tokens_per_s = tokens / elapsed if elapsed > 0 else 0.0
        parts = [f"rows {done}/{self.rows_to_do}" + (f" (+{self.rows_skipped} skipped)" if self.rows_skipped else ""),
                 f"{tokens_per_s:.1f} tok/s", f"ETA {eta}"]
        if self.total.occupancy is not None:
            parts.append(f"slots {self.total.occupancy:.0%} busy")
        for name, tally in sorted(self.groups.items()):
            since = now - self.group_started.get(name, self.started)
            parts.append(f"{name}: {tally.prompts} rows, {tally.output_tokens / since if since > 0 else 0:.1f} tok/s")
        status = self.status()
        if status:
            parts.append(status)
        return " | ".join(parts)

    def due(self, ahead_s: float = 0.0) -> bool:
        """Whether the next line is due within ``ahead_s`` seconds."""
        return time.perf_counter() - self.last_shown >= self.interval_s - ahead_s

    def show(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last_shown < self.interval_s:
            return
        self.last_shown = now
        if self.live:
            self.stream.write("\r\033[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.show(force=True)
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def device_table(by_device: dict[str, dict[str, Any]]) -> str:
    """The per-device-type table printed at the end (rows, tokens, tokens/s per device, mean tau, device-s, slot
    occupancy while rows waited, and the rows decoded alone after their batch failed)."""
    header = ("device", "workers", "output rows", "output tokens", "tokens/s", "mean tau", "device-s",
              "slot occupancy", "batch fallback rows")
    lines = [header]
    for device, d in sorted(by_device.items()):
        lines.append((device, str(d["workers"]), str(d["rows"]), str(d["output_tokens"]),
                      f"{d['tokens_per_device_s']:.1f}" if d["tokens_per_device_s"] else "-",
                      f"{d['mean_tau']:.2f}" if d["mean_tau"] else "-", f"{d['device_seconds']:.1f}",
                      f"{d['slot_occupancy']:.3f}" if d.get("slot_occupancy") is not None else "-",
                      str(d["batch_fallback_rows"])))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    aligned = ("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
               for row in lines)
    return "\n".join(aligned)
