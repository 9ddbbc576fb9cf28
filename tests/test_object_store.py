"""Input and output in object storage, against a real S3 API on loopback (moto's server: tests/conftest.py).

The job's own guarantees hold there as on a local disk: parts are published whole (a temporary object, then a
server-side copy), a killed writer's leftovers are cleared, unreadable parts are set aside, died rows are
retried, bad input is named by URI and line, and credentials never come from, or go into, a URI."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.config import build_config
from jobs.inputs import InputError, iter_shards, scan_input
from jobs.output import read_output, read_part_summary, write_part
from jobs.resume import open_output
from jobs.storage import StorageError, resolve
from workers.records import ErrorCode, RowError, RowOutput


def put(uri: str, data: bytes) -> None:
    resolve(uri).write_bytes_atomically(data)


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_credentials_never_ride_in_a_uri():
    for uri in ("s3://AKIAEXAMPLE:wJalrSECRET@bucket/in.jsonl", "s3://AKIAEXAMPLE:wJal/rSECRET@bucket/in.jsonl",
                "s3://bucket/in.jsonl?secret_key=wJalrSECRET&access_key=AKIAEXAMPLE"):
        with pytest.raises(StorageError, match="credentials do not belong in the URI") as caught:
            resolve(uri)
        assert "AKIAEXAMPLE" not in str(caught.value) and "rSECRET" not in str(caught.value)


def test_a_missing_bucket_or_object_is_a_clear_early_error(s3_server, capsys):
    from jobs.run import main

    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist"):
        resolve("s3://no-such-bucket/out")
    assert main(["--input", "s3://jobs-in/missing/in.jsonl", "--output", "s3://jobs-out/x", "--plan-only"]) == 2
    assert "s3://jobs-in/missing/in.jsonl: no such file" in capsys.readouterr().err
    assert main(["--input", "s3://no-such-bucket/in.jsonl", "--plan-only"]) == 2
    assert "the bucket 'no-such-bucket' does not exist" in capsys.readouterr().err


def test_input_is_streamed_from_a_bucket_and_bad_lines_are_named(s3_server):
    put("s3://jobs-in/dir/a.jsonl", jsonl([{"id": i, "prompt": "x"} for i in ("a", "b", "c")]))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["d", "e"], "prompt": ["y", "z"]}), sink)
    put("s3://jobs-in/dir/b.parquet", sink.getvalue().to_pybytes())
    plan = scan_input("s3://jobs-in/dir/", shard_size=2)
    assert [s.ids for s in iter_shards(plan)] == [["a", "b"], ["c"], ["d", "e"]]
    put("s3://jobs-in/bad.jsonl", b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n')
    with pytest.raises(InputError, match=r"s3://jobs-in/bad.jsonl: line 2: malformed JSON"):
        scan_input("s3://jobs-in/bad.jsonl", shard_size=2)
    put("s3://jobs-in/dup/a.jsonl", jsonl([{"id": "q", "prompt": "x"}, {"id": "r", "prompt": "x"}]))
    put("s3://jobs-in/dup/b.jsonl", jsonl([{"id": "r", "prompt": "x"}]))
    with pytest.raises(InputError, match=r"dup/b.jsonl: line 1: duplicate id 'r' \(first seen at s3://jobs-in/dup/"
                                         r"a.jsonl: line 2\)"):
        scan_input("s3://jobs-in/dup/", shard_size=2)


def test_parts_in_a_bucket_are_published_whole_and_resumed(s3_server):
    put("s3://jobs-in/resume.jsonl", jsonl([{"id": i, "prompt": "x"} for i in "abcd"]))
    plan = scan_input("s3://jobs-in/resume.jsonl", shard_size=2)
    out = resolve("s3://jobs-out/resume")
    cfg = build_config(None, {"output": "s3://jobs-out/resume"})
    assert not open_output(out, cfg, plan).done.any()
    died = RowError(ErrorCode.WORKER_DIED, "the shard of this row failed on 3 workers")
    part = write_part(out, 0, [RowOutput(id="a").to_dict(), RowOutput(id="b", error=died).to_dict()])
    assert read_part_summary(part)["retry"] == ["b"]
    put("s3://jobs-out/resume/part-00001-00000000.parquet", b"not parquet")  # damaged since
    put("s3://jobs-out/resume/part-00002-00000000.parquet.123.tmp", b"half an object from a killed run")
    assert sorted(f.name for f in out.files())[-1].endswith(".tmp")
    state = open_output(out, cfg, plan)
    assert state.done.tolist() == [True, False, False, False] and state.retried == 1
    names = sorted(f.name for f in out.files())
    assert names[0] == "job.json" and not any(n.endswith(".tmp") for n in names)
    assert "part-00001-00000000.parquet.unreadable" in names
    assert read_output(out).column("id").to_pylist() == ["a"]


def test_adapted_prompt_tokens_are_published_to_and_read_from_a_store(s3_server, tmp_path):
    """The artifact a job learned is written into an s3:// output (each file published whole, then job.json's
    record), and a later job's `--prompts s3://...` hands its files to the workers, which load and check them."""
    from decoding import PromptTokens
    from jobs.adapt import load_prompt_files, publish_artifact, recorded_artifact
    from tests.helpers_models import make_tiny_llama
    from workers.artifacts import artifact_files, prompt_tokens_from_files

    model = make_tiny_llama(vocab_size=32, hidden_size=16, num_layers=1)
    pt = PromptTokens.from_token_embeddings(model, k=2, base_model_id="tiny", base_model_hash="h")
    pt.meta.extra["acceptance"] = [[0.5] + [0.0] * 9, [0.25] + [0.0] * 9]
    files, prompts_hash = artifact_files(pt)
    out = resolve("s3://jobs-out/adapted/")
    out.child("job.json").write_bytes_atomically(json.dumps({"config_hash": "c", "output_config": {}}).encode())
    where = publish_artifact(out, files, prompts_hash, {"rows_learned": 3})
    record = recorded_artifact(out)
    assert record == {"artifact": where.name, "prompts_hash": prompts_hash, "report": {"rows_learned": 3}}
    assert not [f for f in where.files() if f.name.endswith(".tmp")]
    cfg = build_config(None, {"prompts": where.uri})
    source, fetched = load_prompt_files(cfg)
    assert source == where.uri and fetched == files
    loaded, loaded_hash = prompt_tokens_from_files(fetched, expect_model_hash="h")
    assert loaded_hash == prompts_hash and loaded.meta.extra["acceptance"] == pt.meta.extra["acceptance"]
    assert load_prompt_files(build_config(None, {"prompts": "untrained"})) is None
