"""jobs/bench/sampling.py on a tiny model: every method's rows equal plain sampling's and the JSON holds what
the tables need; a decoder with a wrong acceptance scheme is caught, named, and fails the run."""

import json

import pytest
import torch

from decoding import PPDDecoder, PromptTokens
from jobs.bench import sampling as bench_sampling
from profiling.device import identify
from profiling.latency import LatencyPoint, LatencyProfile
from tests.helpers_models import tiny_loaded_model
from tests.test_sampling import TypicalAcceptancePPD

TABLE = [[0.5, 0.2, 0.1] + [0.01] * 7, [0.4, 0.2, 0.05] + [0.01] * 7, [0.3, 0.1, 0.1] + [0.01] * 7]
SETTING = dict(temperatures=[0.7, 1.0], top_p=0.95, batch_sizes=[1, 2], max_new_tokens=12, rounds=1,
               min_prompts=2, seed=5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a busy 2-core machine run 3x faster on one thread than on two fighting for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    lm = tiny_loaded_model()
    pt = PromptTokens.from_token_embeddings(lm.model, k=3, base_model_id="tiny", base_model_hash=lm.content_hash)
    pt.meta.extra["acceptance"] = TABLE
    # Made-up step times that make trees cheap: the static choice is a real tree, not plain decoding.
    points = [LatencyPoint(batch=b, slots=s, seconds=0.01 * b + 1e-5 * b * s, repeats=1)
              for b in (1, 2) for s in (1, 2, 4, 8, 16, 32)]
    profile = LatencyProfile(device=identify("cpu", torch.float32), model_hash=lm.content_hash, k=3, ensemble=1,
                             context_len=32, points=points, profile_seconds=0.0, measured_at="now")
    g = torch.Generator().manual_seed(0)
    pool = [torch.randint(2, 64, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (4,), generator=g)]
    return lm, pt, profile, pool


def test_every_method_samples_plain_samplings_tokens_and_the_json_has_the_tables_fields(setup, tmp_path, capsys):
    lm, pt, profile, pool = setup
    results = bench_sampling.bench(lm, pt, profile, pool, log=lambda s: None, **SETTING)
    assert [(r["temperature"], r["batch"]) for r in results] == [(0.7, 1), (0.7, 2), (1.0, 1), (1.0, 2)]
    for r in results:
        assert r["static_slots"] > 1
        for m in bench_sampling.METHODS:
            assert r[m]["rows_differing"] == 0 and r[m]["first_difference"] is None
            assert r[m]["tok_s"] > 0 and len(r[m]["rounds_tok_s"]) == 1
        assert r["static_vs_plain"] > 0 and r["propd_vs_plain"] > 0
    assert max(r["static"]["tau"] for r in results) > 1  # guesses were accepted: the trees did something
    args = bench_sampling.parser().parse_args(
        ["--temperatures", "0.7", "1.0", "--top-p", "0.95", "--batch-sizes", "1", "2", "--max-new-tokens", "12",
         "--rounds", "1", "--min-prompts", "2", "--seed", "5"])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(bench_sampling.summary(lm, "cpu: tiny", args, "now", results)))
    saved = json.loads(path.read_text())
    assert saved["rows_differing"] == 0 and saved["first_difference"] is None and saved["dtype"] == "float32"
    assert (saved["temperatures"], saved["top_p"], saved["seed"], saved["batch_sizes"]) == ([0.7, 1.0], 0.95, 5, [1, 2])
    assert bench_sampling.main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "temperature 0.7" in out and "temperature 1," in out and "rows differing from plain sampling: 0" in out


def test_a_wrong_acceptance_scheme_is_counted_named_and_fails_the_run(setup, monkeypatch, capsys):
    lm, pt, profile, pool = setup
    monkeypatch.setattr(PPDDecoder, "accept_sampled", TypicalAcceptancePPD.accept_sampled)  # ProPD's too
    results = bench_sampling.bench(lm, pt, profile, pool, log=lambda s: None,
                                   **{**SETTING, "temperatures": [1.0], "batch_sizes": [2]})
    (row,) = results
    assert row["plain"]["rows_differing"] == 0
    assert row["static"]["rows_differing"] > 0
    first = row["static"]["first_difference"]
    assert first["seed"] == bench_sampling.completion_seed(5, first["row"])
    assert bench_sampling.verdict(results, "float32") == 1
    err = capsys.readouterr().err
    assert err.startswith("FAIL: static sampling at temperature 1, batch 2: row ")
    assert bench_sampling.verdict(results, "bfloat16") == 0  # half precision: counted and named, not failed


def test_a_difference_at_a_cdf_boundary_is_rounding_not_a_failure(setup, capsys):
    lm, _, _, pool = setup
    params = bench_sampling.SamplingParams(temperature=1.0, seed=3)
    margin = bench_sampling.draw_margin(lm.model, pool[0], [], params)
    assert 0 <= margin < 0.5

    def results(margin):
        d = {"row": 0, "round": 0, "position": 4, "seed": 3, "margin": margin}
        row = {"temperature": 1.0, "batch": 1, "plain": {"first_difference": None},
               "static": {"first_difference": d}, "propd": {"first_difference": None}}
        return [row]

    assert bench_sampling.verdict(results(1e-7), "float32") == 0
    assert "note: static sampling" in capsys.readouterr().err
    assert bench_sampling.verdict(results(0.01), "float32") == 1
    assert capsys.readouterr().err.startswith("FAIL: static sampling at temperature 1, batch 1: row 0")
