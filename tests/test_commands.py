"""Every entry point starts: each script under jobs/ answers ``--help`` as ``python -m`` (or, for the job,
``python jobs/run.py``) runs it, and every command the README shows names one of them and parses."""

from __future__ import annotations

import ast
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
        "jobs.bench.adapt", "jobs.bench.continuous", "jobs.bench.decode", "jobs.bench.draws", "jobs.bench.driver",
        "jobs.bench.gpu_check",
        "jobs.bench.inputs",
        "jobs.bench.job_speed", "jobs.bench.overhead", "jobs.bench.propd", "jobs.bench.prune", "jobs.bench.real_size",
        "jobs.bench.sampling",
        "jobs.bench.time_step", "jobs.bench.tree", "jobs.cost.study", "jobs.export", "jobs.reference",
        "jobs.train.evaluate", "jobs.train.prompt_tokens", "jobs.train.prune_head",
    }


@pytest.mark.parametrize("target", [JOB_SCRIPT, *entry_points()])
def test_every_entry_point_answers_help(target, capsys, monkeypatch):
    assert "usage:" in help_text(target, capsys, monkeypatch)


def process_wide_autograd_switches(source: str) -> list[int]:
    """Lines of ``source`` that turn autograd on or off for the whole process: ``torch.set_grad_enabled(...)``
    called as a statement, not as a ``with`` block or a decorator."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) in ("torch.set_grad_enabled", "set_grad_enabled")]


def test_no_code_turns_autograd_off_for_the_whole_process():
    """Tests and benchmarks call entry points' ``main`` in-process: a process-wide switch would leave autograd off
    for whatever runs next (training, in the same test session). Scoped ``torch.no_grad()`` or
    ``inference_mode()`` only."""
    assert process_wide_autograd_switches("import torch\ntorch.set_grad_enabled(False)\n") == [2]
    assert process_wide_autograd_switches("with torch.set_grad_enabled(False):\n    pass\n") == []
    found = {str(path.relative_to(REPO_ROOT)): lines
             for package in ("jobs", "workers", "decoding", "profiling", "trees")
             for path in sorted((REPO_ROOT / package).rglob("*.py"))
             if (lines := process_wide_autograd_switches(path.read_text()))}
    assert found == {}


def readme_commands(pages: tuple[str, ...] = ("README.md",)) -> list[list[str]]:
    """The commands of these pages that run a project entry point: each shell line in a code block that (after
    environment assignments, and after ``--`` for ``ray job submit``) starts ``python jobs/run.py`` or
    ``python -m jobs.``, as argv from the entry point on."""
    text = "\n".join((REPO_ROOT / page).read_text() for page in pages)
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


DOC_PAGES = ("README.md", *sorted(f"docs/{p.name}" for p in (REPO_ROOT / "docs").glob("*.md")))


@pytest.mark.parametrize("argv", readme_commands(DOC_PAGES), ids=lambda argv: " ".join(argv[1:4]))
def test_every_documented_command_parses(argv, capsys, monkeypatch):
    """The entry point exists and knows every flag the README or a docs page gives it."""
    target = argv[2] if argv[1] == "-m" else argv[1]
    flags = argv[3:] if argv[1] == "-m" else argv[2:]
    usage = help_text(target, capsys, monkeypatch)
    for flag in (a.split("=")[0] for a in flags if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", usage), f"README: {target} has no flag {flag}"


def test_the_generated_reference_pages_are_current():
    """docs/options.md and docs/output-schema.md say what the configuration models and RowOutput say."""
    from jobs import reference

    assert reference.main(["--check"]) == 0, "run: python -m jobs.reference"
    options = (REPO_ROOT / "docs" / "options.md").read_text()
    assert "| `decoding.sampling.temperature` | float | `0.0` | `--temperature` |" in options
    assert "| `workers[].batch_size` |" in options and "`--batch-size`" in options
    schema = (REPO_ROOT / "docs" / "output-schema.md").read_text()
    assert "| `sample_index` | `int32` | no |" in schema and "- `worker_died`: " in schema


# A value for each config flag (not its default) and what it parses to.
FLAG_VALUES = {
    "input": ("in.jsonl", "in.jsonl"), "output": ("out", "out"), "shard_size": ("7", 7), "model": ("m", "m"),
    "dtype": ("bfloat16", "bfloat16"), "device": ("cuda:1", "cuda:1"), "attn_implementation": ("eager", "eager"),
    "cache_dir": ("c", "c"), "cpu_linear": ("torch", "torch"), "decoding": ("vanilla", "vanilla"),
    "batching": ("static", "static"), "compile": ("on", "on"), "cuda_graphs": ("off", False),
    "max_new_tokens": ("9", 9), "temperature": ("0.5", 0.5), "top_p": ("0.9", 0.9), "top_k": ("5", 5),
    "stop": ("END", ["END"]), "seed": ("11", 11), "n": ("1", 1), "prompts": ("untrained", "untrained"),
    "tree_nodes": ("12", 12), "tree_sizing": ("static", "static"), "prune_head": ("auto", "auto"),
    "keep_top_k": ("4", 4), "profile_budget_s": ("2.5", 2.5), "num_prompt_tokens": ("2", 2),
    "adapt_prompts": ("on", "on"), "gpu_memory_utilization": ("0.8", 0.8), "max_prompt_tokens": ("512", 512),
    "input_format": ("openai-batch", "openai-batch"), "output_format": ("openai-batch", "openai-batch"),
    "batch_size": ("auto", "auto"), "num_workers": ("3", 3), "num_cpus_per_worker": ("1.5", 1.5),
    "num_gpus_per_worker": ("0.5", 0.5),
}


def test_every_config_flag_sets_its_key():
    """Each flag CONFIG_FLAGS declares parses (None when absent, so the file's or the default value applies)
    and lands at its key in the JobConfig that build_config makes."""
    from jobs.config import CONFIG_FLAGS, build_config
    from jobs.run import parse_args

    assert set(FLAG_VALUES) == set(CONFIG_FLAGS)
    assert all(getattr(parse_args([]), dest) is None for dest in CONFIG_FLAGS)
    for dest, (text, expected) in FLAG_VALUES.items():
        argv = ["--" + dest.replace("_", "-")] + ([] if text is None else [text])
        args = vars(parse_args(argv))
        cfg = build_config(None, {k: v for k, v in args.items() if k in CONFIG_FLAGS})
        path = CONFIG_FLAGS[dest].path
        node = cfg.workers[0] if path[0] == "workers" else cfg
        for key in path[1:] if path[0] == "workers" else path:
            node = getattr(node, key)
        assert node == expected, f"{argv}: {'.'.join(path)} is {node!r}"


def test_no_module_imports_a_script():
    """Scripts share code through modules (jobs/bench/common.py, jobs/train/data.py, ...), never by importing
    one another: a script's imports are its own business, and a script imported elsewhere is a module twice."""
    import ast

    scripts = set(entry_points()) | {"jobs.run"}
    offenders = []
    for package in ("jobs", "workers", "decoding", "profiling", "trees"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                offenders += [f"{path.relative_to(REPO_ROOT)} imports {n}" for n in names if n in scripts]
    assert not offenders, offenders


def test_the_input_benchmark_plans_from_the_repository(tmp_path, capsys):
    """jobs.bench.inputs runs jobs/run.py --plan-only as its own process: a first run plans every shard, a
    resume none (the script finds the job where the repository keeps it)."""
    from jobs.bench import inputs

    inputs.main(["--rows", "300", "--shard-size", "64", "--dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == [
        "parquet, first run", "jsonl, first run", "parquet, resume (every row written, a job's index files)",
        "parquet, resume (every row written, footers only)"]
    assert [line.endswith(("5 of 5 shards to decode", "0 of 5 shards to decode")) for line in lines] == [True] * 4
    assert ["0 of 5" in line for line in lines] == [False, False, True, True]


def test_the_benchmarks_default_inputs_exist():
    from jobs.bench import decode

    assert Path(decode.BenchConfig().input).is_file()
