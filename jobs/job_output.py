"""A job's output directory, with one owner: ``JobOutput`` holds its parts, their index, job.json, the resume scan
and summary.json, and hands the workers a ``PartWriter`` so that they publish their own parts.

Contract:
- ``open`` prepares the directory for a run (job.json written or checked, a killed run's ``*.tmp`` files
  removed) and says which input rows it holds (jobs/resume.scan_written); ``look`` reads the same without
  changing anything (``--plan-only``).
- A worker writes the parts of its shards itself when it reaches the output: always for an object store (every
  node reaches it), and for a local directory only on the driver's node (a local path on another node is
  another disk). Otherwise it returns its rows and the driver writes them (``write``): the slow path, per row.
  ``writer_for`` decides, and says why.
- The driver ``accept``s each part a worker reports (its name, size and summary: never its rows) into the
  index. A part published but never reported (its worker died first, or the driver did) is found by its
  footer at the next scan; a shard written twice is settled there, one part kept (jobs/resume.scan_written).
- ``final_scan`` (a finished run) settles such duplicates; ``finish`` writes summary.json (and, for an OpenAI
  batch output, makes the result files match the parts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jobs.config import JobConfig
from jobs.inputs import InputPlan
from jobs.output import PartIndex, PartWriter, WrittenPart, write_summary
from jobs.resume import (
    Written,
    check_manifest,
    config_hash,
    open_output,
    output_shaping_config,
    record_worker,
    recorded_numerics,
    scan_written,
)
from jobs.storage import Location, resolve


class JobOutput:
    """The output of one job's run (``cfg.output``); see the module's contract."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.location: Location = resolve(cfg.output)
        self.config_hash = config_hash(output_shaping_config(cfg))
        # Workers resolve the output where they run: a local one by its absolute path (their working directory is
        # not the driver's), a URI with its options.
        self.writer = PartWriter(self.location.source, cfg.output_format)
        self.index = PartIndex(self.location)

    @property
    def uri(self) -> str:
        return self.location.uri

    def open(self, plan: InputPlan, *, overwrite: bool = False) -> Written:
        """Prepare the directory for this run; the input rows it already holds (to be skipped)."""
        return open_output(self.location, self.cfg, plan, overwrite=overwrite)

    def look(self, plan: InputPlan) -> Written:
        """What the directory holds, read without changing anything (a refused directory raises ResumeError)."""
        check_manifest(self.location, self.cfg, write=False)
        return scan_written(self.location, plan)

    def writer_for(self, node_id: str | None, driver_node_id: str | None) -> tuple[PartWriter | None, str]:
        """The writer a worker on ``node_id`` publishes its parts with, or None when it cannot reach the output
        (then the driver writes its rows); and why, for its start line."""
        if not self.location.reachable_from(node_id, driver_node_id):
            return None, ("returns its rows, which the driver writes: the output is a local directory on the "
                          "driver's node (give a URI, e.g. s3://..., to have workers on other nodes write their own "
                          "parts)")
        if not self.location.local:
            return self.writer, "writes its own parts"
        return dataclasses.replace(self.writer, node_id=node_id), "writes its own parts (on the driver's node)"

    def accept(self, part: WrittenPart) -> WrittenPart:
        """A part a worker published: indexed (the summary is all the driver keeps of it)."""
        self.index.add(part)
        return part

    def write(self, shard_index: int, records: list[dict[str, Any]]) -> WrittenPart:
        """The driver writes a shard's part itself (a worker that cannot reach the output, a shard given up)."""
        return self.accept(self.writer.write(shard_index, records))

    def take(self, shard_index: int, result: dict[str, Any]) -> WrittenPart:
        """A finished shard as the pool yields it (jobs/pool.run_shards): the part its worker published, accepted;
        else its ``records``, written here."""
        part = result.get("part")
        return self.accept(part) if part is not None else self.write(shard_index, result["records"])

    def flush(self) -> None:
        """Publish the index of the parts accepted since the last flush."""
        self.index.flush()

    def final_scan(self, plan: InputPlan) -> Written:
        """A finished run's directory: every row written (rows whose workers died count as written), a shard
        written twice settled."""
        return scan_written(self.location, plan, died_are_written=True, settle=True)

    def recorded_numerics(self) -> dict[str, int]:
        return recorded_numerics(self.location)

    def record_worker(self, info: dict[str, Any], started: list[dict[str, Any]]) -> None:
        record_worker(self.location, info, started)

    def finish(self, summary: dict[str, Any]) -> None:
        """summary.json; for an OpenAI batch output, the result files made to match the parts first (a resume's
        rewritten parts, a killed run's last part)."""
        if self.cfg.output_format == "openai-batch":
            from jobs.openai_batch import reconcile_results

            reconcile_results(self.location)
        write_summary(self.location, summary)
