"""The job's configuration: one pydantic model, filled from an optional YAML file and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from workers.engine import DecodingConfig
from workers.models import ModelConfig

DEMO_INPUT = Path(__file__).resolve().parent / "demo_prompts.jsonl"
DEMO_OUTPUT = "outputs/demo"


class WorkersConfig(BaseModel):
    """The pool of Ray actors that decode batches."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(default=1, ge=1, description="Number of decode actors (each loads the model once).")
    num_cpus_per_worker: float | None = Field(
        default=None,
        gt=0,
        description="CPUs reserved per actor; also its torch thread count. Default: the cluster's "
        "CPUs divided among the workers (at least 1).",
    )
    num_gpus_per_worker: float = Field(default=0, ge=0, description="GPUs reserved per actor (0 for CPU).")
    max_restarts: int = Field(default=1, ge=0, description="Times Ray restarts an actor that died.")
    max_task_retries: int = Field(
        default=2, ge=0, description="Times Ray retries a batch whose actor died while decoding it."
    )


class JobConfig(BaseModel):
    """Everything one run of `jobs/run.py` needs."""

    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(
        default=None,
        description="JSONL or Parquet file (or a directory of them) with rows of `id` plus either "
        "`messages` (a chat) or `prompt` (raw text). Default: the embedded demo prompts.",
    )
    output: str = Field(
        default=DEMO_OUTPUT,
        description="Directory for the output Parquet files and summary.json. Under `ray job "
        "submit`, give an absolute path: a relative one lands in the job's working directory.",
    )
    batch_size: int = Field(default=8, ge=1, description="Rows per batch handed to one actor.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model to load, and how.")
    decoding: DecodingConfig = Field(default_factory=DecodingConfig, description="How to decode.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="The actor pool.")

    def input_path(self) -> Path:
        return Path(self.input) if self.input else DEMO_INPUT


# CLI flag (argparse dest) -> path in JobConfig.
CLI_FIELDS: dict[str, tuple[str, ...]] = {
    "input": ("input",),
    "output": ("output",),
    "batch_size": ("batch_size",),
    "model": ("model", "model"),
    "dtype": ("model", "dtype"),
    "device": ("model", "device"),
    "attn_implementation": ("model", "attn_implementation"),
    "cache_dir": ("model", "cache_dir"),
    "decoding": ("decoding", "method"),
    "max_new_tokens": ("decoding", "max_new_tokens"),
    "prompts": ("decoding", "prompts"),
    "num_prompt_tokens": ("decoding", "num_prompt_tokens"),
    "tree_nodes": ("decoding", "tree_nodes"),
    "profile_budget_s": ("decoding", "profile_budget_s"),
    "num_workers": ("workers", "num_workers"),
    "num_cpus_per_worker": ("workers", "num_cpus_per_worker"),
    "num_gpus_per_worker": ("workers", "num_gpus_per_worker"),
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
        *parents, leaf = CLI_FIELDS[dest]
        node = data
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"config key {'.'.join(parents)!r} must be a mapping")
        node[leaf] = value
    return JobConfig.model_validate(data)
