"""A stand-in for DecodeWorker that dies on purpose, for the pool tests. Kept free of heavy imports (no
torch): Ray workers import this module to build the actor."""

from __future__ import annotations

import os
from pathlib import Path

from workers.records import RowOutput


class ScriptedWorker:
    """Stands in for DecodeWorker. It dies (the whole process) on the rows it is told to die on: on a row
    in `die_once` only the first time any worker meets it (a marker file remembers), on a row in
    `die_always` every time; on a row in `die_after_publishing` the first time, once it has published the
    shard's part and before it reports it. Given a writer, it publishes its parts as DecodeWorker does."""

    def __init__(self, name: str, marker_dir: str, die_once=(), die_always=(), die_after_publishing=(),
                 fail_init: bool = False):
        if fail_init:
            raise RuntimeError(f"{name} cannot load its model")
        self.name, self.marker_dir = f"{name} pid {os.getpid()}", Path(marker_dir)
        self.die_once, self.die_always = set(die_once), set(die_always)
        self.die_after_publishing = set(die_after_publishing)

    def ready(self) -> dict:
        return {"worker": self.name, "device": "fake"}

    def process(self, rows: list[dict], writer=None, shard_index: int = -1, keep_records: bool = False) -> dict:
        for row in rows:
            marker = self.marker_dir / f"died-on-{row['id']}"
            if row["id"] in self.die_always or (row["id"] in self.die_once and not marker.exists()):
                marker.touch()
                os._exit(1)
        records = [RowOutput(id=row["id"], worker=self.name).to_dict() for row in rows]
        if writer is None:
            return {"records": records, "slots": {}}
        part = writer.write(shard_index, records)
        for row in rows:
            marker = self.marker_dir / f"died-after-publishing-{row['id']}"
            if row["id"] in self.die_after_publishing and not marker.exists():
                marker.touch()
                os._exit(1)
        return {"part": part, "records": records if keep_records else None, "slots": {}}
