"""The main job: input parsing, configuration, per-row errors, and end-to-end runs on Ray."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.config import DEMO_INPUT, build_config
from jobs.inputs import InputError, check_unchanged, iter_shards, plan_shards, read_rows, scan_input
from jobs.output import OUTPUT_SCHEMA, read_output
from jobs.run import main
from tests.conftest import TINY_MAX_CONTEXT
from workers.records import ErrorCode, RowOutput, row_error


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------
# Input parsing


def test_jsonl_rows_keep_messages_and_prompt(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "b", "messages": [{"role": "user", "content": "hi"}], "extra": 1},
            {"id": 7, "prompt": "raw text"},
        ],
    )
    rows = read_rows(path)
    assert rows == [
        {"id": "b", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "7", "prompt": "raw text"},
    ]


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n\n   \n{"id": "b", "prompt": "y"}\n')
    assert [r["id"] for r in read_rows(path)] == ["a", "b"]


def test_parquet_input(tmp_path):
    table = pa.table(
        {
            "id": ["p1", "p2", "p3"],
            "messages": [[{"role": "user", "content": "hello"}], None, None],
            "prompt": [None, "once upon a time", None],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    rows = read_rows(tmp_path / "in.parquet")
    assert rows[0] == {"id": "p1", "messages": [{"role": "user", "content": "hello"}], "prompt": None}
    assert rows[1]["prompt"] == "once upon a time" and rows[1]["messages"] is None
    assert row_error(rows[0]) is None and row_error(rows[1]) is None
    assert "neither" in row_error(rows[2]).message


def test_bad_parquet_inputs(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="broken.parquet: cannot read Parquet"):
        read_rows(tmp_path / "broken.parquet")
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "no_ids.parquet")
    with pytest.raises(InputError, match="no_ids.parquet: row 0: row has no 'id'"):
        read_rows(tmp_path / "no_ids.parquet")
    # Missing prompt columns are each row's problem, not the input's.
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "no_prompt.parquet")
    (row,) = read_rows(tmp_path / "no_prompt.parquet")
    assert row_error(row).code == ErrorCode.INVALID_ROW and "neither" in row_error(row).message


def test_directory_input_reads_every_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "prompt": "x"}])
    pq.write_table(pa.table({"id": ["b"], "prompt": ["y"]}), tmp_path / "b.parquet")
    assert sorted(r["id"] for r in read_rows(tmp_path)) == ["a", "b"]


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "c", "prompt": \n')
    with pytest.raises(InputError, match=r"line 3: malformed JSON"):
        read_rows(path)


def test_non_object_line_names_the_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"line 2: expected a JSON object"):
        read_rows(path)


def test_duplicate_ids_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl",
                       [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}])
    with pytest.raises(InputError, match=r"line 3: duplicate id 'a' \(first seen at .*line 1\)"):
        read_rows(path)


@pytest.mark.parametrize("row", [{"prompt": "x"}, {"id": None, "prompt": "x"}, {"id": "  ", "prompt": "x"},
                                 {"id": 1.5, "prompt": "x"}, {"id": True, "prompt": "x"}])
def test_rows_need_a_usable_id(tmp_path, row):
    path = write_jsonl(tmp_path / "in.jsonl", [row])
    with pytest.raises(InputError, match="line 1: .*'id'"):
        read_rows(path)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="no rows"):
        read_rows(tmp_path / "empty.jsonl")
    (tmp_path / "rows.csv").write_text("id,prompt\n")
    with pytest.raises(InputError, match="unknown input format"):
        read_rows(tmp_path / "rows.csv")


def test_shards_are_cut_in_input_order_per_file_and_skip_written_rows(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": i, "prompt": "x"} for i in ["d", "a", "c"]])
    pq.write_table(pa.table({"id": ["b", "e"], "prompt": ["y", "z"]}), tmp_path / "b.parquet")
    plan = scan_input(str(tmp_path), shard_size=2)
    assert plan.shard_bounds() == [(0, 2), (2, 3), (3, 5)]  # a shard never spans two files
    assert [(s.index, s.ids) for s in iter_shards(plan)] == [(0, ["d", "a"]), (1, ["c"]), (2, ["b", "e"])]
    # A resumed run re-forms the same cut: shard 0 keeps its index less its written row, shard 2 is gone.
    done = np.array([True, False, False, True, True])
    assert [(s.index, s.ids) for s in iter_shards(plan, done)] == [(0, ["a"]), (1, ["c"])]


def test_a_parquet_shard_is_read_from_its_row_groups(tmp_path):
    """A shard is named by its first row group and the row in it (no row read to plan it), and read from there."""
    ids = [f"r{i}" for i in range(10)]
    pq.write_table(pa.table({"id": ids, "prompt": ids}), tmp_path / "in.parquet", row_group_size=3)
    plan = scan_input(str(tmp_path / "in.parquet"), shard_size=4)
    shards = list(plan_shards(plan))
    assert all(s.rows is None for s in shards)
    assert [(s.read.row_group, s.read.group_offset) for s in shards] == [(0, 0), (1, 1), (2, 2)]
    assert [s.load() for s in shards] == [[{"id": i, "prompt": i} for i in ids[a:a + 4]] for a in (0, 4, 8)]
    done = np.zeros(10, dtype=bool)
    done[[4, 6]] = True
    assert [s.ids for s in plan_shards(plan, done) if s.index == 1] == [["r5", "r7"]]
    check_unchanged(plan)
    pq.write_table(pa.table({"id": ids + ["r10"], "prompt": ids + ["x"]}), tmp_path / "in.parquet", row_group_size=3)
    with pytest.raises(InputError, match="changed while the job ran: shard 0: the file holds 11 rows, not the 10"):
        shards[0].read.read()
    with pytest.raises(InputError, match="in.parquet changed while the job ran: it is not the file planned"):
        check_unchanged(plan)  # found at the run's end, even when every shard of the file was written before


def test_an_input_changed_mid_job_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "x"} for i in "abcd"])
    plan = scan_input(str(path), shard_size=2)
    write_jsonl(path, [{"id": i, "prompt": "x"} for i in "abxd"])
    shards = iter_shards(plan)
    assert next(shards).ids == ["a", "b"]
    with pytest.raises(InputError, match="changed while the job ran: shard 1"):
        next(shards)
    for changed, message in (("abc", "shard 1"), ("abcde", "rows past those planned")):  # shrank, grew
        write_jsonl(path, [{"id": i, "prompt": "x"} for i in changed])
        with pytest.raises(InputError, match=f"changed while the job ran: .*{message}"):
            list(iter_shards(plan))
        with pytest.raises(InputError, match="in.jsonl changed while the job ran: it is not the file planned"):
            check_unchanged(plan)  # the run's last check, which sees a file no shard of this run read


def test_an_input_of_one_id_repeated_is_refused_at_once(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "same", "prompt": "x"}] * 50_000)
    with pytest.raises(InputError, match=r"line 2: duplicate id 'same' \(first seen at .*line 1\); 49998 more"):
        scan_input(str(path), shard_size=64)


def test_duplicates_are_named_in_both_places_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "1"}, {"id": 5, "prompt": "2"}])
    (tmp_path / "b.jsonl").write_text('\n{"id": "y", "prompt": "3"}\n{"id": "5", "prompt": "4"}\n')
    with pytest.raises(InputError, match=r"b.jsonl: line 3: duplicate id '5' \(first seen at .*a.jsonl: line 2\)"):
        scan_input(str(tmp_path), shard_size=4)


@settings(max_examples=50, deadline=None)
@given(
    ids=st.lists(st.one_of(st.text(min_size=1).filter(str.strip), st.integers()), unique_by=str, min_size=1,
                 max_size=30),
    shard_size=st.integers(1, 8),
    text=st.text(),
)
def test_jsonl_round_trip_and_shards_cover_every_row_once(tmp_path_factory, ids, shard_size, text):
    path = write_jsonl(tmp_path_factory.mktemp("prop") / "in.jsonl", [{"id": i, "prompt": text} for i in ids])
    rows = read_rows(path)
    assert [r["id"] for r in rows] == [str(i) for i in ids] and all(r["prompt"] == text for r in rows)
    shards = list(iter_shards(scan_input(str(path), shard_size)))
    flat = [row_id for s in shards for row_id in s.ids]
    assert flat == [str(i) for i in ids]
    assert all(1 <= len(s.rows) <= shard_size for s in shards)
    assert all(len(s.rows) == shard_size for s in shards[:-1])


def test_demo_input_is_valid():
    rows = read_rows(DEMO_INPUT)
    assert len(rows) >= 10
    assert all(row_error(r) is None for r in rows)
    assert any("messages" in r for r in rows) and any("prompt" in r for r in rows)


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"id": "x"}, "neither"),
        ({"id": "x", "prompt": None, "messages": None}, "neither"),
        ({"id": "x", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "both"),
        ({"id": "x", "prompt": 3}, "'prompt' must be a string"),
        ({"id": "x", "messages": "hello"}, "'messages' must be a non-empty list"),
        ({"id": "x", "messages": []}, "'messages' must be a non-empty list"),
        ({"id": "x", "messages": ["hello"]}, "messages[0] must be an object"),
        ({"id": "x", "messages": [{"role": "user"}]}, "messages[0].content must be a string"),
        ({"id": "x", "messages": [{"role": 1, "content": "a"}]}, "messages[0].role must be a string"),
    ],
)
def test_row_errors(row, fragment):
    error = row_error(row)
    assert error.code == ErrorCode.INVALID_ROW and fragment in error.message


# ---------------------------------------------------------------------------------------------------------
# Configuration


def test_config_file_then_cli_flags(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(
        "shard_size: 3\nmodel:\n  model: /some/dir\n  dtype: float32\n"
        "decoding:\n  method: vanilla\n  max_new_tokens: 5\nworkers:\n  - {count: 2, batch_size: auto}\n"
    )
    cfg = build_config(cfg_file, {"max_new_tokens": 7, "num_workers": None, "device": "cpu"})
    assert cfg.shard_size == 3
    assert cfg.model.model == "/some/dir" and cfg.model.dtype == "float32" and cfg.model.device == "cpu"
    assert cfg.decoding.method == "vanilla" and cfg.decoding.max_new_tokens == 7
    (group,) = cfg.workers
    assert group.count == 2 and group.batch_size == "auto" and group.name == "default"
    assert cfg.input_uri() == str(DEMO_INPUT) and cfg.output == "outputs/demo"
    # A flag for "the" worker group sets the one group's field...
    assert build_config(cfg_file, {"batch_size": 4}).workers[0].batch_size == 4


def test_worker_groups(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(
        "model: {dtype: float32}\n"
        "workers:\n"
        "  - {name: h100, count: 2, num_gpus: 1, accelerator_type: H100, dtype: bfloat16, batch_size: auto}\n"
        "  - {name: cpu, count: 1, num_cpus: 4, resources: {spot: 1}}\n"
    )
    cfg = build_config(cfg_file, {})
    h100, cpu = cfg.workers
    assert cfg.group_model(h100).dtype == "bfloat16" and cfg.group_model(cpu).dtype == "float32"
    assert h100.accelerator_type == "H100" and cpu.resources == {"spot": 1.0} and cpu.batch_size == 8
    # ...but is refused when there are several groups, and names must be unique.
    with pytest.raises(ValueError, match="lists 2 groups"):
        build_config(cfg_file, {"batch_size": 4})
    cfg_file.write_text("workers: [{name: a}, {name: a}]\n")
    with pytest.raises(ValueError, match="unique"):
        build_config(cfg_file, {})
    cfg_file.write_text("workers: [{batch_size: 0}]\n")
    with pytest.raises(ValueError, match="batch_size"):
        build_config(cfg_file, {})


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("shard_sise: 3\n")
    with pytest.raises(ValueError, match="shard_sise"):
        build_config(cfg_file, {})
    with pytest.raises(ValueError):
        build_config(None, {"max_new_tokens": 0})


def test_bad_input_fails_up_front_without_ray(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\nnot json\n')
    assert main(["--input", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_config_is_reported(tmp_path, capsys):
    assert main(["--batch-size", "0", "--output", str(tmp_path / "out")]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_row_output_fields_are_the_schema():
    assert list(RowOutput.__dataclass_fields__) == OUTPUT_SCHEMA.names


# ---------------------------------------------------------------------------------------------------------
# End to end on Ray


GOOD_ROWS = [
    {"id": "r01", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"id": "r02", "prompt": "The three primary colours are"},
    {"id": "r03", "messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Name a fruit."}]},
    {"id": "r04", "prompt": "def add(a, b):\n"},
    {"id": "r05", "prompt": "1, 2, 3,"},
    {"id": "r06", "messages": [{"role": "user", "content": "List three animals."}]},
]
BAD_ROWS = [
    {"id": "e01", "prompt": ""},  # empty after encoding
    {"id": "e02"},  # neither
    {"id": "e03", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},  # both
    {"id": "e04", "prompt": 42},  # wrong type
    {"id": "e05", "prompt": "word " * (2 * TINY_MAX_CONTEXT)},  # longer than the max context
    {"id": "e06", "messages": [{"role": "user", "content": None}]},  # wrong type inside messages
]


def run_job(tmp_path: Path, name: str, *args: str) -> tuple[pa.Table, dict]:
    out = tmp_path / name
    assert main([*args, "--output", str(out)]) == 0
    table = read_output(out)
    assert table.schema.equals(OUTPUT_SCHEMA)
    summary = json.loads((out / "summary.json").read_text())
    return table, summary


@pytest.fixture(scope="module")
def tiny_runs(ray_local, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    rows = GOOD_ROWS + BAD_ROWS
    src = write_jsonl(tmp / "in.jsonl", [rows[i] for i in (3, 10, 0, 7, 5, 1, 8, 11, 2, 4, 9, 6)])  # shuffled
    common = ["--input", str(src), "--model", str(tiny_model_dir), "--max-new-tokens", "12", "--batch-size", "2",
              "--shard-size", "5"]
    return {
        method: run_job(tmp, method, *common, "--decoding", method) for method in ("ppd", "vanilla")
    }


def test_every_row_once_with_errors_on_bad_rows(tiny_runs):
    for method, (table, summary) in tiny_runs.items():
        rows = table.to_pylist()
        assert [r["id"] for r in rows] == sorted(r["id"] for r in GOOD_ROWS + BAD_ROWS)
        assert summary["batch_fallback_rows"] == 0
        for r in rows:
            assert r["decoding"] == method
            # a model this small is never measured: nn.Linear, the same on every machine
            assert r["numeric_path"] == "cpu float32 attn=sdpa linear=torch" and r["batch_fallback"] is False
            if r["id"].startswith("e"):
                assert r["error"], r
                assert r["output_token_ids"] == [] and r["output_text"] is None and r["finish_reason"] is None
            else:
                assert r["error"] is None, r
                assert 1 <= r["num_output_tokens"] == len(r["output_token_ids"]) <= 12
                assert r["finish_reason"] in ("stop", "length")
                assert r["finish_reason"] == "stop" or r["num_output_tokens"] == 12
                assert r["prompt_tokens"] > 0 and r["num_steps"] >= 1
                # a row's latency is the span of its own timestamps: from its slot to its last token
                span = (r["finished_at"] - r["started_at"]).total_seconds()
                assert r["latency_s"] == pytest.approx(span, abs=1e-3)
                assert isinstance(r["output_text"], str)
        errors = {r["id"]: (r["error"]["code"], r["error"]["message"]) for r in rows if r["error"]}
        assert errors["e01"] == ("empty_prompt", "prompt is empty after encoding")
        assert errors["e02"][0] == errors["e03"][0] == errors["e04"][0] == errors["e06"][0] == "invalid_row"
        assert "neither" in errors["e02"][1] and "both" in errors["e03"][1] and "must be a string" in errors["e04"][1]
        assert errors["e05"][0] == "prompt_too_long" and "max context" in errors["e05"][1]
        assert "content must be a string" in errors["e06"][1]

        assert summary["rows"] == 12 and summary["rows_failed"] == 6 and summary["rows_ok"] == 6
        assert summary["rows_skipped"] == 0 and summary["rows_this_run"] == 12
        assert summary["shards"] == 3 and summary["config"]["decoding"]["method"] == method
        (worker,) = summary["workers"]
        assert worker["batch_size"] == 2 and worker["group"] == "default"
        # Provenance: every row names the worker, its device and the config; decoded rows their timestamps.
        for r in rows:
            assert (r["worker"], r["worker_group"], r["device"]) == (worker["worker"], "default", worker["device"])
            assert r["config_hash"] == summary["config_hash"] and r["model_hash"] == worker["model_hash"]
            assert r["dtype"] == "float32"
            if r["error"] is None:
                assert r["started_at"] <= r["finished_at"]
        (device,) = summary["by_device"].values()
        assert device["rows"] == 12 and device["output_tokens"] == summary["output_tokens"] > 0
        # Continuous batching: a free slot takes a waiting row at the next step (the shards' tails aside).
        assert 0.5 < summary["slot_occupancy"] == device["slot_occupancy"] <= 1.0
        ok = [r for r in rows if r["error"] is None]
        assert summary["output_tokens"] == sum(r["num_output_tokens"] for r in ok)
        assert summary["mean_tau"] == pytest.approx(summary["output_tokens"] / sum(r["num_steps"] for r in ok))
        assert summary["tokens_per_s"] == pytest.approx(summary["output_tokens"] / summary["decode_seconds"])
        # The decode loop's own clock: every step after the warm-up, each advancing one or both of the 2 slots,
        # inside the decode span; a thread runs on one core at a time, so its CPU time never exceeds the wall's.
        loop, row_steps = summary["decode_loop"], sum(r["num_steps"] for r in ok)
        assert row_steps / 2 <= loop["steps"] <= row_steps and loop == device["decode_loop"]
        assert 0 < loop["thread_cpu_seconds"] <= loop["step_seconds"] * 1.01 < summary["decode_seconds"]


def test_one_parquet_file_per_shard_and_an_index_of_them(tiny_runs):
    table, summary = tiny_runs["ppd"]
    out = Path(summary["output_dir"])
    names = sorted(p.name for p in out.iterdir())
    assert (names[0], names[1], names[-1]) == ("index-" + names[0][6:], "job.json", "summary.json")
    parts = names[2:-1]
    assert [n[:10] for n in parts] == ["part-00000", "part-00001", "part-00002"]
    assert [pq.read_table(out / n).num_rows for n in parts] == [5, 5, 2]
    index = json.loads((out / names[0]).read_text())["parts"]  # one index: the run wrote fewer than 256 parts
    assert sorted(index) == parts and [index[n]["rows"] for n in parts] == [5, 5, 2]
    # The workers published the parts (the driver, this process, only indexed their summaries).
    workers = {f"pid {w['pid']} on {socket.gethostname()}" for w in summary["workers"]}
    assert {index[n]["writer"] for n in parts} <= workers and os.getpid() not in {w["pid"] for w in summary["workers"]}
    assert {w["output"] for w in summary["workers"]} == {"writes its own parts (on the driver's node)"}


def test_ppd_equals_vanilla_row_by_row(tiny_runs):
    ppd = {r["id"]: r for r in tiny_runs["ppd"][0].to_pylist()}
    vanilla = {r["id"]: r for r in tiny_runs["vanilla"][0].to_pylist()}
    assert ppd.keys() == vanilla.keys()
    for row_id, v in vanilla.items():
        p = ppd[row_id]
        assert p["output_token_ids"] == v["output_token_ids"], row_id
        assert (p["output_text"], p["finish_reason"], p["error"]) == (v["output_text"], v["finish_reason"], v["error"])
        if v["error"] is None:
            assert v["num_steps"] == v["num_output_tokens"] and v["tau"] == 1.0
            assert p["num_steps"] <= v["num_steps"]


def test_rerun_resumes_and_a_changed_config_is_refused(ray_local, tiny_model_dir, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD_ROWS[:2])
    out = tmp_path / "out"
    args = ["--input", str(src), "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--output", str(out)]
    assert main(args) == 0
    first = read_output(out)
    assert first.column("id").to_pylist() == ["r01", "r02"]

    # More input rows: only the new ones are decoded; the old part is left alone.
    write_jsonl(src, GOOD_ROWS[:4])
    (out / "part-00009-deadbeef.parquet.123.tmp").write_bytes(b"half a file from a killed run")
    assert main([*args, "--shard-size", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_skipped"] == 2 and summary["rows_this_run"] == 2 and summary["rows"] == 4
    again = read_output(out)
    assert again.column("id").to_pylist() == ["r01", "r02", "r03", "r04"]
    assert again.slice(0, 2).column("output_token_ids").equals(first.column("output_token_ids"))
    assert not list(out.glob("*.tmp"))

    # Everything written: nothing to do, no Ray needed.
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["rows_skipped"] == 4

    # A setting that changes outputs is refused, naming it; --overwrite starts again.
    capsys.readouterr()
    assert main([*args, "--max-new-tokens", "4"]) == 2
    assert "max_new_tokens: 3 -> 4" in capsys.readouterr().err
    assert main([*args, "--cpu-linear", "torch"]) == 2  # float32 logits on a CPU differ in the last bits
    assert "cpu_linear: None -> 'torch'" in capsys.readouterr().err
    write_jsonl(src, GOOD_ROWS[:1])
    assert main([*args, "--max-new-tokens", "4", "--overwrite"]) == 0
    assert read_output(out).column("id").to_pylist() == ["r01"]


def test_foreign_files_and_ids_are_refused(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD_ROWS[:1])
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(OUTPUT_SCHEMA.empty_table(), out / "part-00007.parquet")  # no job.json beside it
    assert main(["--input", str(src), "--output", str(out)]) == 2
    assert "not from this job" in capsys.readouterr().err


def test_default_model_matches_hf_generate(ray_local, tmp_path):
    """The real default model through the whole job: PPD's tokens equal transformers' greedy generate."""
    import torch

    from workers.configs import ModelConfig
    from workers.models import encode_row, load_model

    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
        {"id": "b", "messages": [{"role": "user", "content": "Write a haiku about the sea."}]},
        {"id": "c", "prompt": "The three primary colours are"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    table, summary = run_job(tmp_path, "out", "--input", str(src), "--max-new-tokens", "16", "--batch-size", "3",
                             "--profile-budget-s", "8", "--shard-size", "2")
    assert summary["rows_failed"] == 0 and summary["workers"][0]["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    got = {r["id"]: r["output_token_ids"] for r in table.to_pylist()}
    # The worker profiled its device and sized its trees with ProPD (the default) from the shipped artifact's
    # acceptance table, starting from its planned tree.
    (worker,) = summary["workers"]
    assert worker["tree"].startswith("propd") and worker["tree_hash"].startswith("propd-")
    assert worker["batch_size"] == 3 and worker["tree_slots"] >= 1
    assert {(r["device"], r["tree_hash"]) for r in table.to_pylist()} == {(worker["device"], worker["tree_hash"])}

    lm = load_model(ModelConfig())
    for row in rows:
        ids = encode_row(lm.tokenizer, messages=row.get("messages"), prompt=row.get("prompt"))
        with torch.no_grad():
            out = lm.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=16,
                eos_token_id=lm.eos_token_ids,
                pad_token_id=lm.eos_token_ids[0],
            )
        assert got[row["id"]] == out[0, len(ids):].tolist(), row["id"]


def test_worker_failure_is_a_clear_error(ray_local, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD_ROWS[:1])
    args = ["--input", str(src), "--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "out")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error: the job failed on its Ray workers" in err and "no-such-model" in err


def test_resume_retries_rows_whose_workers_died_and_sets_aside_unreadable_parts(tmp_path):
    from jobs.output import parts, read_part_summary, write_part
    from jobs.resume import open_output, scan_written
    from jobs.storage import resolve
    from workers.records import RowError

    plan = scan_input(str(write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "x"} for i in "abcd"])), 2)
    out = resolve(tmp_path / "out")
    cfg = build_config(None, {"output": out.path})
    assert not open_output(out, cfg, plan).done.any()  # a fresh directory: job.json is written
    died = RowError(ErrorCode.WORKER_DIED, "the shard of this row failed on 3 workers")
    decoded = RowOutput(id="a", output_token_ids=[5, 6, 7], num_output_tokens=3, num_steps=2).to_dict()
    first = write_part(out, 0, [decoded, RowOutput(id="b", num_output_tokens=9, num_steps=9, error=died).to_dict()])
    # the tally counts the decoded rows only: what the progress line and summary.json read instead of the rows
    summary = read_part_summary(first)
    assert summary.pop("writer") == f"pid {os.getpid()} on {socket.gethostname()}"  # who published it
    assert summary == {"ids": ["a", "b"], "rows": 2, "failed": 1, "retry": ["b"],
                       "tally": {"output_tokens": 3, "steps": 2, "batch_fallback": 0}}
    write_part(out, 1, [RowOutput(id="c", error=died).to_dict()])
    out.child("part-00002-00000000.parquet").write_bytes_atomically(b"not parquet")  # damaged on disk since
    # A look (--plan-only) changes nothing, and counts neither the died rows nor the damaged part as written.
    look = scan_written(out, plan)
    assert look.done.tolist() == [True, False, False, False] and look.retried == 2
    assert len(out.files()) == 4
    state = open_output(out, cfg, plan)
    assert state.done.tolist() == [True, False, False, False] and state.retried == 2
    assert read_output(out).column("id").to_pylist() == ["a"]  # b and c are out, to be decoded again
    # The rest of the part is a new part (a part never changes under its name); the damaged one is set aside.
    assert not first.exists()
    assert [{k: v for k, v in read_part_summary(p).items() if k != "writer"} for p in parts(out)] == [
        {"ids": ["a"], "rows": 1, "failed": 0, "retry": [], "tally": {"output_tokens": 3, "steps": 2,
                                                                      "batch_fallback": 0}}]
    assert out.child("part-00002-00000000.parquet.unreadable").exists()
    # The retried rows are gone from the files, so a second look finds nothing more to retry.
    assert open_output(out, cfg, plan).retried == 0


def test_written_ids_are_checked_against_the_input(tmp_path):
    from jobs.output import write_part
    from jobs.resume import ResumeError, scan_written
    from jobs.storage import resolve

    plan = scan_input(str(write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "x"} for i in "abc"])), 2)
    out = resolve(tmp_path / "out")
    out.make_dir()
    write_part(out, 0, [RowOutput(id="a").to_dict()])
    twice = write_part(out, 1, [RowOutput(id="b").to_dict(), RowOutput(id="a").to_dict()])
    with pytest.raises(ResumeError, match=r"id 'a' is written twice, in part-00000-\w+.parquet and part-00001"):
        scan_written(out, plan)
    twice.delete()
    write_part(out, 1, [RowOutput(id="zz").to_dict()])
    with pytest.raises(ResumeError, match=r"holds ids that are not in this input \(e.g. 'zz' in part-00001"):
        scan_written(out, plan)


def test_workers_are_checked_against_each_other_and_the_job_record(tmp_path):
    from jobs.resume import ResumeError, check_manifest, record_worker, recorded_numerics
    from jobs.storage import resolve

    out = resolve(tmp_path)
    check_manifest(out, build_config(None, {"output": str(tmp_path)}), write=True)
    first = {"worker": "g/0 pid 1", "model_hash": "a" * 64, "device": "cpu: X (2 threads)",
             "numeric_path": "cpu float32 attn=sdpa linear=weight_stationary<8",
             "linear_decision": {"key": "kind1", "rows_below": 8, "source": "measured"}}
    record_worker(out, first, [])
    manifest = json.loads((tmp_path / "job.json").read_text())
    assert manifest["model_hash"] == "a" * 64 and recorded_numerics(out) == {"kind1": 8}
    assert manifest["numerics"]["kind1"] == {"rows_below": 8, "machine": "cpu: X (2 threads)",
                                             "numeric_path": first["numeric_path"]}
    record_worker(out, {**first, "worker": "g/1 pid 2"}, [first])  # the same: fine
    # Two workers that loaded different weights, named both.
    with pytest.raises(ResumeError, match=r"different weights.*g/0 pid 1 aaaaaaaaaaaa.*g/1 pid 2 bbbbbbbbbbbb"):
        record_worker(out, {**first, "worker": "g/1 pid 2", "model_hash": "b" * 64}, [first])
    # The first worker of a later run, with weights other than the directory's.
    with pytest.raises(ResumeError, match="the model files changed"):
        record_worker(out, {**first, "model_hash": "c" * 64}, [])
    # A worker whose linear kernel is not the one the job decided for its kind of machine.
    other_kernel = {**first, "numeric_path": "cpu float32 attn=sdpa linear=weight_stationary<12",
                    "linear_decision": {"key": "kind1", "rows_below": 12, "source": "measured"}}
    with pytest.raises(ResumeError, match=r"decided W @ x.T below 8 rows .*model.cpu_linear: auto"):
        record_worker(out, other_kernel, [first])
    # Another kind of machine is recorded beside the first.
    record_worker(out, {**other_kernel, "linear_decision": {"key": "kind2", "rows_below": 12,
                                                                "source": "cache"}}, [first])
    assert recorded_numerics(out) == {"kind1": 8, "kind2": 12}


@pytest.mark.parametrize("column, message", [
    (pa.array([None, None], pa.float64()), "row 0: row has no 'id'"),
    (pa.array([None, 1.5]), "row 0: row has no 'id'"),
    (pa.array([2.5, None]), "row 0: 'id' must be a string or an integer, got float"),
    (pa.array([True, False]), "row 0: 'id' must be a string or an integer, got bool"),
    (pa.array([1, None]), "row 1: row has no 'id'"),
    (pa.array(["a", " "]), "row 1: 'id' is empty"),
    (pa.array(["a", None]), "row 1: row has no 'id'"),
    (pa.array(["a", ""]).dictionary_encode(), "row 1: 'id' is empty"),
])
def test_parquet_id_columns_are_checked_with_the_bad_row_named(tmp_path, column, message):
    pq.write_table(pa.table({"id": column, "prompt": ["x", "y"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=f"in.parquet: {message}"):
        scan_input(str(tmp_path / "in.parquet"), shard_size=4)


def test_a_resume_reads_index_files_and_only_the_footers_no_index_covers(tmp_path, monkeypatch):
    import jobs.resume
    from jobs.output import PartIndex, write_part
    from jobs.resume import scan_written
    from jobs.storage import resolve

    plan = scan_input(str(write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": "x"} for i in range(7)])), 2)
    out = resolve(tmp_path / "out")
    out.make_dir()
    index = PartIndex(out, every=2)
    parts = [write_part(out, s, [RowOutput(id=f"r{i}").to_dict() for i in range(2 * s, min(7, 2 * s + 2))], index)
             for s in range(3)]
    write_part(out, 3, [RowOutput(id="r6").to_dict()])  # written by a driver killed before its index
    parts[1].delete()  # an index entry for a part that is gone is ignored
    damaged = parts[0].read_bytes()[:-20]  # a covered part damaged since: its size no longer matches
    parts[0].write_bytes_atomically(damaged)
    assert len([f for f in out.files() if f.name.startswith("index-")]) == 1  # parts 0 and 1
    index.flush()  # part 2
    footers = []
    real = jobs.resume.read_part_summary
    monkeypatch.setattr(jobs.resume, "read_part_summary", lambda part: footers.append(part.name) or real(part))
    written = scan_written(out, plan)
    assert written.done.tolist() == [False, False, False, False, True, True, True]
    assert footers == [f.name for f in out.files() if f.name[:10] in ("part-00000", "part-00003")]
