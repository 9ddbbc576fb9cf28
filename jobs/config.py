"""The job's configuration: one pydantic model, filled from an optional YAML file and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.configs import DecodingConfig, ModelConfig

DEMO_INPUT = Path(__file__).resolve().parent / "demo_prompts.jsonl"
DEMO_OUTPUT = "outputs/demo"


class WorkerGroup(BaseModel):
    """Identical decode actors on one kind of device. Each actor profiles its own device at start-up and
    builds its own tree (and, with `batch_size: auto`, its own batch size)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="default", min_length=1, description="Shown in progress, summary and each row's "
                      "`worker_group` column.")
    count: int = Field(default=1, ge=1, description="Number of actors in this group (each loads the model once).")
    num_cpus: float | None = Field(
        default=None, gt=0,
        description="CPUs reserved per actor; also its torch thread count. Default: 1 for a GPU group; for a "
        "CPU group, the largest node's CPUs divided among that group's actors.")
    num_gpus: float = Field(default=0, ge=0, description="GPUs reserved per actor (0: a CPU group).")
    accelerator_type: str | None = Field(
        default=None, description="Ray accelerator type the actors must run on, e.g. 'H100', 'A10G' (the "
        "nodes advertise it); with num_gpus > 0.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray custom resources per actor, e.g. {'spot_node': 1}.")
    device: str | None = Field(default=None, description="Torch device for these actors; default: model.device.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        default=None, description="Dtype for these actors; default: model.dtype. Greedy outputs can differ "
        "between dtypes, so mixing dtypes in one job makes a row's output depend on its group.")
    batch_size: int | Literal["auto"] = Field(
        default=8, description="Rows decoded together; 'auto' measures throughput at a few batch sizes (up to "
        "shard_size) on the actor's own device and keeps the smallest within 10% of the best.")
    latency_profile: str | None = Field(
        default=None, description="A latency profile JSON (from profiling.latency) to plan with instead of "
        "timing this device: one measured on another machine of the same kind, or a simulated device.")

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("batch_size must be at least 1, or 'auto'")
        return value


class FaultsConfig(BaseModel):
    """What happens when workers die."""

    model_config = ConfigDict(extra="forbid")

    max_restarts: int = Field(default=3, ge=-1, description="Times Ray restarts an actor that died (-1: always).")
    max_shard_attempts: int = Field(
        default=3, ge=1, description="Workers that may die on one shard before its rows are written with a "
        "`worker_died` error (so a row that kills every worker cannot stall the job).")


class JobConfig(BaseModel):
    """Everything one run of `jobs/run.py` needs."""

    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(
        default=None,
        description="JSONL or Parquet file (or a directory of them), a local path or a URI such as "
        "s3://bucket/prefix/, with rows of `id` plus either `messages` (a chat) or `prompt` (raw text). "
        "Default: the embedded demo prompts.",
    )
    output: str = Field(
        default=DEMO_OUTPUT,
        description="Directory (a local path or a URI such as s3://bucket/prefix/) for the output Parquet files "
        "and summary.json. Running again into the same "
        "directory resumes: rows already written are skipped. Under `ray job submit`, give an absolute "
        "path: a relative one lands in the job's working directory.",
    )
    shard_size: int = Field(
        default=64, ge=1, description="Rows per unit of work: a worker pulls one shard at a time, decodes it "
        "in batches of its own batch size, and the driver writes it as one Parquet file.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model to load, and how.")
    decoding: DecodingConfig = Field(default_factory=DecodingConfig, description="How to decode.")
    workers: list[WorkerGroup] = Field(
        default_factory=lambda: [WorkerGroup()], min_length=1,
        description="Worker groups; every actor of every group pulls shards from one queue.")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Restarts and retries.")
    wait_for_workers: bool = Field(
        default=False, description="Hand out no shard until every worker has started (or failed): every device "
        "then gets a share of the work, as a cost study needs. Default: the first ready worker starts at once.")

    @field_validator("workers")
    @classmethod
    def _unique_group_names(cls, groups: list[WorkerGroup]) -> list[WorkerGroup]:
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"worker group names must be unique, got {names}")
        return groups

    def input_uri(self) -> str:
        """The input as a local path or a URI (jobs/storage.py)."""
        return self.input or str(DEMO_INPUT)

    def group_model(self, group: WorkerGroup) -> ModelConfig:
        """The model config as one group's actors load it."""
        overrides = {key: getattr(group, key) for key in ("device", "dtype") if getattr(group, key) is not None}
        return self.model.model_copy(update=overrides)


# CLI flag (argparse dest) -> path in JobConfig.
CLI_FIELDS: dict[str, tuple[str, ...]] = {
    "input": ("input",),
    "output": ("output",),
    "shard_size": ("shard_size",),
    "model": ("model", "model"),
    "dtype": ("model", "dtype"),
    "device": ("model", "device"),
    "attn_implementation": ("model", "attn_implementation"),
    "cache_dir": ("model", "cache_dir"),
    "cpu_linear": ("model", "cpu_linear"),
    "decoding": ("decoding", "method"),
    "batching": ("decoding", "batching"),
    "compile": ("decoding", "compile"),
    "cuda_graphs": ("decoding", "cuda_graphs"),
    "max_new_tokens": ("decoding", "max_new_tokens"),
    "prompts": ("decoding", "prompts"),
    "num_prompt_tokens": ("decoding", "num_prompt_tokens"),
    "tree_nodes": ("decoding", "tree_nodes"),
    "tree_sizing": ("decoding", "tree_sizing"),
    "prune_head": ("decoding", "prune_head"),
    "keep_top_k": ("decoding", "keep_top_k"),
    "profile_budget_s": ("decoding", "profile_budget_s"),
    "temperature": ("decoding", "sampling", "temperature"),
    "top_p": ("decoding", "sampling", "top_p"),
    "top_k": ("decoding", "sampling", "top_k"),
    "stop": ("decoding", "sampling", "stop"),
    "seed": ("decoding", "sampling", "seed"),
    "n": ("decoding", "sampling", "n"),
}
# CLI flags that set a field of the one worker group (refused when the config lists several).
GROUP_FIELDS: dict[str, str] = {
    "batch_size": "batch_size",
    "num_workers": "count",
    "num_cpus_per_worker": "num_cpus",
    "num_gpus_per_worker": "num_gpus",
}


def build_config(config_file: str | Path | None, overrides: dict[str, Any]) -> JobConfig:
    """The YAML file's values (if any), then the CLI's `overrides` (argparse dests; None = not given)."""
    data: dict[str, Any] = {}
    if config_file:
        loaded = yaml.safe_load(Path(config_file).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: the config file must hold a mapping")
        data = loaded or {}
    for dest, value in overrides.items():
        if value is None:
            continue
        if dest in GROUP_FIELDS:
            groups = data.setdefault("workers", [{}])
            if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
                raise ValueError(f"--{dest.replace('_', '-')} sets the one worker group's {GROUP_FIELDS[dest]}, "
                                 f"but the config lists {len(groups) if isinstance(groups, list) else 'no'} "
                                 "groups: set it per group in the config file")
            groups[0][GROUP_FIELDS[dest]] = value
            continue
        *parents, leaf = CLI_FIELDS[dest]
        node = data
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"config key {'.'.join(parents)!r} must be a mapping")
        node[leaf] = value
    return JobConfig.model_validate(data)
