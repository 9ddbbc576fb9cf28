#!/usr/bin/env python3
"""Validate the hardware-aware tree: predicted tau against measured, the chosen budget against a sweep of
every budget, and two "devices" (batch sizes or thread counts here; CPU and CUDA where a GPU is present)
each getting its own tree.

    python jobs/bench_tree.py                                   # CPU, batch 1 and 8
    python jobs/bench_tree.py --setups cpu:1:2 cpu:8:2 cuda:8   # device:batch[:threads]

For each setup (device, batch size, torch threads): the worker's start-up (profile from cache or measured,
tree chosen from the shipped acceptance table), then every profiled budget decodes the same held-out prompts
(GSM8K / Alpaca seed tasks / stdlib docstrings, the split the prompt tokens never trained on), rounds
interleaved across budgets so machine drift hits all alike; the median round counts. The tree of a budget
does not depend on the device, so the sweep also measures each setup's chosen tree on the other setups.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from decoding import PPDDecoder  # noqa: E402
from jobs.distill_data import DEFAULT_DATA_DIR, all_prompts, select  # noqa: E402
from profiling.device import identify  # noqa: E402
from profiling.latency import load_or_measure_profile  # noqa: E402
from profiling.tree_builder import build_tree_set, choose_budget, vanilla_built  # noqa: E402
from workers.artifacts import find_shipped_artifact, load_prompt_tokens  # noqa: E402
from workers.models import ModelConfig, encode_row, load_model, resolve_cache_dir  # noqa: E402


def held_out_prompts(tokenizer, per_kind: int, data_dir: Path) -> list[list[int]]:
    items = [it for kind, its in all_prompts(data_dir).items() for it in select(its, per_kind, held_out=True)]
    return [encode_row(tokenizer, messages=it.chat()) for it in items]


def decode_all(decoder: PPDDecoder, prompts: list[list[int]], batch: int, max_new_tokens: int, device) -> dict:
    """Decode the prompts in batches of ``batch``; tokens, steps and seconds."""
    tokens = steps = 0
    outputs = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        for r in decoder.generate(prompts[start: start + batch], max_new_tokens):
            tokens, steps = tokens + r.num_tokens, steps + r.num_steps
            outputs.append(r.token_ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"tokens": tokens, "steps": steps, "seconds": time.perf_counter() - t0, "outputs": outputs}


def bench_setup(setup: str, args, prompts_cache: dict) -> dict:
    device, batch, *threads = setup.split(":")
    batch = int(batch)
    if threads:
        torch.set_num_threads(int(threads[0]))
    lm = load_model(ModelConfig(model="default", device=device))
    artifact = args.prompts or find_shipped_artifact(lm.content_hash)
    if artifact is None:
        raise SystemExit("no trained prompt-token artifact for this model (give --prompts)")
    pt = load_prompt_tokens(artifact, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype)
    table = pt.meta.extra["acceptance"]
    started = time.perf_counter()
    profile, cached = load_or_measure_profile(lm.model, pt, model_hash=lm.content_hash,
                                              cache_dir=resolve_cache_dir(None), batch_sizes=sorted({1, batch}),
                                              budget_s=args.profile_budget_s)
    choice = choose_budget(table, pt.k, lambda s: profile.step_seconds(batch, s), profile.measured_slots(batch),
                           n=pt.n)
    startup = time.perf_counter() - started
    name = identify(lm.device, lm.dtype).readable
    print(f"\n== {name}, batch {batch}: profile {'cached' if cached else f'measured in {profile.profile_seconds:.0f} s'}"
          f", start-up {startup:.1f} s; chosen budget {choice.chosen.budget} ({choice.chosen.slots} slots), "
          f"predicted tau {choice.chosen.estimate.expected_tokens:.2f}, predicted {choice.speedup:.2f}x", flush=True)

    key = (device, args.per_kind)
    if key not in prompts_cache:
        prompts_cache[key] = held_out_prompts(lm.tokenizer, args.per_kind, Path(args.data_dir))
    prompts = prompts_cache[key]
    if len(prompts) > batch:  # whole batches only: a short last batch would time a different batch size
        prompts = prompts[: len(prompts) - len(prompts) % batch]
    budgets = [b for b, *_ in choice.sweep]
    built = {b: vanilla_built(pt.k, len(table[0])) if b == 1
             else build_tree_set(table, pt.k, b, n=pt.n) for b in budgets}
    decoders = {b: PPDDecoder(lm.model, pt, built[b].tree_set, eos_token_ids=lm.eos_token_ids) for b in budgets}
    decode_all(decoders[budgets[0]], prompts[:batch], batch, 8, lm.device)  # warm-up
    runs: dict[int, list[dict]] = {b: [] for b in budgets}
    for _ in range(args.rounds):
        for b in budgets:
            runs[b].append(decode_all(decoders[b], prompts, batch, args.max_new_tokens, lm.device))
            print(".", end="", flush=True)
    print()
    reference = runs[1][0]["outputs"] if 1 in runs else runs[budgets[0]][0]["outputs"]
    rows = []
    for b in budgets:
        r = runs[b][0]
        seconds = statistics.median(x["seconds"] for x in runs[b])
        predicted_step = profile.step_seconds(batch, built[b].slots)
        rows.append({
            "budget": b, "slots": built[b].slots, "tree_hash": built[b].tree_set.tree_hash,
            "predicted_tau": built[b].estimate.expected_tokens, "measured_tau": r["tokens"] / r["steps"],
            "predicted_tok_s": batch * built[b].estimate.expected_tokens / predicted_step,
            "measured_tok_s": r["tokens"] / seconds, "seconds": seconds,
            "identical_to_plain": all(x["outputs"] == reference for x in runs[b]),
        })
    best = max(rows, key=lambda x: x["measured_tok_s"])
    chosen = next(x for x in rows if x["budget"] == choice.chosen.budget)
    return {"setup": setup, "device": name, "batch": batch, "threads": torch.get_num_threads(),
            "profile_cached": cached, "profile_seconds": profile.profile_seconds, "startup_seconds": startup,
            "chosen_budget": choice.chosen.budget, "chosen_tree_hash": choice.chosen.tree_set.tree_hash,
            "best_budget": best["budget"], "rows": rows, "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "tau_error": abs(chosen["predicted_tau"] - chosen["measured_tau"]) / chosen["measured_tau"],
            "chosen_vs_best": chosen["measured_tok_s"] / best["measured_tok_s"]}


def print_setup(res: dict) -> None:
    print(f"\n{res['device']}, batch {res['batch']}, {res['threads']} threads ({res['prompts']} held-out prompts, "
          f"{res['max_new_tokens']} new tokens)")
    print(f"{'budget':>6} {'slots':>5} {'tau pred':>8} {'tau meas':>8} {'tok/s pred':>10} {'tok/s meas':>10} "
          f"{'x best':>6} {'= plain':>7}")
    best = max(r["measured_tok_s"] for r in res["rows"])
    for r in res["rows"]:
        mark = (" <- chosen" if r["budget"] == res["chosen_budget"] else "") + (
            " <- best" if r["budget"] == res["best_budget"] else "")
        print(f"{r['budget']:>6} {r['slots']:>5} {r['predicted_tau']:>8.2f} {r['measured_tau']:>8.2f} "
              f"{r['predicted_tok_s']:>10.1f} {r['measured_tok_s']:>10.1f} {r['measured_tok_s'] / best:>6.3f} "
              f"{'yes' if r['identical_to_plain'] else 'NO':>7}{mark}")
    print(f"chosen tree: predicted tau off by {100 * res['tau_error']:.1f}% (target <= 10%); throughput "
          f"{100 * res['chosen_vs_best']:.1f}% of the best budget's (target >= 95%)")


def cross_check(results: list[dict]) -> list[str]:
    """Each setup's own tree against the other setups' trees, on its own device."""
    lines = []
    for own in results:
        by_hash = {r["tree_hash"]: r for r in own["rows"]}
        mine = by_hash[own["chosen_tree_hash"]]
        for other in results:
            if other is own:
                continue
            theirs = by_hash.get(other["chosen_tree_hash"])
            if theirs is None:
                lines.append(f"{own['setup']}: {other['setup']}'s tree was not measured here")
                continue
            lines.append(f"on {own['setup']}: own tree ({mine['slots']} slots) {mine['measured_tok_s']:.1f} tok/s, "
                         f"{other['setup']}'s tree ({theirs['slots']} slots) {theirs['measured_tok_s']:.1f} tok/s "
                         f"-> own/other {mine['measured_tok_s'] / theirs['measured_tok_s']:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs/bench_tree.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", nargs="+", default=None, help="device:batch[:threads] (default: cpu:1 cpu:8, "
                   "plus cuda:1 cuda:8 when a GPU is present)")
    p.add_argument("--prompts", help="prompt-token artifact (default: the one shipped for the model)")
    p.add_argument("--per-kind", type=int, default=8, help="held-out prompts per kind (chat, math, code)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median counts")
    p.add_argument("--profile-budget-s", type=float, default=None)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    setups = args.setups or (["cpu:1", "cpu:8"] + (["cuda:1", "cuda:8"] if torch.cuda.is_available() else []))
    torch.set_grad_enabled(False)
    cache: dict = {}
    results = [bench_setup(s, args, cache) for s in setups]
    for res in results:
        print_setup(res)
    print("\ncross-check (same device, each setup's chosen tree):")
    for line in cross_check(results):
        print("  " + line)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
