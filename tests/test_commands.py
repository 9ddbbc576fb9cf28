"""Every entry point starts: each script under jobs/ answers ``--help`` as ``python -m`` (or, for the job,
``python jobs/run.py``) runs it, and every command the README shows names one of them and parses."""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_SCRIPT = "jobs/run.py"


def entry_points() -> list[str]:
    """The modules under jobs/ that run as scripts (they end in ``if __name__ == "__main__"``)."""
    found = []
    for path in sorted((REPO_ROOT / "jobs").rglob("*.py")):
        if path != REPO_ROOT / JOB_SCRIPT and 'if __name__ == "__main__":' in path.read_text():
            found.append(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts))
    return found


def help_text(target: str, capsys, monkeypatch) -> str:
    """Run ``target`` (a module name, or the job's script path) with ``--help``, as its command line would."""
    monkeypatch.setattr(sys, "argv", [target, "--help"])
    monkeypatch.delitem(sys.modules, target, raising=False)  # run it afresh, as its own command line would
    with pytest.raises(SystemExit) as stop:
        if target == JOB_SCRIPT:
            runpy.run_path(str(REPO_ROOT / JOB_SCRIPT), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    assert stop.value.code in (0, None), f"{target} --help exited with {stop.value.code}"
    return capsys.readouterr().out


def test_the_entry_points_are_the_ones_the_docs_name():
    """A script moved or added is a change to the docs too (docs/benchmarks.md, docs/training.md ...)."""
    assert set(entry_points()) == {
        "jobs.bench.continuous", "jobs.bench.decode", "jobs.bench.inputs", "jobs.bench.overhead",
        "jobs.bench.propd", "jobs.bench.prune", "jobs.bench.sampling", "jobs.bench.time_step", "jobs.bench.tree",
        "jobs.cost.study", "jobs.train.evaluate", "jobs.train.prompt_tokens", "jobs.train.prune_head",
    }


@pytest.mark.parametrize("target", [JOB_SCRIPT, *entry_points()])
def test_every_entry_point_answers_help(target, capsys, monkeypatch):
    assert "usage:" in help_text(target, capsys, monkeypatch)


def readme_commands() -> list[list[str]]:
    """The README's commands that run a project entry point: each shell line in a code block that (after
    environment assignments, and after ``--`` for ``ray job submit``) starts ``python jobs/run.py`` or
    ``python -m jobs.``, as argv from the entry point on."""
    text = (REPO_ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ")
            if not re.match(r"(?:[A-Z_]+=\S*\s+)*(?:python3?|ray)\s", line):
                continue
            argv = shlex.split(line)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv = argv[1:]
            if argv[:3] == ["ray", "job", "submit"]:
                assert "--" in argv, f"README: {line!r} gives ray no entry point after --"
                argv = argv[argv.index("--") + 1:]
            if argv and argv[0] in ("python", "python3") and argv[1:2] in ([JOB_SCRIPT], ["-m"]):
                commands.append(argv)
    return commands


def test_the_readme_shows_the_job_and_its_submission():
    commands = readme_commands()
    assert sum(argv[1] == JOB_SCRIPT for argv in commands) >= 2, "the job, locally and through ray job submit"
    assert "make test" in (REPO_ROOT / "README.md").read_text(), "the test command CI runs (.ci/run)"


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda argv: " ".join(argv[1:4]))
def test_every_readme_command_parses(argv, capsys, monkeypatch):
    """The entry point exists and knows every flag the README gives it (``--help`` is parsed after them)."""
    target = argv[2] if argv[1] == "-m" else argv[1]
    flags = argv[3:] if argv[1] == "-m" else argv[2:]
    usage = help_text(target, capsys, monkeypatch)
    for flag in (a.split("=")[0] for a in flags if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", usage), f"README: {target} has no flag {flag}"
