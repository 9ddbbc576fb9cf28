"""The decoding core and the Ray-free engine must not pull in the distributed / storage layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _loaded_after_import(module: str) -> set[str]:
    code = (
        f"import sys, {module}\n"
        "print(' '.join(m for m in ('ray', 'pyarrow') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    return set(done.stdout.split())


def test_decoding_imports_neither_ray_nor_pyarrow():
    assert _loaded_after_import("decoding") == set()


def test_engine_does_not_import_ray():
    assert "ray" not in _loaded_after_import("workers.engine")
