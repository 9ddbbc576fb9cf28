"""The job's configuration: one pydantic model, filled from an optional YAML file and CLI flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.fields import FieldInfo

from workers.configs import AdaptationConfig, DecodingConfig, ModelConfig

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
    input_format: Literal["auto", "native", "openai-batch"] = Field(
        default="auto", description="'native': rows of `id`, `messages` or `prompt`, `sampling_params`. "
        "'openai-batch': JSONL lines of OpenAI Batch API requests (`custom_id`, `method`, `url`, `body`; "
        "/v1/chat/completions or /v1/completions). 'auto': a JSONL file whose first line is such a request is read "
        "as one (every line must be).")
    output_format: Literal["parquet", "openai-batch"] = Field(
        default="parquet", description="'openai-batch': also write each Parquet part's requests as Batch API "
        "result lines (`results-<part>.jsonl`, one line per request), beside it.")
    shard_size: int = Field(
        default=64, ge=1, description="Rows per unit of work: a worker pulls one shard at a time, decodes it "
        "in batches of its own batch size, and publishes it as one Parquet file.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model to load, and how.")
    decoding: DecodingConfig = Field(default_factory=DecodingConfig, description="How to decode.")
    workers: list[WorkerGroup] = Field(
        default_factory=lambda: [WorkerGroup()], min_length=1,
        description="Worker groups; every actor of every group pulls shards from one queue.")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Restarts and retries.")
    adaptation: AdaptationConfig = Field(default_factory=AdaptationConfig, description="Prompt tokens learned "
                                         "from the job's own first rows.")
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


@dataclass(frozen=True)
class Flag:
    """A command-line flag of jobs/run.py that sets one JobConfig key. Its choices, type and default come from
    the key's field in the config models (``add_config_flags``)."""

    path: tuple[str, ...]  # the key in JobConfig; ("workers", key): the one worker group's
    help: str
    metavar: str | None = None
    switch: bool = False  # a bool key the flag turns on (no value)
    choices: tuple[str, ...] | None = None  # instead of the field's Literal values
    parse: Callable[[str], Any] | None = None  # instead of the field's type


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


# argparse dest -> the JobConfig key it sets. The one source of the job's config flags: jobs/run.py adds them,
# build_config applies them, docs/options.md lists them.
CONFIG_FLAGS: dict[str, Flag] = {
    "input": Flag(("input",), "JSONL or Parquet file (or a directory of them), local or a URI such as "
                  "s3://bucket/prefix/; default: the demo", "PATH|URI"),
    "output": Flag(("output",), "output directory or URI", "DIR|URI"),
    "shard_size": Flag(("shard_size",), "rows per unit of work and per part file", "N"),
    "input_format": Flag(("input_format",), "native rows, OpenAI Batch API request lines, or auto (by a JSONL "
                         "file's first line)"),
    "output_format": Flag(("output_format",), "openai-batch: also Batch API result lines beside the Parquet parts"),
    "model": Flag(("model", "model"), "'default' (the packaged SmolLM2-135M-Instruct) or a model directory"),
    "dtype": Flag(("model", "dtype"), "weight and compute dtype (auto: float32 on CPU, bfloat16 on CUDA)"),
    "device": Flag(("model", "device"), "'auto', 'cpu', 'cuda', 'cuda:0', ..."),
    "attn_implementation": Flag(("model", "attn_implementation"), "attention kernel passed to transformers"),
    "cache_dir": Flag(("model", "cache_dir"), "where converted model weights are cached", "DIR"),
    "cpu_linear": Flag(("model", "cpu_linear"), "linear layers on a CPU in float32 (auto: W @ x.T for a decode "
                       "step's few rows where this CPU measures it faster; weight_stationary: below 10 rows, "
                       "unmeasured; torch: nn.Linear as it is)"),
    "decoding": Flag(("decoding", "method"), "decoding method"),
    "batching": Flag(("decoding", "batching"), "continuous: a finished row's slot takes the next row at the next "
                     "step; static: batches of --batch-size rows, each run until its longest row ends"),
    "compile": Flag(("decoding", "compile"), "torch.compile the decode step at fixed shapes (minutes of start-up "
                    "on a CPU); auto: where the job's expected decode time makes the compile time pay"),
    "cuda_graphs": Flag(("decoding", "cuda_graphs"), "on a CUDA device, replay the decode step from captured CUDA "
                        "graphs (default: on)", choices=("on", "off")),
    "max_new_tokens": Flag(("decoding", "max_new_tokens"), "most new tokens per row", "N"),
    "temperature": Flag(("decoding", "sampling", "temperature"), "sampling temperature (0: greedy)", "T"),
    "top_p": Flag(("decoding", "sampling", "top_p"), "nucleus sampling: keep the most probable tokens up to mass P",
                  "P"),
    "top_k": Flag(("decoding", "sampling", "top_k"), "sample from the K most probable tokens (0: all)", "K"),
    "stop": Flag(("decoding", "sampling", "stop"), "a stop string (repeat for several)", "TEXT"),
    "seed": Flag(("decoding", "sampling", "seed"), "the job's seed: rows without their own seed derive theirs "
                 "from it and their id", "S"),
    "n": Flag(("decoding", "sampling", "n"), "completions per prompt, one output row each", "N"),
    "prompts": Flag(("decoding", "prompts"), "prompt-token artifact directory, 'untrained', or 'auto' (the "
                    "artifact shipped for the model, else untrained)", "PATH"),
    "tree_nodes": Flag(("decoding", "tree_nodes"), "fix the tree to N candidate nodes (trained prompts)", "N"),
    "tree_sizing": Flag(("decoding", "tree_sizing"), "propd: the tree re-sized every step (ProPD); static: one "
                        "tree per worker; auto: propd when the prompt tokens have an acceptance table and "
                        "--tree-nodes is not given"),
    "prune_head": Flag(("decoding", "prune_head"), "ProPD early pruning: 'none', 'auto' (the head shipped for the "
                       "model) or a prune-head artifact directory", "DIR"),
    "keep_top_k": Flag(("decoding", "keep_top_k"), "children kept per node by pruning (default: the head's)", "K"),
    "profile_budget_s": Flag(("decoding", "profile_budget_s"), "seconds each worker may spend profiling its "
                             "device (default: 60 CPU, 30 GPU)", "S"),
    "adapt_prompts": Flag(("adaptation", "mode"), "learn prompt tokens from the job's first rows and decode the "
                          "rest with them (auto: only where this device's profile says trees pay)"),
    "gpu_memory_utilization": Flag(("decoding", "memory", "gpu_memory_utilization"), "share of a GPU's memory a "
                                   "worker may use (weights, activations, graphs, KV)", "F"),
    "max_prompt_tokens": Flag(("decoding", "memory", "max_prompt_tokens"), "prompt budget: longer prompts end with "
                              "prompt_too_long; with --max-new-tokens it sets each slot's KV capacity", "N"),
    "num_prompt_tokens": Flag(("decoding", "num_prompt_tokens"), "k when prompt tokens come from embeddings", "K"),
    "batch_size": Flag(("workers", "batch_size"), "rows per batch, or auto", "N|auto", parse=_int_or_auto),
    "num_workers": Flag(("workers", "count"), "decode actors", "N"),
    "num_cpus_per_worker": Flag(("workers", "num_cpus"), "CPUs per actor (default: the largest node's CPUs / "
                                "workers)", "N"),
    "num_gpus_per_worker": Flag(("workers", "num_gpus"), "GPUs per actor", "N"),
}


def config_field(path: tuple[str, ...]) -> FieldInfo:
    """The pydantic field of a JobConfig key (``("workers", key)``: a WorkerGroup's)."""
    model: type[BaseModel] = JobConfig
    for key in path[:-1]:
        model = WorkerGroup if key == "workers" else model.model_fields[key].annotation
    return model.model_fields[path[-1]]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The CONFIG_FLAGS as options (dest = the key in CONFIG_FLAGS, None when not given); the worker group's
    flags in a group of their own."""
    group = parser.add_argument_group("the worker group", "with one worker group; list several groups in --config")
    for dest, flag in CONFIG_FLAGS.items():
        info = config_field(flag.path)
        union = get_origin(info.annotation) in (Union, UnionType)
        kinds = [a for a in get_args(info.annotation) if a is not type(None)] if union else [info.annotation]
        options: dict[str, Any] = {"dest": dest, "help": flag.help}
        if flag.metavar:
            options["metavar"] = flag.metavar
        if flag.switch:
            options.update(action="store_const", const=True)
        elif flag.choices or get_origin(kinds[0]) is Literal:
            options["choices"] = list(flag.choices or get_args(kinds[0]))
        elif get_origin(kinds[0]) is list:
            options.update(action="append", type=get_args(kinds[0])[0])
        else:
            options["type"] = flag.parse or kinds[0]
        default = info.get_default(call_default_factory=True)
        if default is not None and default != [] and not flag.switch and "default:" not in flag.help:
            options["help"] += f" (default: {default})"
        target = group if flag.path[0] == "workers" else parser
        target.add_argument("--" + dest.replace("_", "-"), **options)


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
        *parents, leaf = CONFIG_FLAGS[dest].path
        if parents == ["workers"]:
            groups = data.setdefault("workers", [{}])
            if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
                raise ValueError(f"--{dest.replace('_', '-')} sets the one worker group's {leaf}, "
                                 f"but the config lists {len(groups) if isinstance(groups, list) else 'no'} "
                                 "groups: set it per group in the config file")
            groups[0][leaf] = value
            continue
        node = data
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"config key {'.'.join(parents)!r} must be a mapping")
        node[leaf] = value
    return JobConfig.model_validate(data)
