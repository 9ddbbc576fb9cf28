"""A batch that fails is decoded row by row, and that is loud: logged with its exception, marked on its rows, and
counted in the job's summary and per-device table (a bug in the batched path must not hide as a slowdown)."""

from __future__ import annotations

import logging

import pytest

from jobs.progress import Progress, device_table
from workers.configs import DecodingConfig, ModelConfig
from workers.engine import DecodeEngine
from workers.models import load_model

ROWS = [{"id": f"r{i}", "prompt": text} for i, text in enumerate(["The sea is", "1, 2, 3,", "Once upon a", "x"])]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(ModelConfig(model=str(tiny_model_dir)))


class BatchBug(RuntimeError):
    pass


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_a_failed_step_is_decoded_row_by_row_marked_counted_and_logged(tiny, monkeypatch, caplog, batching):
    config = DecodingConfig(method="vanilla", max_new_tokens=6, batching=batching)
    expected = DecodeEngine(tiny, config, batch_size=2).run_rows(ROWS)
    engine = DecodeEngine(tiny, config, batch_size=2)
    step = engine.decoder.step

    def step_unless_batched(cache, buffers, kv_len, *args, **kwargs):
        if kv_len.shape[0] > 1:
            raise BatchBug("a bug in the batched path")
        return step(cache, buffers, kv_len, *args, **kwargs)

    monkeypatch.setattr(engine.decoder, "step", step_unless_batched)
    with caplog.at_level(logging.WARNING, logger="workers.engine"):
        got = engine.run_rows(ROWS)
    assert [o.output_token_ids for o in got] == [o.output_token_ids for o in expected]
    assert all(o.batch_fallback and o.error is None for o in got)
    assert not any(o.batch_fallback for o in expected)
    assert engine.batch_fallbacks == 2  # two steps over two rows: each pair of rows was decoded alone
    records = [r for r in caplog.records if r.name == "workers.engine"]
    assert len(records) == 2 and all("BatchBug" in r.getMessage() for r in records)
    # The first carries the traceback; later ones are one line each.
    assert records[0].exc_info and records[0].exc_info[0] is BatchBug and not records[1].exc_info


def test_fallback_rows_are_counted_per_device_and_in_the_table():
    progress = Progress(4, 0, interval_s=1e9)
    def part(ids, fallback):  # a part's summary (jobs/output.part_summary): every row decoded, 3 tokens in 3 steps
        return {"ids": ids, "rows": len(ids), "failed": 0, "retry": [],
                "tally": {"output_tokens": 3 * len(ids), "steps": 3 * len(ids), "batch_fallback": fallback}}

    progress.add_part(part(["a", "b"], 2), group="g", device="cpu: X", seconds=1.0)
    progress.add_part(part(["c"], 0), group="g", device="gpu: Y", seconds=1.0)
    assert progress.total.batch_fallback_rows == 2
    by_device = {device: {"workers": 1, **tally.as_dict()} for device, tally in progress.devices.items()}
    assert by_device["cpu: X"]["batch_fallback_rows"] == 2 and by_device["gpu: Y"]["batch_fallback_rows"] == 0
    header, cpu, gpu = device_table(by_device).splitlines()
    assert header.split()[-3:] == ["batch", "fallback", "rows"]
    assert cpu.split()[-2] == "-"  # no slot counters were reported: no occupancy
    assert cpu.split()[-1] == "2" and gpu.split()[-1] == "0"
