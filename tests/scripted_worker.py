"""A stand-in for DecodeWorker that dies on purpose, for the pool tests. Kept free of heavy imports (no
torch): Ray workers import this module to build the actor."""

from __future__ import annotations

import os
from pathlib import Path


class ScriptedWorker:
    """Stands in for DecodeWorker. It dies (the whole process) on the rows it is told to die on: on a row
    in `die_once` only the first time any worker meets it (a marker file remembers), on a row in
    `die_always` every time."""

    def __init__(self, name: str, marker_dir: str, die_once=(), die_always=(), fail_init: bool = False):
        if fail_init:
            raise RuntimeError(f"{name} cannot load its model")
        self.name, self.marker_dir = f"{name} pid {os.getpid()}", Path(marker_dir)
        self.die_once, self.die_always = set(die_once), set(die_always)

    def ready(self) -> dict:
        return {"worker": self.name, "device": "fake"}

    def process(self, rows: list[dict]) -> dict:
        for row in rows:
            marker = self.marker_dir / f"died-on-{row['id']}"
            if row["id"] in self.die_always or (row["id"] in self.die_once and not marker.exists()):
                marker.touch()
                os._exit(1)
        return {"records": [{"id": row["id"], "error": None, "worker": self.name} for row in rows], "slots": {}}
