"""The job's output record (one per completion of an input row) and the typed errors a row can end with.

`RowOutput` is the output schema: its fields are the Parquet columns, with their types and meanings.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    """Why a row produced no output. Stored as the `code` of the `error` struct column."""

    INVALID_ROW = "invalid_row"
    INVALID_SAMPLING = "invalid_sampling_params"
    EMPTY_PROMPT = "empty_prompt"
    PROMPT_TOO_LONG = "prompt_too_long"
    ENCODE_FAILED = "encode_failed"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_FIELD = "unsupported_field"
    DECODE_FAILED = "decode_failed"
    WORKER_DIED = "worker_died"


ERROR_MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.INVALID_ROW: "neither or both of `messages` and `prompt`, or wrong types",
    ErrorCode.INVALID_SAMPLING: "the row's `sampling_params` are malformed or out of range",
    ErrorCode.EMPTY_PROMPT: "nothing left after encoding",
    ErrorCode.PROMPT_TOO_LONG: "longer than the job's prompt budget (`--max-prompt-tokens`), or no room left in "
                               "the model's context",
    ErrorCode.ENCODE_FAILED: "the tokenizer or chat template raised",
    ErrorCode.INVALID_REQUEST: "an OpenAI batch request that is malformed (its url, method, body, messages or "
                               "prompt; several prompts in one request)",
    ErrorCode.UNSUPPORTED_FIELD: "an OpenAI batch request with a body field the job cannot honour (`logprobs`, "
                                 "`tools`, `response_format`, ...), named in the message",
    ErrorCode.DECODE_FAILED: "the decoder raised on this row alone",
    ErrorCode.WORKER_DIED: "every worker that took this row's shard died while decoding it "
                           "(`faults.max_shard_attempts` of them)",
}


@dataclass(frozen=True)
class RowError:
    code: ErrorCode
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


def column(arrow: str, doc: str, default: Any = MISSING, *, factory: Any = MISSING, nullable: bool = True) -> Any:
    """A ``RowOutput`` field: its output column's Arrow type, named (jobs/output.py maps the names to types),
    and what it means (docs/output-schema.md is generated from these)."""
    return field(default=default, default_factory=factory, metadata={"arrow": arrow, "doc": doc, "nullable": nullable})


@dataclass
class RowOutput:
    """One output record, the single source of the output schema: each field is a Parquet column, in this
    order, with the type and meaning its ``column`` gives."""

    id: str = column("string", "the input row's id (integers become strings)", nullable=False)
    sample_index: int = column("int32", "which completion of the row (0 to n-1; 0 for a row that failed before "
                               "decoding); (`id`, `sample_index`) is unique", 0, nullable=False)
    output_text: str | None = column("string", "the decoded completion, special tokens skipped (null on error)",
                                     None)
    output_token_ids: list[int] = column("list<int32>", "the new tokens; an EOS is included when one was emitted",
                                         factory=list)
    num_output_tokens: int = column("int32", "`len(output_token_ids)`", 0)
    num_steps: int = column("int32", "forward passes that emitted tokens for this row", 0)
    tau: float | None = column("float64", "`num_output_tokens / num_steps` (null on error)", None)
    prompt_tokens: int = column("int32", "length of the encoded prompt", 0)
    finish_reason: str | None = column("string", "`stop` (EOS or a stop string emitted) or `length` (hit "
                                       "max_new_tokens); null on error", None)
    stop_reason: str | None = column("string", "the stop string that ended the completion (null: EOS, length or "
                                     "error)", None)
    error: RowError | None = column("error", "null, or why this row produced nothing: {code, message}, code one "
                                    "of `ErrorCode`", None)
    latency_s: float = column("float64", "seconds from taking a decode slot to finishing (0: failed before "
                              "decoding)", 0.0)
    decoding: str = column("string", "`ppd` or `vanilla`", "")
    sampling_params: dict[str, Any] | None = column(
        "sampling", "the effective temperature, top_p, top_k, max_new_tokens, stop, seed (resolved) and n; null "
        "when they were invalid", None)
    request: dict[str, Any] | None = column(
        "request", "how the row was asked for, as an OpenAI batch result needs it: `endpoint` (`chat` for "
        "`messages`, `completions` for `prompt`), `model` (an OpenAI request's, echoed) and `n` (greedy choices "
        "written per decoded row)", None)
    model_id: str = column("string", "the model's id or path", "")
    model_hash: str = column("string", "sha256 of the model's weights", "")
    prompts_hash: str | None = column("string", "sha256 of the prompt-token artifact (null: vanilla or untrained)",
                                      None)
    tree_hash: str | None = column("string", "identifies the tree set the row was decoded with (null: vanilla)",
                                   None)
    device: str = column("string", "the worker's device, e.g. `NVIDIA H100 80GB HBM3` or `cpu: AMD EPYC (2 "
                         "threads)`", "")
    dtype: str = column("string", "the model's dtype on that worker", "")
    numeric_path: str = column("string", "the kernels that computed the row (workers/numerics.py): device type, "
                               "dtype, attention kernel, linear layers, e.g. `cpu float32 attn=sdpa "
                               "linear=weight_stationary<12`", "")
    batch_fallback: bool = column("bool", "the row's batch failed and it was decoded alone: a bug in the batched "
                                  "decoder (counted in summary.json)", False)
    worker: str = column("string", "the actor that decoded the row: `group/index pid N on host`", "")
    worker_group: str = column("string", "that actor's worker group", "")
    config_hash: str = column("string", "hash of the output-shaping settings, as in job.json (jobs/resume.py)", "")
    started_at: datetime | None = column("timestamp", "when the row took a decode slot (UTC)", None)
    finished_at: datetime | None = column("timestamp", "when it finished (UTC)", None)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["error"] = self.error.to_dict() if self.error else None
        return record


def row_error(row: Any) -> RowError | None:
    """Why a row cannot be decoded as given (before encoding), or None when it is well formed."""

    def invalid(message: str) -> RowError:
        return RowError(ErrorCode.INVALID_ROW, message)

    if not isinstance(row, dict):
        return invalid(f"row must be an object, got {type(row).__name__}")
    if isinstance(row.get("request_error"), dict):  # found reading an OpenAI batch request (jobs/openai_batch.py)
        problem = row["request_error"]
        return RowError(ErrorCode(problem["code"]), str(problem["message"]))
    has_messages = row.get("messages") is not None
    has_prompt = row.get("prompt") is not None
    if has_messages == has_prompt:
        return invalid(
            "row has both 'messages' and 'prompt'; give exactly one"
            if has_messages
            else "row has neither 'messages' nor 'prompt'; give exactly one"
        )
    if has_prompt:
        prompt = row["prompt"]
        ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not isinstance(prompt, str) and not ids:
            return invalid(f"'prompt' must be a string or a list of token ids, got {type(prompt).__name__}")
        return None
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return invalid("'messages' must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return invalid(f"messages[{i}] must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return invalid(f"messages[{i}].{key} must be a string")
    return None
