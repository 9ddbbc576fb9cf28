"""One numeric path per kind of machine: the measured linear-kernel decision is taken once and reused by every
load after it (the job's board first, then the disk cache), and each row names the path it was computed on."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from tests.helpers_models import make_tiny_llama, save_tiny_llama_dir
from workers import numerics
from workers.board import NumericsBoard
from workers.configs import ModelConfig
from workers.cpu_linear import RowsBelowMeasurement, use_weight_stationary_linears
from workers.models import load_model
from workers.numerics import (
    decision_path,
    kind_key,
    machine_kind,
    numeric_path,
    publish_first,
    read_decision,
    settle_rows_below,
)


class FakeMeasurements:
    """Stands in for timing the two products: each call returns the next of ``results``, as a machine whose load
    changes between calls would (six real loads in a row on the VM chose 8, 12, 12, 10, 10 and 12)."""

    def __init__(self, *results: int):
        self.results, self.calls = list(results), 0

    def __call__(self, model) -> RowsBelowMeasurement:
        rows_below = self.results[self.calls]
        self.calls += 1
        return RowsBelowMeasurement(rows_below=rows_below, torch_ms={1: 2.0}, stationary_ms={1: 1.0})


@pytest.fixture
def measured(monkeypatch) -> FakeMeasurements:
    fake = FakeMeasurements(8, 12, 10, 12)
    monkeypatch.setattr(numerics, "measure_rows_below", fake)
    monkeypatch.setattr(numerics, "worth_measuring", lambda model: True)  # the tiny model is under the floor
    return fake


@pytest.fixture
def model() -> torch.nn.Module:
    return make_tiny_llama(dtype=torch.float32)


def test_a_kind_of_machine_is_measured_once_and_every_later_load_reuses_it(tmp_path, model, measured):
    first = settle_rows_below(model, "hash-a", tmp_path)
    assert (first.rows_below, first.source) == (8, "measured")
    for _ in range(3):  # the machine would now choose 12, 10, 12
        again = settle_rows_below(model, "hash-a", tmp_path)
        assert (again.rows_below, again.key, again.source) == (8, first.key, "cache")
    assert measured.calls == 1
    # Another model, or another cache directory (another machine's disk), is decided apart.
    other = settle_rows_below(model, "hash-b", tmp_path)
    assert (other.rows_below, other.source) == (12, "measured") and other.key != first.key
    assert settle_rows_below(model, "hash-a", tmp_path / "elsewhere").rows_below == 10
    assert measured.calls == 3


def test_the_jobs_decision_comes_before_the_disk_and_the_first_proposal_wins(tmp_path, model, measured):
    key = kind_key(machine_kind("hash-a"))
    job = NumericsBoard({key: 4})  # what job.json recorded
    publish_first(decision_path(tmp_path, key), {"rows_below": 6})  # what this machine's disk holds
    decision = settle_rows_below(model, "hash-a", tmp_path, job)
    assert (decision.rows_below, decision.source) == (4, "job") and measured.calls == 0

    # A board that is empty takes what the disk holds, and the next worker gets it from the board.
    fresh = NumericsBoard()
    assert settle_rows_below(model, "hash-a", tmp_path, fresh).source == "cache"
    assert fresh.get(key) == 6 and fresh.settle(key, 7) == (6, False)
    assert settle_rows_below(model, "hash-a", tmp_path / "other-node", fresh).source == "job"
    assert read_decision(decision_path(tmp_path / "other-node", key)) == 6  # left for later runs there

    # Two workers on two disks measured at once: the one that settled first decides for both.
    class LateBoard(NumericsBoard):
        def get(self, key):  # asked before the other worker settled
            return None

    late = LateBoard({key: 3})
    decision = settle_rows_below(model, "hash-a", tmp_path / "third-node", late)
    assert (decision.rows_below, decision.source) == (3, "job") and measured.calls == 1
    assert late.decisions == {key: 3}
    assert read_decision(decision_path(tmp_path / "third-node", key)) == 3  # the job's, not its own measurement


def test_a_model_too_small_to_measure_needs_no_decision(tmp_path, model):
    decision = settle_rows_below(model, "hash-a", tmp_path, NumericsBoard())
    assert (decision.rows_below, decision.key, decision.source) == (1, None, "unmeasured")
    assert not (tmp_path / "numerics").exists()


def test_the_first_published_decision_wins_and_a_damaged_one_does_not(tmp_path):
    path = tmp_path / "numerics" / "d.json"
    assert publish_first(path, {"rows_below": 8}) == (8, True)
    assert publish_first(path, {"rows_below": 12}) == (8, False)
    path.write_text("{half a fil")
    assert read_decision(path) is None
    assert publish_first(path, {"rows_below": 12}) == (12, True)
    assert [p.name for p in path.parent.iterdir()] == ["d.json"]  # no temporary file left behind

    # Writers racing on one path all end with the same decision.
    racing = tmp_path / "numerics" / "race.json"
    results: list[tuple[int, bool]] = []
    threads = [threading.Thread(target=lambda n=n: results.append(publish_first(racing, {"rows_below": n})))
               for n in range(2, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = json.loads(racing.read_text())["rows_below"]
    assert {decided for decided, _ in results} == {winner} and [won for _, won in results].count(True) == 1


def test_the_machine_kind_names_what_the_kernels_depend_on(monkeypatch):
    kind = machine_kind("hash-a")
    assert kind["model"] == "hash-a" and kind["torch"] == torch.__version__
    assert kind["threads"] == torch.get_num_threads() and kind["cpu"] and len(kind["build"]) == 16
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert kind_key(machine_kind("hash-a")) != kind_key(kind)
    finally:
        torch.set_num_threads(threads)
    assert kind_key(machine_kind("hash-a")) == kind_key(kind)


def test_the_numeric_path_names_the_kernels(model):
    assert numeric_path(model) == "cpu float32 attn=sdpa linear=torch"
    use_weight_stationary_linears(model, rows_below=12)
    assert numeric_path(model) == "cpu float32 attn=sdpa linear=weight_stationary<12"
    eager = make_tiny_llama(dtype=torch.float64, attn_implementation="eager")
    assert numeric_path(eager) == "cpu float64 attn=eager linear=torch"


def test_two_loads_of_one_model_compute_with_the_same_kernels(tmp_path, default_tokenizer, measured):
    """Loading twice (as the default-model tests and a restarted worker do) gives bit-identical logits, however
    the machine's timing would choose the second time."""
    model_dir = save_tiny_llama_dir(tmp_path / "m", default_tokenizer)
    config = ModelConfig(model=str(model_dir), cache_dir=str(tmp_path / "cache"))
    first, second = load_model(config), load_model(config)
    assert first.rows_below_decision.source == "measured" and second.rows_below_decision.source == "cache"
    assert numeric_path(first.model) == numeric_path(second.model) == "cpu float32 attn=sdpa linear=weight_stationary<8"
    ids = torch.tensor([[1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert measured.calls == 1
