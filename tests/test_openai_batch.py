"""OpenAI Batch API files in and out (jobs/openai_batch.py): requests mapped onto rows, every error path, result
lines checked against the Batch API's output format and the `openai` package's own types, round trips on both
endpoints (greedy, and sampled with n > 1) equal to the same rows in the native format, and a resumed job's
result files holding each custom_id exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.inputs import InputError, read_rows
from jobs.openai_batch import request_to_row, result_lines
from jobs.output import read_output
from jobs.run import main
from tests.test_job import write_jsonl


def chat(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "my-model", "messages": [{"role": "user", "content": content}], **body}}


def completion(custom_id: str, prompt, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "my-model", "prompt": prompt, **body}}


# -- requests onto rows -------------------------------------------------------------------------------------------
def test_a_chat_request_maps_onto_a_row_with_the_openai_defaults():
    row = request_to_row(chat("c1", "hi", max_tokens=7))
    assert row == {"id": "c1", "messages": [{"role": "user", "content": "hi"}],
                   "request": {"endpoint": "chat", "model": "my-model", "n": 1},
                   "sampling_params": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 7}}


def test_sampling_fields_map_and_max_completion_tokens_wins():
    row = request_to_row(chat("c", "x", max_tokens=5, max_completion_tokens=9, temperature=0.7, top_p=0.9, n=3,
                              stop="END", seed=4, top_k=20))
    assert row["sampling_params"] == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 4, "stop": "END",
                                      "max_new_tokens": 9, "n": 3}
    assert row["request"]["n"] == 1


def test_n_greedy_choices_are_decoded_once():
    row = request_to_row(chat("c", "x", temperature=0, n=4))
    assert "n" not in row["sampling_params"] and row["request"]["n"] == 4


def test_completions_take_a_string_or_token_ids_and_refuse_several_prompts():
    assert request_to_row(completion("a", "Once"))["prompt"] == "Once"
    assert request_to_row(completion("b", [5, 6, 7]))["prompt"] == [5, 6, 7]
    assert request_to_row(completion("c", ["Once"]))["prompt"] == "Once"  # a list of one prompt is that prompt
    for several in (["a", "b"], [[1, 2], [3]]):
        error = request_to_row(completion("d", several))["request_error"]
        assert error["code"] == "invalid_request" and "one request, one prompt" in error["message"]


def test_text_parts_are_joined_and_other_parts_refused():
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    row = request_to_row(chat("c", "", messages=[{"role": "user", "content": parts}]))
    assert row["messages"] == [{"role": "user", "content": "Hello there"}]
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    error = request_to_row(chat("c", "", messages=[{"role": "user", "content": image}]))["request_error"]
    assert error["code"] == "unsupported_field" and "image_url" in error["message"]


@pytest.mark.parametrize("field,value", [("logprobs", True), ("tools", [{"type": "function"}]),
                                         ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 1}),
                                         ("stream", True), ("presence_penalty", 0.5), ("functions", [{}]),
                                         ("something_new", 1)])
def test_a_field_the_job_cannot_honour_is_this_rows_typed_error(field, value):
    error = request_to_row(chat("c", "x", **{field: value}))["request_error"]
    assert error["code"] == "unsupported_field" and repr(field) in error["message"]


def test_no_op_values_of_unsupported_fields_are_accepted():
    row = request_to_row(chat("c", "x", stream=False, logprobs=False, presence_penalty=0, frequency_penalty=0.0,
                              tools=[], user="u1", response_format={"type": "text"}))
    assert "request_error" not in row


@pytest.mark.parametrize("line,message", [
    ({"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {}}, "method must be POST"),
    ({"custom_id": "x", "url": "/v1/embeddings", "body": {}}, "url '/v1/embeddings'"),
    ({"custom_id": "x", "url": "/v1/completions", "body": []}, "body must be an object"),
    ({"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": []}}, "non-empty list"),
    ({"custom_id": "x", "url": "/v1/completions", "body": {"prompt": 3}}, "string or a list of token ids"),
    (chat("x", "y", n=0), "n must be a positive integer"),
])
def test_malformed_requests_are_this_rows_typed_error(line, message):
    error = request_to_row(line)["request_error"]
    assert error["code"] == "invalid_request" and message in error["message"]


# -- reading the file ---------------------------------------------------------------------------------------------
def test_a_batch_file_is_detected_by_its_first_line_and_every_line_must_be_a_request(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [chat("r1", "hi"), completion("r2", "x")])
    rows = read_rows(path)
    assert [r["id"] for r in rows] == ["r1", "r2"] and rows[1]["request"]["endpoint"] == "completions"
    with pytest.raises(InputError, match="row has no 'id'"):
        read_rows(path, "native")
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [chat("r1", "hi"), {"id": "n1", "prompt": "x"}])
    with pytest.raises(InputError, match="line 2: not an OpenAI batch request"):
        read_rows(mixed)
    native = write_jsonl(tmp_path / "n.jsonl", [{"id": "n1", "prompt": "x"}])
    with pytest.raises(InputError, match="line 1: not an OpenAI batch request"):
        read_rows(native, "openai-batch")
    dup = write_jsonl(tmp_path / "dup.jsonl", [chat("r1", "hi"), chat("r1", "again")])
    with pytest.raises(InputError, match="duplicate id 'r1'"):
        read_rows(dup)


def test_a_line_that_is_not_json_refuses_the_input(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(chat("r1", "hi")) + "\n{not json\n")
    assert main(["--input", str(path), "--output", str(tmp_path / "out")]) == 2


# -- end to end ---------------------------------------------------------------------------------------------------
REQUESTS = [
    chat("chat-greedy", "Name three colours.", temperature=0, max_tokens=6),
    chat("chat-greedy-n", "Count to five.", temperature=0, n=2, max_completion_tokens=5),
    chat("chat-sampled", "Tell me a story.", temperature=0.8, n=3, seed=7, max_tokens=6),
    completion("text-greedy", "Once upon a time", temperature=0, max_tokens=6),
    completion("text-ids", [101, 102, 103, 104], temperature=0, max_tokens=4),
    completion("text-sampled", "The sea is", temperature=1.0, top_p=0.9, n=2, seed=3, max_tokens=5),
    chat("bad-field", "hi", logprobs=True),
    completion("bad-prompts", ["a", "b"]),
]


def native_equivalents() -> list[dict]:
    """The same requests as native rows (the OpenAI defaults written out)."""
    rows = []
    for r in REQUESTS[:6]:
        row = request_to_row(r)
        rows.append({k: v for k, v in row.items() if k in ("id", "messages", "prompt", "sampling_params")})
    return rows


@pytest.fixture(scope="module")
def batch_runs(ray_local, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-batch")
    common = ["--model", str(tiny_model_dir), "--shard-size", "3", "--batch-size", "2"]
    src = write_jsonl(tmp / "batch.jsonl", REQUESTS)
    assert main([*common, "--input", str(src), "--output", str(tmp / "out"), "--output-format", "openai-batch"]) == 0
    native = write_jsonl(tmp / "native.jsonl", native_equivalents())
    assert main([*common, "--input", str(native), "--output", str(tmp / "native")]) == 0
    return tmp, common


def results(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("results-*.jsonl")) for line in f.read_text().splitlines()]


def test_every_request_gets_one_result_line_in_the_batch_output_format(batch_runs):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    tmp, _ = batch_runs
    lines = results(tmp / "out")
    assert sorted(line["custom_id"] for line in lines) == sorted(r["custom_id"] for r in REQUESTS)
    assert len({p.stem.removeprefix("part-") for p in (tmp / "out").glob("part-*.parquet")}) == \
        len(list((tmp / "out").glob("results-*.jsonl")))  # a results file per part
    by_id = {line["custom_id"]: line for line in lines}
    for line in lines:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["id"].startswith("batch_req_")
        if line["error"] is None:
            response = line["response"]
            assert response["status_code"] == 200 and response["request_id"]
            kind = ChatCompletion if line["custom_id"].startswith("chat") else Completion
            body = kind.model_validate(response["body"])
            assert body.model == "my-model" and [c.index for c in body.choices] == list(range(len(body.choices)))
            assert all(c.finish_reason in ("stop", "length") for c in body.choices)
            assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
    assert by_id["bad-field"]["response"] is None
    assert by_id["bad-field"]["error"]["code"] == "unsupported_field" and "logprobs" in by_id["bad-field"]["error"][
        "message"]
    assert by_id["bad-prompts"]["error"]["code"] == "invalid_request"
    choices = {cid: by_id[cid]["response"]["body"]["choices"] for cid in by_id if by_id[cid]["error"] is None}
    assert [len(choices[c]) for c in ("chat-greedy", "chat-greedy-n", "chat-sampled", "text-sampled")] == [1, 2, 3, 2]
    greedy_n = [c["message"]["content"] for c in choices["chat-greedy-n"]]
    assert greedy_n[0] == greedy_n[1]  # n identical greedy choices
    table = read_output(tmp / "out").to_pylist()
    assert sum(r["id"] == "chat-greedy-n" for r in table) == 1  # decoded once


def test_the_tokens_equal_the_same_rows_in_the_native_format(batch_runs):
    tmp, _ = batch_runs
    batch = {(r["id"], r["sample_index"]): r["output_token_ids"] for r in read_output(tmp / "out").to_pylist()
             if r["error"] is None}
    native = {(r["id"], r["sample_index"]): r["output_token_ids"] for r in read_output(tmp / "native").to_pylist()}
    assert batch == native and len(batch) == 1 + 1 + 3 + 1 + 1 + 2


def test_a_resumed_job_and_the_export_hold_each_custom_id_once(batch_runs, tmp_path):
    from jobs.export import main as export

    tmp, common = batch_runs
    out = tmp / "out"
    files = sorted(out.glob("results-*.jsonl"))
    files[0].unlink()  # as a run killed between a part and its results leaves it
    (out / "results-part-gone.jsonl").write_text("{}\n")  # a part rewritten at a resume leaves this behind
    src = tmp / "batch.jsonl"
    assert main([*common, "--input", str(src), "--output", str(out), "--output-format", "openai-batch"]) == 0
    ids = [line["custom_id"] for line in results(out)]
    assert sorted(ids) == sorted(r["custom_id"] for r in REQUESTS)  # each exactly once
    assert not (out / "results-part-gone.jsonl").exists()
    native = tmp / "native"
    assert export(["--format", "openai-batch", str(native)]) == 0  # a native output, exported
    exported = {line["custom_id"]: line for line in results(native)}
    assert set(exported) == {r["id"] for r in native_equivalents()}
    assert exported["chat-greedy"]["response"]["body"]["object"] == "chat.completion"
    assert exported["text-greedy"]["response"]["body"]["object"] == "text_completion"
    assert export(["--format", "openai-batch", str(tmp_path / "empty")]) == 2


def test_result_lines_group_a_requests_completions():
    base = {"error": None, "finish_reason": "length", "num_output_tokens": 2, "prompt_tokens": 3,
            "model_id": "m", "finished_at": None, "request": {"endpoint": "completions", "model": None, "n": 1}}
    lines = [json.loads(x) for x in result_lines([{**base, "id": "a", "sample_index": 1, "output_text": "y"},
                                                  {**base, "id": "a", "sample_index": 0, "output_text": "x"}])]
    (line,) = lines
    body = line["response"]["body"]
    assert [c["text"] for c in body["choices"]] == ["x", "y"] and body["model"] == "m"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
