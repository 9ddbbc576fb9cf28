"""jobs.bench.adapt's reading of adaptation's cost from one job's rows."""

from datetime import UTC, datetime, timedelta

from jobs.bench.adapt import cost_in_job

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def rows_at(rate_per_s: float, start_s: float, end_s: float, tokens: int = 10) -> list[dict]:
    """Rows of ``tokens`` tokens finishing evenly at ``rate_per_s`` tokens per second over [start_s, end_s)."""
    gap = tokens / rate_per_s
    count = round((end_s - start_s) / gap)
    return [{"finished_at": T0 + timedelta(seconds=start_s + i * gap), "num_output_tokens": tokens}
            for i in range(count)]


def test_the_cost_is_the_speed_lost_while_adaptation_ran():
    # 100 tok/s, except 60 tok/s while adaptation ran (seconds 200-300): 40 s lost in a 500 s job.
    rows = rows_at(100, 0, 200) + rows_at(60, 200, 300) + rows_at(100, 300, 500)
    adaptation = {"started_at": (T0 + timedelta(seconds=200)).isoformat(), "wall_seconds": 100.0}
    cost = cost_in_job(rows, adaptation, wall_seconds=500.0)
    assert abs(cost["cost_s"] - 40.0) < 1.0, cost
    assert abs(cost["share"] - 0.08) < 0.002, cost
    assert cost["tokens_per_s_inside"] == 60.0


def test_no_start_recorded_is_said_not_guessed():
    rows = rows_at(100, 0, 100)
    assert "not measured" in cost_in_job(rows, {"wall_seconds": 10.0}, wall_seconds=100.0)


def test_a_job_of_fewer_rows_than_its_tail_is_not_measured():
    adaptation = {"started_at": T0.isoformat(), "wall_seconds": 10.0}
    assert "not measured" in cost_in_job(rows_at(100, 0, 1), adaptation, wall_seconds=100.0)
