"""Row -> result logic for the batch job, free of Ray (and of pyarrow) so it can be tested alone.

A `DecodeEngine` owns one loaded model and one decoder. `run_batch(rows)` validates and encodes each
row, decodes the valid ones together, and returns one `RowOutput` per input row, in input order.
A bad row never fails the batch: it comes back with `error` set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from decoding import PPDDecoder, PromptTokens, RowResult, TreeSet, VanillaDecoder, default_tree_set
from profiling.device import identify
from profiling.tree_builder import choose_budget, estimate
from profiling.trees import fixed_size_tree_set
from workers.artifacts import find_shipped_artifact, load_prompt_tokens
from workers.models import LoadedModel, ModelConfig, encode_row, load_model, resolve_cache_dir
from workers.profiles import load_or_measure_profile

log = logging.getLogger(__name__)

DecodingMethod = Literal["ppd", "vanilla"]


class DecodingConfig(BaseModel):
    """How each worker decodes."""

    model_config = ConfigDict(extra="forbid")

    method: DecodingMethod = Field(
        default="ppd",
        description="'ppd' (parallel prompt decoding: guess and verify a token tree per step) or "
        "'vanilla' (one token per forward pass). Both are greedy and give identical outputs.",
    )
    max_new_tokens: int = Field(
        default=64,
        ge=1,
        description="Most new tokens generated per row (fewer when the prompt leaves less room "
        "in the model's context).",
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
        "table (untrained prompt tokens, which have none, use a built-in sparse tree).",
    )
    profile_budget_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds a worker may spend timing its decode step at start-up (default: 60 on a "
        "CPU, 30 on a GPU). Profiles are cached per device, model and budget, so a restart reuses them.",
    )
    num_prompt_tokens: int = Field(
        default=3,
        ge=1,
        le=8,
        description="k, the number of prompt tokens, when they are initialised from token "
        "embeddings (an artifact brings its own k).",
    )


@dataclass
class RowOutput:
    """One output record; the field names are the output Parquet columns (see jobs/output.py)."""

    id: str
    output_text: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_output_tokens: int = 0
    num_steps: int = 0
    tau: float | None = None
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    decoding: str = ""
    model_id: str = ""
    latency_s: float = 0.0
    device: str = ""
    tree_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def row_error(row: Any) -> str | None:
    """Why a row cannot be decoded as given (before encoding), or None when it is well formed."""
    if not isinstance(row, dict):
        return f"row must be an object, got {type(row).__name__}"
    has_messages = row.get("messages") is not None
    has_prompt = row.get("prompt") is not None
    if has_messages == has_prompt:
        return (
            "row has both 'messages' and 'prompt'; give exactly one"
            if has_messages
            else "row has neither 'messages' nor 'prompt'; give exactly one"
        )
    if has_prompt:
        if not isinstance(row["prompt"], str):
            return f"'prompt' must be a string, got {type(row['prompt']).__name__}"
        return None
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object, got {type(message).__name__}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"messages[{i}].{key} must be a string"
    return None


class DecodeEngine:
    """A loaded model plus a decoder; turns rows into `RowOutput`s."""

    def __init__(self, loaded: LoadedModel, decoding: DecodingConfig | None = None, *, batch_size: int = 1,
                 cache_dir: str | None = None):
        self.loaded = loaded
        self.config = decoding or DecodingConfig()
        self.batch_size = batch_size
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.device_name = identify(loaded.device, loaded.dtype).readable
        self.tree_info: dict[str, Any] = {}
        self.decoder = self._build_decoder()

    @classmethod
    def from_config(cls, model: ModelConfig, decoding: DecodingConfig, batch_size: int = 1) -> DecodeEngine:
        return cls(load_model(model), decoding, batch_size=batch_size, cache_dir=model.cache_dir)

    def _build_decoder(self):
        lm = self.loaded
        self.prompts_source = None
        if self.config.method == "vanilla":
            return VanillaDecoder(lm.model, eos_token_ids=lm.eos_token_ids)
        artifact = self.config.prompts
        if artifact == "auto":
            shipped = find_shipped_artifact(lm.content_hash)
            artifact = str(shipped) if shipped else "untrained"
            log.info("prompt tokens: %s", artifact)
        self.prompts_source = artifact
        if artifact != "untrained":
            prompt_tokens = load_prompt_tokens(
                artifact, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype
            )
        else:
            prompt_tokens = PromptTokens.from_token_embeddings(
                lm.model,
                k=self.config.num_prompt_tokens,
                n=1,
                base_model_id=lm.model_id,
                base_model_hash=lm.content_hash,
            )
        tree_set = self._choose_tree(prompt_tokens)
        return PPDDecoder(lm.model, prompt_tokens, tree_set=tree_set, eos_token_ids=lm.eos_token_ids)

    def _choose_tree(self, prompt_tokens: PromptTokens) -> TreeSet:
        """The fixed-size tree when asked for; else, with an acceptance table, the tree that the profile of
        this device says is fastest at this batch size; else the built-in default."""
        acceptance = prompt_tokens.meta.extra.get("acceptance")
        k = prompt_tokens.k
        if self.config.tree_nodes:
            if not acceptance:
                raise ValueError("--tree-nodes needs prompt tokens with an acceptance table (a trained artifact)")
            tree_set = fixed_size_tree_set(acceptance, self.config.tree_nodes, k)
            self.tree_info = {"tree": f"fixed, {self.config.tree_nodes} nodes",
                              "predicted_tau": estimate(acceptance, tree_set).expected_tokens}
            return tree_set
        if not acceptance:
            self.tree_info = {"tree": "default (the prompt tokens have no acceptance table)"}
            return default_tree_set(k=k)
        lm = self.loaded
        profile, cached = load_or_measure_profile(
            lm.model, prompt_tokens, model_hash=lm.content_hash, cache_dir=self.cache_dir,
            batch_sizes=sorted({1, self.batch_size}), budget_s=self.config.profile_budget_s)
        slots = profile.measured_slots(self.batch_size)
        choice = choose_budget(acceptance, k, lambda s: profile.step_seconds(self.batch_size, s), slots,
                               n=prompt_tokens.n)
        chosen = choice.chosen
        self.tree_info = {
            "tree": "hardware-aware",
            "tree_budget": chosen.budget,
            "tree_slots": chosen.slots,
            "predicted_tau": chosen.estimate.expected_tokens,
            "predicted_speedup": choice.speedup,
            "predicted_step_s": choice.step_seconds,
            "profile": "cached" if cached else f"measured in {profile.profile_seconds:.1f} s",
        }
        log.info("%s, batch %d: tree of %d slots per row (%s), predicted tau %.2f, predicted %.2fx over plain "
                 "decoding; profile %s", self.device_name, self.batch_size, chosen.slots,
                 [len(t.paths) for t in chosen.tree_set.trees], chosen.estimate.expected_tokens, choice.speedup,
                 self.tree_info["profile"])
        return chosen.tree_set

    def describe(self) -> dict[str, Any]:
        lm = self.loaded
        return {
            "model_id": lm.model_id,
            "model_hash": lm.content_hash,
            "device": self.device_name,
            "torch_device": str(lm.device),
            "dtype": str(lm.dtype).removeprefix("torch."),
            "max_context": lm.max_context,
            "decoding": self.config.method,
            "prompts": self.prompts_source,
            "batch_size": self.batch_size,
            "tree_hash": self.tree_hash,
            **self.tree_info,
        }

    @property
    def tree_hash(self) -> str | None:
        tree_set = getattr(self.decoder, "tree_set", None)
        return tree_set.tree_hash if tree_set is not None else None

    def _encode(self, row: dict) -> list[int]:
        return encode_row(self.loaded.tokenizer, messages=row.get("messages"), prompt=row.get("prompt"))

    def _generate(self, prompts: list[list[int]], budgets: list[int]) -> list[RowResult | Exception]:
        """Decode the prompts together; if the batch fails, decode row by row so one bad row
        does not take its neighbours down."""
        try:
            return list(self.decoder.generate(prompts, max_new_tokens=budgets))
        except Exception as exc:  # noqa: BLE001 - isolated per row below
            if len(prompts) == 1:
                return [exc]
            log.warning("batch of %d failed (%r); retrying row by row", len(prompts), exc)
        results: list[RowResult | Exception] = []
        for prompt, budget in zip(prompts, budgets):
            try:
                results.append(self.decoder.generate([prompt], max_new_tokens=[budget])[0])
            except Exception as exc:  # noqa: BLE001
                results.append(exc)
        return results

    def run_batch(self, rows: list[dict]) -> list[RowOutput]:
        lm = self.loaded
        outputs: list[RowOutput] = []
        pending: list[tuple[RowOutput, list[int], int]] = []  # (output, prompt ids, budget)
        for row in rows:
            row_id = row.get("id") if isinstance(row, dict) else None
            out = RowOutput(id=str(row_id), decoding=self.config.method, model_id=lm.model_id,
                            device=self.device_name, tree_hash=self.tree_hash)
            outputs.append(out)
            error = row_error(row)
            if error is None:
                try:
                    ids = self._encode(row)
                except Exception as exc:  # noqa: BLE001 - any encoding failure is this row's error
                    error = f"could not encode the row: {exc}"
                else:
                    out.prompt_tokens = len(ids)
                    if not ids:
                        error = "prompt is empty after encoding"
                    elif len(ids) >= lm.max_context:
                        error = (
                            f"prompt has {len(ids)} tokens, which leaves no room in the model's "
                            f"max context of {lm.max_context}"
                        )
            if error is not None:
                out.error = error
                continue
            budget = min(self.config.max_new_tokens, lm.max_context - len(ids))
            pending.append((out, ids, budget))

        if not pending:
            return outputs
        start = time.perf_counter()
        results = self._generate([p for _, p, _ in pending], [b for _, _, b in pending])
        latency = time.perf_counter() - start
        for (out, _, _), result in zip(pending, results):
            out.latency_s = latency
            if isinstance(result, Exception):
                out.error = f"decoding failed: {type(result).__name__}: {result}"
                continue
            out.output_token_ids = [int(t) for t in result.token_ids]
            out.num_output_tokens = result.num_tokens
            out.num_steps = result.num_steps
            out.tau = result.tau
            out.finish_reason = getattr(result.finish_reason, "value", result.finish_reason)
            out.output_text = lm.tokenizer.decode(out.output_token_ids, skip_special_tokens=True)
        return outputs
