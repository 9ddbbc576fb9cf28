"""The decoding core and the Ray-free engine must not pull in the distributed / storage layers, the decoding core
not tree search or device profiling either, and the driver's planning (reading the input and the output,
--plan-only) must not pull in torch or Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "pyarrow", "torch", "transformers")


def _loaded_after_import(module: str, watched: tuple[str, ...] = HEAVY) -> set[str]:
    """Which of ``watched`` a fresh interpreter has loaded after ``import sys, {module}`` (module: one name, or
    several separated by commas)."""
    code = (
        f"import sys, {module}\n"
        f"print(' '.join(m for m in {watched!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    return set(done.stdout.split())


def test_decoding_imports_neither_ray_nor_pyarrow():
    assert not {"ray", "pyarrow"} & _loaded_after_import("decoding")


def test_decoding_imports_neither_tree_search_nor_profiling():
    """The decoder takes tree sets; searching them (trees/) and timing the device (profiling/) sit above it."""
    modules = ["decoding"] + sorted(f"decoding.{p.stem}" for p in (REPO_ROOT / "decoding").glob("*.py")
                                    if p.stem != "__init__")
    assert len(modules) > 10  # the glob found the core's modules; all are imported in one interpreter
    assert not _loaded_after_import(", ".join(modules), ("trees", "profiling"))


def test_the_driver_plans_without_torch_or_ray():
    """jobs/run.py loads Ray (and, through the actors' module, torch) only to run a pool: a plan of 10M rows
    fits its memory target only without their ~300 MB."""
    assert {"ray", "torch", "transformers"}.isdisjoint(_loaded_after_import("jobs.run"))


def test_engine_does_not_import_ray():
    assert "ray" not in _loaded_after_import("workers.engine")


def test_the_configuration_models_have_one_home():
    """ModelConfig, DecodingConfig and SamplingConfig are imported from workers/configs.py, which loads no torch
    (the driver parses them), and from nowhere else."""
    import ast

    homed = {"ModelConfig", "DecodingConfig", "SamplingConfig", "CpuLinear", "DecodingMethod"}
    elsewhere = []
    for path in sorted(REPO_ROOT.glob("*/**/*.py")):
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "workers.configs":
                elsewhere += [f"{path.relative_to(REPO_ROOT)}: {a.name} from {node.module}"
                              for a in node.names if a.name in homed]
    assert not elsewhere, elsewhere
    assert not {"torch", "transformers"} & _loaded_after_import("workers.configs")
