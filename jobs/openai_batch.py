"""OpenAI Batch API files, in and out: the format dataset builders already hold their requests in.

Contract (docs/operations.md#openai-batch-files):
- In: each line ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}``
  becomes a native row (``request_to_row``): ``custom_id`` its id, the body's ``messages`` or ``prompt`` (a string
  or a list of token ids), and its sampling fields as ``sampling_params``: ``max_completion_tokens`` (else
  ``max_tokens``), ``temperature``, ``top_p``, ``n``, ``stop``, ``seed`` and vLLM's ``top_k``. Where the body is
  silent, the OpenAI defaults hold, as in vLLM's ``run-batch``: temperature 1, top_p 1, n 1. ``n > 1`` at
  temperature 0 gives n identical greedy choices, decoded once. ``model`` is echoed in the response and otherwise
  ignored, as is ``user``. A field the job cannot honour (``logprobs``, ``tools``, ``response_format``,
  ``logit_bias``, ``stream``, ...; a no-op value such as ``stream: false`` is fine) or a malformed request gives
  that row a typed error (``request_error``), which the worker reports; the other rows are unaffected.
- Out: one result line per request, ``{"id", "custom_id", "response": {"status_code": 200, "request_id", "body"},
  "error": null}`` with a ``chat.completion`` or ``text_completion`` body (choices in index order, finish_reason,
  usage), or ``"response": null`` and ``"error": {"code", "message"}`` for a failed row. ``results-<part>.jsonl``
  lies beside each Parquet part, written atomically from it; ``reconcile_results`` makes the set of result files
  match the set of parts (a resumed job's, or ``python -m jobs.export``), so each ``custom_id`` is in exactly one.
  Ids are derived from the ``custom_id``, so a rerun writes the same lines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from jobs.storage import Location

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
SAMPLING_FIELDS = {"max_completion_tokens", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "top_k"}
IGNORED_FIELDS = {"model", "user"}  # echoed (model) or without effect on the output
# Fields the job cannot honour, accepted only at a value that asks for nothing.
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "stream": (False, None), "logprobs": (False, None), "top_logprobs": (None, 0), "echo": (False, None),
    "presence_penalty": (0, None), "frequency_penalty": (0, None), "repetition_penalty": (1, None),
    "best_of": (1, None), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,), "functions": (None, []), "response_format": (None, {"type": "text"}),
    "suffix": (None, ""), "stream_options": (None,), "store": (None, False), "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}
RESULTS_PREFIX, RESULTS_SUFFIX = "results-", ".jsonl"


def is_request(obj: dict) -> bool:
    """Whether a JSONL object is a Batch API request line (what auto-detection looks at)."""
    return "custom_id" in obj and "body" in obj


def request_to_row(obj: dict) -> dict[str, Any]:
    """A native row for one request line: ``id``, ``messages`` or ``prompt``, ``sampling_params``, and ``request``
    ({endpoint, model, n}); a problem of this request alone goes in ``request_error`` ({code, message})."""
    row: dict[str, Any] = {"id": obj.get("custom_id")}
    try:
        _convert(obj, row)
    except RequestError as exc:
        row["request_error"] = {"code": exc.code, "message": str(exc)}
    return row


class RequestError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> RequestError:
    return RequestError("invalid_request", message)


def _convert(obj: dict, row: dict[str, Any]) -> None:
    if obj.get("method", "POST") != "POST":
        raise _invalid(f"method must be POST, got {obj.get('method')!r}")
    endpoint = ENDPOINTS.get(obj.get("url"))
    if endpoint is None:
        raise _invalid(f"url {obj.get('url')!r} is not one of {sorted(ENDPOINTS)}")
    body = obj["body"]
    if not isinstance(body, dict):
        raise _invalid(f"body must be an object, got {type(body).__name__}")
    prompt_key = "messages" if endpoint == "chat" else "prompt"
    for key, value in body.items():
        if key in SAMPLING_FIELDS or key in IGNORED_FIELDS or key == prompt_key:
            continue
        if key in NO_OP_VALUES and any(_same(value, v) for v in NO_OP_VALUES[key]):
            continue
        raise RequestError("unsupported_field", f"body field {key!r} (= {json.dumps(value)[:80]}) is not supported "
                           f"by this job; remove it to decode the request")
    model = body.get("model")
    row["request"] = {"endpoint": endpoint, "model": model if isinstance(model, str) else None, "n": 1}
    if endpoint == "chat":
        row["messages"] = _messages(body.get("messages"))
    else:
        row["prompt"] = _prompt(body.get("prompt"))
    params: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}  # the OpenAI defaults
    for key in ("temperature", "top_p", "top_k", "seed", "stop"):
        if body.get(key) is not None:
            params[key] = body[key]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        params["max_new_tokens"] = limit
    n = body.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _invalid(f"n must be a positive integer, got {n!r}")
        if params["temperature"] == 0:
            row["request"]["n"] = n  # n identical greedy choices: decoded once, written n times
        else:
            params["n"] = n
    row["sampling_params"] = params


def _same(value: Any, no_op: Any) -> bool:
    """``value`` is the no-op value (a bool only equal to a bool: False is not 0 here, nor 1 True)."""
    if no_op is None or isinstance(no_op, bool) or isinstance(value, bool):
        return value is no_op
    return value == no_op


def _messages(messages: Any) -> list[dict[str, str]]:
    """The chat messages with each content as one string (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("body.messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid(f"body.messages[{i}] must be an object with a string 'role'")
        for key in message:
            if key not in ("role", "content", "name"):
                raise RequestError("unsupported_field", f"body.messages[{i}].{key} is not supported by this job")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError("unsupported_field", f"body.messages[{i}].content[{j}] of type {kind!r}: "
                                       "only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _invalid(f"body.messages[{i}].content must be a string or a list of text parts")
        out.append({"role": message["role"], "content": content})
    return out


def _prompt(prompt: Any) -> str | list[int]:
    """One prompt: a string, or a list of token ids (a list holding one of these is that one)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise _invalid(f"body.prompt holds {len(prompt)} prompts: one request, one prompt (split them into "
                       "requests of their own)")
    raise _invalid("body.prompt must be a string or a list of token ids")


# -- results ------------------------------------------------------------------------------------------------------
def _digest(custom_id: str) -> str:
    return hashlib.sha256(custom_id.encode()).hexdigest()[:24]


def result_lines(records: Iterable[dict[str, Any]]) -> list[str]:
    """One Batch API result line per request, from its output records (every completion of a request together,
    in sample_index order, as a part holds them)."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_id.setdefault(record["id"], []).append(record)
    return [json.dumps(result_line(rows), ensure_ascii=False) for rows in by_id.values()]


def result_line(rows: list[dict[str, Any]]) -> dict[str, Any]:
    first = rows[0]
    custom_id, digest = first["id"], _digest(first["id"])
    line: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": custom_id}
    if first.get("error"):
        return {**line, "response": None, "error": {"code": first["error"]["code"],
                                                     "message": first["error"]["message"]}}
    request = first.get("request") or {}
    chat = request.get("endpoint", "chat") == "chat"
    rows = sorted(rows, key=lambda r: r["sample_index"])
    copies = (request.get("n") or 1) if len(rows) == 1 else 1  # n greedy choices: one row, written n times
    choices = []
    for row in rows * copies:
        choice: dict[str, Any] = {"index": len(choices), "finish_reason": row["finish_reason"], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": row["output_text"]}
        else:
            choice["text"] = row["output_text"]
        choices.append(choice)
    completion = sum(row["num_output_tokens"] for row in rows) * copies
    finished = max((r["finished_at"] for r in rows if r.get("finished_at")), default=None)
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{digest}", "object": "chat.completion" if chat else
            "text_completion", "created": int(finished.timestamp()) if finished else 0,
            "model": request.get("model") or first["model_id"], "choices": choices,
            "usage": {"prompt_tokens": first["prompt_tokens"], "completion_tokens": completion,
                      "total_tokens": first["prompt_tokens"] + completion}}
    return {**line, "response": {"status_code": 200, "request_id": f"req_{digest}", "body": body}, "error": None}


def results_name(part_name: str) -> str:
    """``results-<part>.jsonl`` for ``part-<...>.parquet``."""
    return RESULTS_PREFIX + part_name.rsplit(".", 1)[0] + RESULTS_SUFFIX


def write_results(out: Location, part_name: str, records: list[dict[str, Any]]) -> Location:
    """The part's requests' result lines, published atomically beside it."""
    where = out.child(results_name(part_name))
    lines = result_lines(records)
    where.write_bytes_atomically(("\n".join(lines) + "\n" if lines else "").encode())
    return where


def reconcile_results(out: Location) -> tuple[int, int]:
    """Make the result files match the parts: write those a part lacks (a run killed between the two, parts
    rewritten at a resume, an output written without them) and delete those whose part is gone. Returns
    (written, deleted)."""
    import pyarrow.parquet as pq

    from jobs.output import parts

    names = {p.name: p for p in parts(out)}
    wanted = {results_name(name): name for name in names}
    existing = {f.name for f in out.files() if f.name.startswith(RESULTS_PREFIX) and f.name.endswith(RESULTS_SUFFIX)}
    written = deleted = 0
    for name in sorted(set(wanted) - existing):
        part = names[wanted[name]]
        records = pq.read_table(part.path, filesystem=part.fs).to_pylist()
        write_results(out, part.name, records)
        written += 1
    for name in sorted(existing - set(wanted)):
        out.child(name).delete()
        deleted += 1
    return written, deleted
