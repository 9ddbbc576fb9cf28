#!/usr/bin/env python3
"""Adaptation in the job (--adapt-prompts), measured: tau before and after, per workload, side by side.

    python -m jobs.bench.adapt                                   # 400 rows of chat, code and a templated task
    python -m jobs.bench.adapt --rows 1000 --workloads code --baseline --json outputs/bench_adapt.json

For each workload (public sets no prompt-token training here has seen; ../shared/data), two jobs run as a
user would run them, with `--adapt-prompts on`: from the shipped artifact, and from untrained prompt tokens
(standing in for a model with no artifact). Their outputs are identical (greedy PPD is lossless), so the
shipped artifact without adaptation needs no job of its own: it is replayed over the same rows. With
`--baseline`, a third job runs the shipped artifact with adaptation off, for adaptation's share of wall time.
That difference carries the machine's drift between jobs; `cost_in_job` reads the cost from the adapting job alone:
the decoding speed lost while adaptation ran, against the speed before and after it.

Tau is exact greedy acceptance replay (trees/acceptance.py) over rows no training saw (the first `--eval-rows`
past the shards the jobs learn from, in input order; each job's count of rows decoded after its swap is
reported beside), each prompt-token version on its own 63-node tree, built from its artifact's acceptance table.
The jobs wait for a training still running when their rows run out (`finish_after_last_row`), so that a short
job still yields its artifact. Beside them: a suffix index over the job's earlier outputs (trees/suffix.py),
the model-free alternative, replayed the same way. `--check-decode N` decodes N of those rows for real at 63 nodes
and checks the steps against the replay. The GPU view takes the shipped H100 latency profile: for each version,
the tree a worker would plan at batch 1 and 16, its replay tau, and tau x batch over the profiled step time.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml

from decoding import PPDDecoder
from jobs.output import read_output
from jobs.train.data import DEFAULT_DATA_DIR, instruction_text, read_jsonl
from profiling.latency import LatencyProfile
from trees.acceptance import ranks_of_versions, replay_decoding
from trees.paths import fixed_size_tree_set
from trees.suffix import SuffixIndex, replay_suffix
from workers.artifacts import find_shipped_artifact, load_prompt_tokens
from workers.configs import AdaptationConfig, ModelConfig
from workers.models import encode_row, load_model
from workers.planning import best_tree_set

REPO_ROOT = Path(__file__).resolve().parents[2]
H100_PROFILE = REPO_ROOT / "artifacts" / "measurements" / "h100-latency-profile-float32.json"
TEMPLATE = "Summarize the following text in one sentence.\n\n{text}"


def workload_rows(name: str, count: int, data_dir: Path) -> list[dict]:
    """chat: GPTeacher roleplay instructions; code: Code Alpaca tasks; template: one instruction over GPTeacher's
    reference outputs (rows past those the chat workload takes), as a dataset builder's templated job."""
    if name == "template":
        source = read_jsonl(data_dir / "gpteacher_roleplay.jsonl")[-count:]
        return [{"id": f"template-{r['id']}",
                 "messages": [{"role": "user", "content": TEMPLATE.format(text=r["output"])}]} for r in source]
    source = read_jsonl(data_dir / {"chat": "gpteacher_roleplay.jsonl", "code": "code_alpaca_2k.jsonl"}[name])[:count]
    return [{"id": f"{name}-{r['id']}",
             "messages": [{"role": "user", "content": instruction_text(r["instruction"], r.get("input"))}]}
            for r in source]


def run_job(rows_file: Path, out: Path, args: argparse.Namespace, prompts: str, mode: str) -> dict:
    if args.reuse and (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
        if summary.get("rows_ok") == args.rows and summary.get("config", {}).get("adaptation", {}).get("mode") == mode:
            print(f"reusing {out} (its summary.json: {summary['wall_seconds']:.0f} s wall)", flush=True)
            return summary
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({"adaptation": {"mode": mode, "finish_after_last_row": True}}))
    command = [sys.executable, "jobs/run.py", "--input", str(rows_file), "--output", str(out), "--overwrite",
               "--config", str(config), "--prompts", prompts, "--max-new-tokens", str(args.max_new_tokens),
               "--batch-size", str(args.batch_size), "--progress-interval-s", "60"]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    summary = json.loads((out / "summary.json").read_text())
    summary["bench_wall_seconds"] = time.perf_counter() - started
    return summary


def evaluate(lm, versions: dict, rows: list[tuple[list[int], list[int]]], earlier: list[list[int]],
             check_decode: int) -> dict:
    """Replay tau at 63 nodes per version, the suffix index's, the GPU view, and the real-decode check."""
    names = list(versions)
    ranks = [ranks_of_versions(lm.model, [versions[n] for n in names], p, r) for p, r in rows]
    tokens = sum(len(r) for _, r in rows)
    out: dict = {"rows": len(rows), "tokens": tokens, "tau_63": {}, "gpu_h100": {}}
    trees = {}
    for v, name in enumerate(names):
        table = versions[name].meta.extra["acceptance"]
        trees[name] = fixed_size_tree_set(table, 63, versions[name].k)
        steps = sum(replay_decoding(rk[v], trees[name], len(r)) for rk, (_, r) in zip(ranks, rows))
        out["tau_63"][name] = round(tokens / steps, 4)
    index = SuffixIndex()
    for output in earlier:
        index.add(output)
    suffix_tokens, suffix_steps = replay_suffix(rows, index)
    out["tau_63"]["suffix_index"] = round(suffix_tokens / suffix_steps, 4)
    profile = LatencyProfile.model_validate_json(H100_PROFILE.read_text())
    for v, name in enumerate(names):
        pt = versions[name]
        view = {}
        for batch in (1, 16):
            choice = best_tree_set(profile, pt.meta.extra["acceptance"], pt.k, pt.n, batch)
            steps = sum(replay_decoding(rk[v], choice.chosen.tree_set, len(r)) for rk, (_, r) in zip(ranks, rows))
            tau = tokens / steps
            view[str(batch)] = {"slots": choice.chosen.slots, "tau": round(tau, 4),
                                "tokens_per_s": round(batch * tau / choice.step_seconds, 1),
                                "plain_tokens_per_s": round(batch / profile.step_seconds(batch, 1), 1)}
        out["gpu_h100"][name] = view
    checks = []
    for v, name in enumerate(names[1:], start=1):  # the adapted versions
        decoder = PPDDecoder(lm.model, versions[name], tree_set=trees[name], eos_token_ids=[])
        for (prompt, output), rk in list(zip(rows, ranks))[:check_decode]:
            result = decoder.generate([prompt], len(output))[0]
            checks.append({"version": name, "equal_output": result.token_ids == output,
                           "steps": result.num_steps, "replay_steps": replay_decoding(rk[v], trees[name], len(output))})
    out["decode_checks"] = checks
    return out


def bench_workload(name: str, args: argparse.Namespace, lm, shipped_dir: Path, work: Path) -> dict:
    rows = workload_rows(name, args.rows, Path(args.data_dir))
    rows_file = work / f"{name}.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    starts = {"shipped": str(shipped_dir), "untrained": "untrained"}
    jobs = {f"{v}+adapt": run_job(rows_file, work / f"{name}-{v}-adapt", args, starts[v], "on") for v in args.variants}
    if args.baseline:
        jobs["shipped"] = run_job(rows_file, work / f"{name}-shipped", args, str(shipped_dir), "off")
    result: dict = {"workload": name, "jobs": {k: {"wall_seconds": round(s["wall_seconds"], 1),
                                                   "decode_seconds": round(s["decode_seconds"], 1),
                                                   "tokens_per_s": round(s["tokens_per_s"], 2),
                                                   "adaptation": s["adaptation"]} for k, s in jobs.items()}}
    versions = {"shipped": load_prompt_tokens(shipped_dir, expect_model_hash=lm.content_hash)}
    by_id = {r["id"]: r for r in rows}
    outputs: dict[str, list[int]] = {}
    for job in [f"{v}+adapt" for v in args.variants]:
        adaptation = jobs[job]["adaptation"]
        if adaptation["state"] != "published":
            result[f"{job} not evaluated"] = adaptation["reason"]
            continue
        out = work / f"{name}-{job.replace('+', '-')}"
        versions[job] = load_prompt_tokens(out / Path(adaptation["artifact"]).name, expect_model_hash=lm.content_hash)
        table = read_output(out).to_pylist()
        result["jobs"][job]["rows_after_swap"] = sum(r["prompts_hash"] == adaptation["prompts_hash"] for r in table)
        result["jobs"][job]["cost_in_job"] = cost_in_job(table, adaptation, jobs[job]["wall_seconds"])
        outputs.update({r["id"]: r["output_token_ids"] for r in table})
    if len(versions) == 1:
        return result
    # The rows no training saw: past the first shards a job learns from (its first rows, and a shard more).
    order = [r["id"] for r in rows]
    unseen = first_unseen_row(args)
    evaluated = [i for i in order[unseen:] if outputs.get(i)][: args.eval_rows]
    if not evaluated:
        result["not evaluated"] = f"no row past the first {unseen}"
        return result
    result["evaluated_rows_from"] = unseen
    first = order.index(evaluated[0])
    earlier = [outputs[i] for i in order[:first] if outputs.get(i)]
    pairs = [(encode_row(lm.tokenizer, messages=by_id[i]["messages"]), outputs[i]) for i in evaluated]
    result["evaluation"] = evaluate(lm, versions, pairs, earlier, args.check_decode)
    if args.baseline:
        result["adaptation_share"] = adaptation_share(result["jobs"])
    return result


def adaptation_share(jobs: dict) -> dict:
    """Per adapting job, the share of its time the adaptation cost against the job with adaptation off, side by
    side: by wall time, and by decode time (first worker ready to last row; start-up profiling excluded). On this
    CPU every variant decodes plainly (trees do not pay), so the difference is the training's and gate's cost."""
    base = jobs["shipped"]
    return {job: {key: round((s[key] - base[key]) / s[key], 4) for key in ("wall_seconds", "decode_seconds")}
            for job, s in jobs.items() if job.endswith("+adapt")}


def cost_in_job(rows: list[dict], adaptation: dict, wall_seconds: float, tail_rows: int = 16) -> dict:
    """Adaptation's cost read from one job, free of the machine's drift between jobs: output tokens per second of
    the rows that finished while it ran, against the rows that finished before and after (the first finished row
    on; the last ``tail_rows``, which finish with slots left empty, left out). Cost: the window's seconds times
    the speed it lost; share: that over the job's wall time."""
    if "started_at" not in adaptation:
        return {"not measured": "the job's summary names no adaptation start"}
    start = datetime.fromisoformat(adaptation["started_at"]).timestamp()
    end = start + adaptation["wall_seconds"]
    done = sorted((r["finished_at"].timestamp(), r["num_output_tokens"]) for r in rows if r["finished_at"])
    if len(done) <= tail_rows:
        return {"not measured": f"{len(done)} finished rows: too few past the last {tail_rows}"}
    first, last = done[0][0], done[-1 - tail_rows][0]
    inside = sum(n for t, n in done if start <= t < end)
    outside = sum(n for t, n in done if first < t < start or end <= t <= last)
    outside_s = max(start - first, 0.0) + max(last - end, 0.0)
    if not inside or not outside or outside_s <= 0:
        return {"not measured": "no rows finished inside or outside the adaptation's window"}
    inside_rate, outside_rate = inside / (end - start), outside / outside_s
    cost = (end - start) * (1 - inside_rate / outside_rate)
    return {"window_s": round(end - start, 1), "tokens_per_s_inside": round(inside_rate, 2),
            "tokens_per_s_outside": round(outside_rate, 2), "cost_s": round(cost, 1),
            "share": round(cost / wall_seconds, 4)}


def first_unseen_row(args: argparse.Namespace, shard_size: int = 64) -> int:
    """The first input row past every shard a job of these rows learns from (jobs/adapt.first_todo_shards)."""
    settings = AdaptationConfig()
    target = min(settings.train_rows + settings.held_out_rows, args.rows // 2)
    return (math.ceil(target / shard_size) + 1) * shard_size


def table(results: list[dict]) -> str:
    lines = ["| workload | rows replayed | shipped | shipped + adaptation | untrained + adaptation | suffix index "
             "| untrained+adapt / shipped | training s (shipped / untrained) | adaptation wall s "
             "| its cost, share of job |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ev = r.get("evaluation")
        if not ev:
            lines.append(f"| {r['workload']} | not evaluated: {r} |")
            continue
        tau = ev["tau_63"]
        jobs = r["jobs"]
        variants = ("shipped+adapt", "untrained+adapt")
        train = " / ".join(str(jobs[j]["adaptation"].get("train_seconds", "-")) if j in jobs else "-" for j in variants)
        wall = " / ".join(str(jobs[j]["adaptation"].get("wall_seconds", "-")) if j in jobs else "-" for j in variants)
        cost = " / ".join(f"{jobs[j]['cost_in_job']['share']:.1%}" if "share" in jobs[j].get("cost_in_job", {}) else "-"
                          for j in variants if j in jobs)
        ratio = tau.get("untrained+adapt", 0) / tau["shipped"]
        lines.append(f"| {r['workload']} | {ev['rows']} | {tau['shipped']:.3f} | {tau.get('shipped+adapt', 0):.3f} "
                     f"| {tau.get('untrained+adapt', 0):.3f} | {tau['suffix_index']:.3f} | {ratio:.3f} | {train} "
                     f"| {wall} | {cost} |")
    return "\n".join(lines)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.adapt", description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["chat", "code", "template"],
                   choices=["chat", "code", "template"])
    p.add_argument("--rows", type=int, default=400, help="rows per job (default: 400)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", default="8", help="the jobs' --batch-size (default: 8)")
    p.add_argument("--eval-rows", type=int, default=64, help="rows decoded after both swaps replayed (default: 64)")
    p.add_argument("--check-decode", type=int, default=1, help="rows per adapted version decoded for real at "
                   "63 nodes (default: 1; ~1 minute each on the 2-core CPU)")
    p.add_argument("--variants", nargs="+", default=["shipped", "untrained"], choices=["shipped", "untrained"],
                   help="the prompt tokens the adapting jobs start from (default: both)")
    p.add_argument("--baseline", action="store_true", help="also run the shipped artifact with adaptation off")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--work-dir", help="where the jobs write (default: a temporary directory)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--reuse", action="store_true", help="a job whose output in --work-dir is whole (summary.json: "
                   "every row, the same adaptation mode) is not run again: an interrupted run goes on")
    args = p.parse_args(argv)
    lm = load_model(ModelConfig())
    shipped = find_shipped_artifact(lm.content_hash)
    if shipped is None:
        raise SystemExit("no shipped prompt-token artifact for the default model")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-adapt-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.workloads:
            results.append(bench_workload(name, args, lm, shipped, work))
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
