"""The workers' configuration models, free of torch: the driver validates a job's configuration (jobs/config.py)
without loading torch, transformers or the decoders (a ~350 MB and ~6 s import it never uses).

Contract: ``ModelConfig`` says which model a worker loads and how, ``DecodingConfig`` how it decodes,
``SamplingConfig`` the job's sampling defaults. The modules that act on them (workers/models.py,
workers/engine.py, workers/sampling.py) import them from here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CpuLinear = Literal["auto", "weight_stationary", "torch"]  # ModelConfig.cpu_linear (workers/cpu_linear.py)
DEFAULT_MODEL_KEYWORD = "default"
CACHE_DIR_ENV = "PPD_CACHE_DIR"
DEVICE_TYPES = {"cpu", "cuda", "mps", "xpu", "hpu", "mtia", "meta", "xla", "privateuseone"}


def _check_stop(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else list(value)
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


def _check_n(n: int, temperature: float) -> None:
    if n > 1 and temperature == 0:
        raise ValueError(f"n = {n} needs temperature > 0: greedy completions of one prompt are all identical")


class SamplingConfig(BaseModel):
    """The job's sampling defaults (`decoding.sampling`); a row's `sampling_params` override them."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(default=0.0, ge=0, description="0: greedy (the default). Above 0: sample from "
                               "softmax(logits / temperature); the output follows plain sampling's distribution.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Sample from the smallest set of most probable "
                         "tokens whose probability reaches top_p (1: all).")
    top_k: int = Field(default=0, ge=-1, description="Sample from the top_k most probable tokens (0 or -1: all).")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion. The output text "
                            "stops before the string; the output tokens end with the token that completed it.")
    seed: int = Field(default=0, description="The job's seed: a row without its own seed gets one derived from "
                      "this and its id.")
    n: int = Field(default=1, ge=1, le=1024, description="Completions per prompt; each is one output row with "
                   "its `sample_index`. More than 1 needs temperature > 0.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return _check_stop(value) if isinstance(value, (str, list)) else value

    @model_validator(mode="after")
    def _n_needs_sampling(self) -> SamplingConfig:
        _check_n(self.n, self.temperature)
        return self


class ModelConfig(BaseModel):
    """Which base model to load, and how."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())  # a misspelt option is an error

    model: str = Field(
        default=DEFAULT_MODEL_KEYWORD,
        description=(
            '"default" for the embedded SmolLM2-135M-Instruct, a path to a local Hugging Face model directory '
            "(config.json + safetensors, Llama family), or a path to a GGUF file."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weight and compute dtype; auto = float32 on CPU, bfloat16 on CUDA."
    )
    device: str = Field(
        default="auto", description='Torch device such as "cpu" or "cuda:0"; auto = cuda if available, else cpu.'
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        default="sdpa", description="Attention kernel passed to transformers."
    )
    cache_dir: str | None = Field(
        default=None,
        description=f"Where de-quantised GGUF models and file hashes are cached; default ${CACHE_DIR_ENV} "
        "or ~/.cache/ppd-batch.",
    )
    cpu_linear: CpuLinear = Field(
        default="auto",
        description="Linear layers on a CPU in float32. weight_stationary multiplies W @ x.T for the few rows of "
        "a decode step, below 10 rows (1.5-2.5x faster steps at batch 1-4 on a 2-thread EPYC; "
        "workers/cpu_linear.py); auto uses W @ x.T below the row count where it stops being faster, or not at "
        "all (nor for models under 32 MB of linear weights), as measured over the model's weights once per kind "
        "of machine (2.5 s on the 2-core VM) and then reused by every worker, restart and later run on that kind "
        "(workers/numerics.py); torch keeps nn.Linear's x @ W.T. Ignored on other devices and dtypes.",
    )

    @field_validator("device")
    @classmethod
    def _device_parses(cls, value: str) -> str:
        # Checked without importing torch (the driver never does): a device type, then an optional index.
        kind, _, index = value.partition(":")
        if value != "auto" and (kind not in DEVICE_TYPES or (index and not index.isdigit())):
            raise ValueError(f"not a torch device: {value!r} (expected 'auto' or one of {sorted(DEVICE_TYPES)}, "
                             "optionally with ':<index>')")
        return value


DecodingMethod = Literal["ppd", "vanilla"]


class MemoryConfig(BaseModel):
    """A worker's memory plan (workers/memory.py): what its KV cache may take, decided before the first step."""

    model_config = ConfigDict(extra="forbid")

    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1,
        description="On a GPU, the share of the device's total memory a worker may use: weights, the widest "
        "step's activations, the CUDA graphs' pool and the KV cache (vLLM's meaning). The KV gets what is left.")
    cpu_memory_share: float = Field(
        default=0.5, gt=0, le=1,
        description="On a CPU, the share of the host's available memory (once the model is loaded) a worker may "
        "use for activations and its KV cache.")
    max_prompt_tokens: int = Field(
        default=2048, ge=1,
        description="The prompt budget: longer prompts end with a prompt_too_long error. With max_new_tokens (and "
        "the model's context) it fixes every slot's KV capacity, allocated once at start-up.")


class DecodingConfig(BaseModel):
    """How each worker decodes."""

    model_config = ConfigDict(extra="forbid")

    batching: Literal["continuous", "static"] = Field(
        default="continuous",
        description="'continuous': a worker keeps batch_size decode slots busy; a finished row's slot takes the next "
        "waiting row at the next step, from the worker's shard or the next one, which it holds before the current one "
        "runs dry. 'static': each shard is decoded in batches of batch_size rows, each batch run until its longest row "
        "ends (for comparisons). The outputs are the same.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Run the decode step through torch.compile at fixed shapes (one graph per slot bucket and tree "
        "set, compiled at first use: minutes on a CPU). 'auto': on a CPU, compile when the worker's share of the "
        "job, decoded eagerly, would take long enough for the speed-up to win back the compile time "
        "(workers/compile_choice.py); 'on', 'off'. On CUDA the step is captured as CUDA graphs instead "
        "(cuda_graphs). true/false mean on/off.",
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value: Any) -> Any:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    cuda_graphs: bool = Field(
        default=True,
        description="On a CUDA device, capture the decode step as one CUDA graph per shape and replay it (the step "
        "is host-bound otherwise). Early pruning's steps stay eager. Ignored on a CPU.",
    )
    method: DecodingMethod = Field(
        default="ppd",
        description="'ppd' (parallel prompt decoding: guess and verify a token tree per step) or "
        "'vanilla' (one token per forward pass). Both give identical outputs, greedy or sampled with a seed.",
    )
    max_new_tokens: int = Field(
        default=64,
        ge=1,
        description="Most new tokens generated per row (fewer when the prompt leaves less room "
        "in the model's context); a row's sampling_params.max_new_tokens overrides it.",
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        description="Sampling defaults (greedy unless temperature > 0); a row's own `sampling_params` "
        "override them.",
    )
    prompts: str = Field(
        default="auto",
        description="Prompt tokens: 'auto' (the artifact shipped in artifacts/prompt_tokens/ for this "
        "model, if any, else untrained), 'untrained' (initialised from the model's token embeddings), "
        "or the directory of a trained prompt-token artifact for the model.",
    )
    tree_nodes: int | None = Field(
        default=None,
        ge=1,
        description="Fix the tree to this many candidate nodes, the most probable paths under the "
        "prompt tokens' acceptance table, every node carrying k prompt tokens (needs a trained artifact). "
        "Default: each worker profiles its device and builds the fastest tree for it from the acceptance "
        "table (untrained prompt tokens, which have none, use a built-in sparse tree; in a job that may learn its "
        "prompt tokens, an empty table: plain decoding until they are learned).",
    )
    profile_budget_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds a worker may spend timing its decode step at start-up (default: 60 on a "
        "CPU, 30 on a GPU). Profiles are cached per device, model and budget, so a restart reuses them.",
    )
    tree_sizing: Literal["auto", "static", "propd"] = Field(
        default="auto",
        description="'static': one tree per worker, chosen at start-up from its latency profile. 'propd': "
        "ProPD dynamic sizing: every step picks the tree with the most expected tokens per predicted second "
        "for the rows then in the batch, from online acceptance and latency statistics seeded by the "
        "artifact and the profile (needs a trained artifact; not with tree_nodes). 'auto': propd when the "
        "prompt tokens carry an acceptance table and tree_nodes is not set, else static.",
    )
    prune_head: str = Field(
        default="none",
        description="ProPD early pruning: 'none'; 'auto' (the head shipped in artifacts/prune_heads/ for this "
        "model, if any, else none); or the directory of a prune-head artifact for the model. After the head's "
        "layer, tree nodes outside their parent's predicted top keep_top_k are dropped with their subtrees, so "
        "the later layers run on fewer slots (ppd only; outputs are unchanged).",
    )
    keep_top_k: int | None = Field(
        default=None,
        ge=1,
        description="A child survives pruning when its token is among its parent's top keep_top_k head "
        "predictions (default: the artifact's).",
    )
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="The worker's memory plan.")
    num_prompt_tokens: int = Field(
        default=3,
        ge=1,
        le=8,
        description="k, the number of prompt tokens, when they are initialised from token "
        "embeddings (an artifact brings its own k).",
    )


class AdaptationConfig(BaseModel):
    """Prompt tokens learned from the job's own first rows (docs/training.md#adaptation-in-the-job)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="'on': a PPD job of at least min_rows rows learns prompt tokens from its first completed rows "
        "and decodes the rest with them, if they pass the gate. 'auto': the same, only where a worker's latency "
        "profile says trees pay at the tau adaptation is expected to reach, and the job is long enough to win the "
        "training time back. 'off': never.")
    min_rows: int = Field(default=200, ge=1, description="Input rows a job needs before it adapts.")
    train_rows: int = Field(default=160, ge=1, description="Completed rows learned from.")
    held_out_rows: int = Field(default=40, ge=1, description="Completed rows held back for the gate's replay.")
    gate_tokens: int = Field(default=64, ge=1, description="The gate replays the decoding of each held-back row's "
                             "first gate_tokens output tokens.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training rows.")
    samples_per_step: int = Field(default=2, ge=1, description="Rows whose gradients add up per step.")
    cuts_per_sample: int = Field(default=24, ge=1, description="Cut points drawn per row and pass.")
    lr: float | None = Field(default=None, gt=0, description="AdamW peak learning rate; default lr_untrained, or "
                             "lr_from_trained when the current prompt tokens were trained.")
    lr_untrained: float = Field(default=1e-2, gt=0, description="Default learning rate from untrained tokens.")
    lr_from_trained: float = Field(default=3e-3, gt=0, description="Default learning rate from trained tokens.")
    seed: int = Field(default=0, description="Seed of the training draws (the rows' order and cuts).")
    timeout_s: float = Field(default=900.0, gt=0, description="Training that runs longer is given up (the job "
                             "goes on with the old prompt tokens).")
    finish_after_last_row: bool = Field(default=False, description="When the job's rows run out while the "
                                        "training runs: wait for it, and publish the tokens that pass the gate for "
                                        "later jobs of the workload (--prompts), instead of dropping it.")
    auto_min_speedup: float = Field(default=1.1, gt=1, description="'auto' adapts only where the worker's profile "
                                    "predicts at least this speed-up over plain decoding at the expected tau.")

    def steps_for(self, rows: int) -> int:
        """Training steps for this many rows: ``epochs`` passes of ``samples_per_step`` rows a step."""
        return max(1, round(self.epochs * rows / self.samples_per_step))
