"""The job's output record (one per completion of an input row) and the typed errors a row can end with.

The field names of `RowOutput` are the output Parquet columns (jobs/output.py holds their types).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    """Why a row produced no output. Stored as the `code` of the `error` struct column."""

    INVALID_ROW = "invalid_row"  # missing/both of messages and prompt, wrong types
    INVALID_SAMPLING = "invalid_sampling_params"  # the row's sampling_params are malformed or out of range
    EMPTY_PROMPT = "empty_prompt"  # nothing left after encoding
    PROMPT_TOO_LONG = "prompt_too_long"  # no room left in the model's context
    ENCODE_FAILED = "encode_failed"  # the tokenizer or chat template raised
    DECODE_FAILED = "decode_failed"  # the decoder raised on this row alone
    WORKER_DIED = "worker_died"  # every worker that took this row's shard died while decoding it


@dataclass(frozen=True)
class RowError:
    code: ErrorCode
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


@dataclass
class RowOutput:
    """One output record; the field names are the output Parquet columns (see jobs/output.py)."""

    id: str
    sample_index: int = 0  # which of the row's n completions (0 for a row that failed before decoding)
    output_text: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_output_tokens: int = 0
    num_steps: int = 0
    tau: float | None = None
    prompt_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | None = None  # the stop string that ended the completion (null: EOS or length)
    error: RowError | None = None
    latency_s: float = 0.0  # seconds from taking a decode slot to finishing (0: failed before decoding)
    decoding: str = ""
    sampling_params: dict[str, Any] | None = None  # the effective parameters (null when they were invalid)
    model_id: str = ""
    model_hash: str = ""
    prompts_hash: str | None = None  # the prompt-token artifact's sha256 (null: vanilla or untrained)
    tree_hash: str | None = None
    device: str = ""
    dtype: str = ""
    numeric_path: str = ""  # the kernels that computed it (workers/numerics.py), e.g. the CPU linear layers'
    batch_fallback: bool = False  # its batch failed and it was decoded alone: a bug in the batched path
    worker: str = ""  # group/index, pid and node of the actor that decoded the row
    worker_group: str = ""
    config_hash: str = ""  # the output-shaping part of the job config (jobs/resume.py)
    started_at: datetime | None = None  # when it took a decode slot, and when it finished (UTC)
    finished_at: datetime | None = None

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
    has_messages = row.get("messages") is not None
    has_prompt = row.get("prompt") is not None
    if has_messages == has_prompt:
        return invalid(
            "row has both 'messages' and 'prompt'; give exactly one"
            if has_messages
            else "row has neither 'messages' nor 'prompt'; give exactly one"
        )
    if has_prompt:
        if not isinstance(row["prompt"], str):
            return invalid(f"'prompt' must be a string, got {type(row['prompt']).__name__}")
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
