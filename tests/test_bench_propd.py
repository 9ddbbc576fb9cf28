"""jobs/bench/propd.py's --from-json: the table of a run's --json file, or of a shipped measurement (which wraps
the run with its provenance), with the ratios recomputed from the rounds."""

import json
from pathlib import Path

import pytest

from jobs.bench import propd as bench_propd

SHIPPED = Path(__file__).resolve().parents[1] / "artifacts" / "measurements"


@pytest.mark.parametrize("name", ["cpu-bench_propd-float32.json", "h100-bench_propd-float32.json"])
def test_the_table_of_a_shipped_measurement_and_of_its_bare_run(name, tmp_path, capsys):
    shipped = json.loads((SHIPPED / name).read_text())
    bare = tmp_path / "run.json"
    bare.write_text(json.dumps(shipped["bench"]))
    tables = []
    for path in (SHIPPED / name, bare):
        assert bench_propd.main(["--from-json", str(path)]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1]
    rows = [line for line in tables[0].splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in rows] == [r["batch"] for r in shipped["bench"]["results"]]
    # The ratio column is the median over rounds of propd against the better method by median, recomputed.
    first = shipped["bench"]["results"][0]
    assert f"{bench_propd.paired_ratios(first)['propd_vs_best']:.3f}" in rows[0]
