#!/usr/bin/env python3
"""Validate the hardware-aware tree: predicted tau against measured, the chosen budget against a sweep of
every budget, and two "devices" (batch sizes or thread counts here; CPU and CUDA where a GPU is present)
each getting its own tree.

    python -m jobs.bench.tree                                   # CPU, batch 1 and 8
    python -m jobs.bench.tree --setups cpu:1:2 cpu:8:2 cuda:8   # device:batch[:threads]

For each setup (device, batch size, torch threads): the worker's start-up (profile from cache or measured,
tree chosen from the shipped acceptance table), then every profiled budget decodes the same held-out prompts
(GSM8K / Alpaca seed tasks / stdlib docstrings, the split the prompt tokens never trained on), rounds
interleaved across budgets so machine drift hits all alike; the median round counts. Tau is also replayed
exactly (trees/acceptance.py) over every held-out response, whole: a short timed generation sees only
the start of responses, where guesses are harder. The tree of a budget does not depend on the device, so
the sweep also measures each setup's chosen tree on the other setups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from decoding import PPDDecoder
from jobs.train.data import DEFAULT_DATA_DIR, held_out_samples
from profiling.device import identify
from trees.acceptance import ranks_at_every_cut, replay_decoding
from trees.builder import build_tree_set, choose_budget, vanilla_built
from workers.artifacts import find_shipped_artifact, load_prompt_tokens
from workers.configs import ModelConfig
from workers.models import load_model, resolve_cache_dir
from workers.profiles import load_or_measure_profile


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


def bench_setup(setup: str, args, shared: dict) -> dict:
    """``shared``: the held-out samples and their ranks, computed once for all setups."""
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
    source = "cached" if cached else f"measured in {profile.profile_seconds:.0f} s"
    print(f"\n== {name}, batch {batch}: profile {source}"
          f", start-up {startup:.1f} s; chosen budget {choice.chosen.budget} ({choice.chosen.slots} slots), "
          f"predicted tau {choice.chosen.estimate.expected_tokens:.2f}, predicted {choice.speedup:.2f}x", flush=True)

    if "samples" not in shared:
        shared["samples"] = held_out_samples(lm, pt, Path(args.data_dir))
    # Timed: the first held-out prompts of each kind (the replay below covers them all).
    prompts = [s.prompt_ids for kind in ("chat", "math", "code")
               for s in [x for x in shared["samples"] if x.kind == kind][: args.per_kind]]
    if len(prompts) > batch:  # whole batches only: a short last batch would time a different batch size
        prompts = prompts[: len(prompts) - len(prompts) % batch]
    budgets = [b for b, *_ in choice.sweep]
    built = {b: vanilla_built(pt.k, len(table[0])) if b == 1
             else build_tree_set(table, pt.k, b, n=pt.n) for b in budgets}
    if "ranks" not in shared:  # every held-out response, ranked once, replayed per tree below
        shared["ranks"] = [(ranks_at_every_cut(lm.model, pt, s.prompt_ids, s.response_ids),
                            len(s.response_ids)) for s in shared["samples"]]
    replay_tokens = sum(n for _, n in shared["ranks"])
    replay_tau = {b: replay_tokens / sum(replay_decoding(r, built[b].tree_set, n) for r, n in shared["ranks"])
                  for b in budgets}
    runs: dict[int, list[dict]] = {b: [] for b in budgets}
    if not args.tau_only:
        decoders = {b: PPDDecoder(lm.model, pt, built[b].tree_set, eos_token_ids=lm.eos_token_ids) for b in budgets}
        decode_all(decoders[budgets[0]], prompts[:batch], batch, 8, lm.device)  # warm-up
        for _ in range(args.rounds):
            for b in budgets:
                runs[b].append(decode_all(decoders[b], prompts, batch, args.max_new_tokens, lm.device))
                print(".", end="", flush=True)
        print()
    reference = runs[budgets[0]][0]["outputs"] if runs[budgets[0]] else None
    rows = []
    for b in budgets:
        predicted_step = profile.step_seconds(batch, built[b].slots)
        row = {"budget": b, "slots": built[b].slots, "tree_hash": built[b].tree_set.tree_hash,
               "predicted_tau": built[b].estimate.expected_tokens, "replay_tau": replay_tau[b],
               "predicted_tok_s": batch * built[b].estimate.expected_tokens / predicted_step}
        if runs[b]:
            r, seconds = runs[b][0], statistics.median(x["seconds"] for x in runs[b])
            row.update({"measured_tau": r["tokens"] / r["steps"], "measured_tok_s": r["tokens"] / seconds,
                        "seconds": seconds, "identical_to_plain": all(x["outputs"] == reference for x in runs[b])})
        rows.append(row)
    chosen = next(x for x in rows if x["budget"] == choice.chosen.budget)
    timed = [x for x in rows if "measured_tok_s" in x]
    best = max(timed, key=lambda x: x["measured_tok_s"]) if timed else None
    return {"setup": setup, "device": name, "batch": batch, "threads": torch.get_num_threads(),
            "profile_cached": cached, "profile_seconds": profile.profile_seconds, "startup_seconds": startup,
            "chosen_budget": choice.chosen.budget, "chosen_tree_hash": choice.chosen.tree_set.tree_hash,
            "best_budget": best["budget"] if best else None, "rows": rows, "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "replay_responses": len(shared["ranks"]),
            "replay_tokens": replay_tokens,
            "tau_error_replay": abs(chosen["predicted_tau"] - chosen["replay_tau"]) / chosen["replay_tau"],
            "tau_error_decoded": (abs(chosen["predicted_tau"] - chosen["measured_tau"]) / chosen["measured_tau"]
                                  if best else None),
            "chosen_vs_best": chosen["measured_tok_s"] / best["measured_tok_s"] if best else None}


def print_setup(res: dict) -> None:
    timing = (f"timed on {res['prompts']} held-out prompts x {res['max_new_tokens']} new tokens"
              if res["chosen_vs_best"] is not None else "not timed (--tau-only)")
    print(f"\n{res['device']}, batch {res['batch']}, {res['threads']} threads: {timing}; tau replayed over "
          f"{res['replay_responses']} whole held-out responses ({res['replay_tokens']} tokens)")
    print(f"{'budget':>6} {'slots':>5} {'tau pred':>8} {'replayed':>8} {'decoded':>7} {'tok/s pred':>10} "
          f"{'tok/s meas':>10} {'x best':>6} {'= plain':>7}")
    timed = [r["measured_tok_s"] for r in res["rows"] if "measured_tok_s" in r]
    best = max(timed) if timed else None
    for r in res["rows"]:
        mark = (" <- chosen" if r["budget"] == res["chosen_budget"] else "") + (
            " <- best" if r["budget"] == res["best_budget"] else "")
        measured = (f"{r['measured_tau']:>7.2f} {r['predicted_tok_s']:>10.1f} {r['measured_tok_s']:>10.1f} "
                    f"{r['measured_tok_s'] / best:>6.3f} {'yes' if r['identical_to_plain'] else 'NO':>7}"
                    if "measured_tok_s" in r else f"{'-':>7} {r['predicted_tok_s']:>10.1f}")
        print(f"{r['budget']:>6} {r['slots']:>5} {r['predicted_tau']:>8.2f} {r['replay_tau']:>8.2f} {measured}{mark}")
    line = f"chosen tree: predicted tau off by {100 * res['tau_error_replay']:.1f}% of the replayed tau (target <= 10%)"
    if res["chosen_vs_best"] is not None:
        line += (f", {100 * res['tau_error_decoded']:.1f}% of the timed prompts' tau; throughput "
                 f"{100 * res['chosen_vs_best']:.1f}% of the best budget's (target >= 95%)")
    print(line)


def cross_check(results: list[dict]) -> list[str]:
    """Each setup's own tree against the other setups' trees, on its own device."""
    lines = []
    for own in results:
        if own["best_budget"] is None:
            continue
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
    p = argparse.ArgumentParser(prog="python -m jobs.bench.tree", description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", nargs="+", default=None, help="device:batch[:threads] (default: cpu:1 cpu:8, "
                   "plus cuda:1 cuda:8 when a GPU is present)")
    p.add_argument("--prompts", help="prompt-token artifact (default: the one shipped for the model)")
    p.add_argument("--per-kind", type=int, default=8, help="held-out prompts per kind (chat, math, code)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median counts")
    p.add_argument("--profile-budget-s", type=float, default=None)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="where the held-out prompts are read from")
    p.add_argument("--tau-only", action="store_true", help="skip the timed sweep: predicted and replayed tau only")
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    setups = args.setups or (["cpu:1", "cpu:8"] + (["cuda:1", "cuda:8"] if torch.cuda.is_available() else []))
    shared: dict = {}
    with torch.no_grad():
        results = [bench_setup(s, args, shared) for s in setups]
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
