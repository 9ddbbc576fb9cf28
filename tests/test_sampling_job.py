"""Sampling in the job: effective parameters (job defaults, a row's override, the seed), stop strings, one
output row per completion, the same completions whatever the batch, method or batch size, and per-row errors
for bad sampling parameters."""

from __future__ import annotations

import json

import pytest

from jobs.output import read_output
from jobs.run import main
from tests.helpers_models import StubTokenizer
from tests.test_job import write_jsonl
from workers.configs import DecodingConfig, ModelConfig, SamplingConfig
from workers.engine import DecodeEngine
from workers.models import load_model
from workers.sampling import StopStrings, resolve_sampling, row_seed, text_before_stop

# -- effective parameters -----------------------------------------------------------------------------------------


def test_a_rows_values_override_the_jobs():
    job = SamplingConfig(temperature=0.7, top_p=0.9, stop=["\n\n"], seed=5, n=2)
    plain = resolve_sampling(job, 64, "a", None)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.max_new_tokens, plain.stop, plain.n) == (
        0.7, 0.9, 0, 64, ("\n\n",), 2)
    assert plain.seed == row_seed(5, "a") != row_seed(5, "b") != row_seed(6, "a")
    own = resolve_sampling(job, 64, "a", {"temperature": 1, "top_k": 20, "max_new_tokens": 8, "stop": "END",
                                           "seed": 3, "n": 4})
    assert (own.temperature, own.top_k, own.max_new_tokens, own.stop, own.seed, own.n) == (1.0, 20, 8, ("END",), 3, 4)
    assert own.params(0).seed != own.params(1).seed  # each completion its own stream
    assert resolve_sampling(job, 64, "a", {"top_k": -1}).top_k == 0  # vLLM's "all"
    assert resolve_sampling(SamplingConfig(), 64, "a", None).params(0).greedy


@pytest.mark.parametrize("raw, fragment", [
    ({"temperature": -1}, "temperature: Input should be greater than or equal to 0"),
    ({"top_p": 0}, "top_p: Input should be greater than 0"),
    ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
    ({"top_k": 2.5}, "top_k: Input should be a valid integer"),
    ({"n": 0}, "n: Input should be greater than or equal to 1"),
    ({"n": 3, "temperature": 0}, "needs temperature > 0"),
    ({"stop": ["a", ""]}, "stop strings must not be empty"),
    ({"max_tokens": 5}, "max_tokens: Extra inputs are not permitted"),
    ({"seed": "7"}, "seed: Input should be a valid integer"),
    ("hot", "'sampling_params' must be an object"),
])
def test_bad_sampling_params_say_what_is_wrong(raw, fragment):
    with pytest.raises(ValueError) as info:
        resolve_sampling(SamplingConfig(temperature=0.5), 64, "a", raw)
    assert fragment in str(info.value)


def test_the_job_config_refuses_n_without_sampling():
    with pytest.raises(ValueError, match="needs temperature > 0"):
        SamplingConfig(n=2)


def test_stop_strings_end_at_the_token_that_completes_them():
    stop = StopStrings(StubTokenizer(), ["12 7", "99"])  # the stub decodes ids as space-separated numbers
    assert stop([5, 12, 7, 9], 0) == (3, "12 7")
    assert stop([5, 12], 0) is None and stop([5, 12, 7], 2) == (3, "12 7")
    assert stop([5, 12, 7, 9, 99], 4) == (5, "99")  # only new tokens can complete a string
    assert stop([1] * 500 + [99], 500) == (501, "99")
    assert text_before_stop("abc END def", "END") == "abc " and text_before_stop("abc", None) == "abc"


# -- the engine ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(ModelConfig(model=str(tiny_model_dir)))


ROWS = [
    {"id": "a", "prompt": "The three primary colours are"},
    {"id": "b", "prompt": "Once upon a time", "sampling_params": {"n": 3, "top_p": 0.9}},
    {"id": "c", "prompt": "1, 2, 3,", "sampling_params": {"temperature": 0, "n": 1}},
    {"id": "d", "prompt": "x", "sampling_params": {"top_p": 2}},
    {"id": "e", "prompt": "def f(x):", "sampling_params": {"seed": 42, "max_new_tokens": 5}},
]


def engine(tiny, method="ppd", batch_size=2, **sampling):
    config = DecodingConfig(method=method, prompts="untrained", max_new_tokens=12,
                            sampling=SamplingConfig(**{"temperature": 0.9, "n": 2, **sampling}))
    return DecodeEngine(tiny, config, batch_size=batch_size)


def test_one_output_per_completion_the_same_whatever_the_batching_or_method(tiny):
    out = engine(tiny).run_rows(ROWS)
    assert [(o.id, o.sample_index) for o in out] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2), ("c", 0),
                                                     ("d", 0), ("e", 0), ("e", 1)]
    by_key = {(o.id, o.sample_index): o for o in out}
    bad = by_key["d", 0]
    assert bad.error.code.value == "invalid_sampling_params" and "top_p" in bad.error.message
    assert bad.sampling_params is None and bad.output_text is None
    assert by_key["b", 0].sampling_params["top_p"] == 0.9 and by_key["b", 0].sampling_params["n"] == 3
    assert by_key["e", 1].sampling_params["seed"] == 42 and by_key["e", 1].num_output_tokens <= 5
    # n completions of one prompt differ (12 random tokens each); greedy stays greedy
    assert len({tuple(by_key["b", i].output_token_ids) for i in range(3)}) == 3
    assert by_key["c", 0].sampling_params["temperature"] == 0.0
    tokens = {key: o.output_token_ids for key, o in by_key.items()}
    for other in (engine(tiny, batch_size=1), engine(tiny, batch_size=7), engine(tiny, method="vanilla")):
        assert {(o.id, o.sample_index): o.output_token_ids for o in other.run_rows(ROWS)} == tokens
    # the greedy row equals a greedy job's
    greedy = DecodeEngine(tiny, DecodingConfig(prompts="untrained", max_new_tokens=12)).run_rows([ROWS[2]])
    assert greedy[0].output_token_ids == tokens["c", 0]


def test_stop_strings_cut_the_output_text_and_tokens(tiny):
    free = engine(tiny, n=1).run_rows(ROWS[:1])[0]
    text = free.output_text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick a stop string from {text!r}"
    cut = engine(tiny, n=1, stop=[stop]).run_rows(ROWS[:1])[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.output_text == text[: text.find(stop)]
    assert 0 < cut.num_output_tokens <= free.num_output_tokens
    assert cut.output_token_ids == free.output_token_ids[: cut.num_output_tokens]


# -- the job --------------------------------------------------------------------------------------------------------


def test_a_sampling_job_writes_every_completion_once_and_resumes(ray_local, tiny_model_dir, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out"
    args = ["--input", str(src), "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--temperature", "0.8",
            "--n", "2", "--seed", "1", "--prompts", "untrained", "--shard-size", "2", "--output", str(out)]
    assert main(args) == 0
    rows = read_output(out).to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2),
                                                           ("c", 0), ("d", 0), ("e", 0), ("e", 1)]
    assert rows[0]["sampling_params"] == {"temperature": 0.8, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6,
                                          "stop": [], "seed": row_seed(1, "a"), "n": 2}
    assert rows[6]["error"]["code"] == "invalid_sampling_params"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["prompts"], summary["rows"], summary["rows_failed"]) == (5, 9, 1)

    # The same job with the vanilla decoder gives the same completions.
    assert main([*args[:-1], str(tmp_path / "vanilla"), "--decoding", "vanilla"]) == 0
    vanilla = read_output(tmp_path / "vanilla").to_pylist()
    assert [r["output_token_ids"] for r in vanilla] == [r["output_token_ids"] for r in rows]

    # A rerun skips every prompt; other sampling defaults are refused, naming the change.
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["rows_skipped"] == 5
    capsys.readouterr()
    assert main([*args, "--temperature", "1.0"]) == 2
    assert "sampling" in capsys.readouterr().err


def test_parquet_sampling_params_with_null_fields_mean_not_given(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.inputs import read_rows

    params = pa.array([{"temperature": 0.9, "n": 2, "seed": None}, None, {"temperature": None, "n": None, "seed": 4}],
                      pa.struct([("temperature", pa.float64()), ("n", pa.int64()), ("seed", pa.int64())]))
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "sampling_params": params}),
                   tmp_path / "in.parquet")
    rows = read_rows(tmp_path / "in.parquet")
    job = SamplingConfig(temperature=0.5, seed=1)
    a, b, c = (resolve_sampling(job, 16, r["id"], r.get("sampling_params")) for r in rows)
    assert (a.temperature, a.n, a.seed) == (0.9, 2, row_seed(1, "a"))
    assert (b.temperature, b.n, b.seed) == (0.5, 1, row_seed(1, "b"))
    assert (c.temperature, c.n, c.seed) == (0.5, 1, 4)
