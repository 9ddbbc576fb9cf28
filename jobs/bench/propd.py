#!/usr/bin/env python3
"""ProPD benchmark: plain decoding, PPD with a static tree, and PPD with ProPD dynamic sizing, side by side
at each batch size, in one run on one machine.

    python -m jobs.bench.propd                                  # CPU: batch 1 2 4 8 16 32
    python -m jobs.bench.propd --device cuda --max-new-tokens 128

Every batch size decodes the same held-out prompts (mixed chat / math / code, the split the prompt tokens
never trained on; at least ``--min-prompts`` of them, in consecutive batches) with each method. The static
tree is the one a worker of that batch size would choose at start-up from its profile. ProPD starts from the
same profile and the artifact's acceptance table and keeps learning across rounds, as a long-lived worker
does. One untimed warm-up round, then timed rounds in which the methods take turns on each batch of prompts
(the order rotated), so machine drift hits all alike; the median round counts. Every method's output is
checked against plain decoding's. Reported: tokens/s, tau, and input tokens processed per forward pass (batch
x slots), plus ProPD's speed over the better of plain and static PPD (the median over rounds of each round's
ratio). With a prune head (``--prune-head``, or one shipped for the model) a fourth method runs: ProPD with
early pruning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from jobs.bench.common import device_profile, load_model_and_prompts, make_decoders, run_round
from jobs.train.data import DEFAULT_DATA_DIR, mixed_held_out_prompts
from workers.prune_heads import find_shipped_prune_head, load_prune_head


def paired_ratios(row: dict) -> dict:
    """ProPD (and ProPD with pruning) against the better of plain and static, paired by round: the methods of
    one round ran back to back, so machine drift between rounds (tens of percent on a shared GPU host) cancels
    in the round's ratio; the median round ratio is reported. The better method is the one with the higher
    median, fixed for all rounds: taking each round's faster of the two would compare against the max of two
    noisy timings, which is biased upwards when they are equal."""
    best = max(("plain", "static"), key=lambda m: row[m]["tok_s"])
    out = {"best": best}
    for m in ("propd", "pruned"):
        if m in row:
            out[f"{m}_vs_best"] = statistics.median(
                a / b for a, b in zip(row[m]["rounds_tok_s"], row[best]["rounds_tok_s"]))
    return out


def print_table(device: str, args, results: list[dict]) -> None:
    exact = "outputs identical to plain" if args.dtype == "float32" or device.startswith("cpu") else \
        "rows equal to plain counted per method"
    print(f"\n{device}, {args.max_new_tokens} new tokens, median of {args.rounds} rounds; {exact}; x / best: the "
          "median over rounds of the round's ratio to the better of plain and static (by median)")
    methods = [m for m in ("plain", "static", "propd", "pruned") if m in results[0]]
    pruned = "pruned" in methods
    print("| batch | " + " | ".join(f"{m} tok/s" for m in methods) + " | " + " | ".join(f"{m} tau" for m in methods[1:])
          + " | tokens/pass " + " / ".join(methods) + " | propd / best" + (" | pruned / best" if pruned else "") + " |")
    print("|---" * (2 * len(methods) + 1 + (2 if pruned else 1)) + "|")
    for r in results:
        speeds = [f"{r[m]['tok_s']:.1f}" + (f" ({r['static_slots']})" if m == "static" else "") for m in methods]
        print(f"| {r['batch']} | " + " | ".join(speeds)
              + " | " + " | ".join(f"{r[m]['tau']:.2f}" for m in methods[1:])
              + " | " + " / ".join(f"{r[m]['per_pass']:.0f}" for m in methods)
              + f" | {r['propd_vs_best']:.3f}" + (f" | {r['pruned_vs_best']:.3f}" if pruned else "") + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.propd",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on a CPU, bfloat16 on CUDA. Only float32 asserts outputs identical to plain "
                        "decoding; half precision counts the rows that match (tree and plain passes multiply in "
                        "different shapes, which can flip near-ties)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--min-prompts", type=int, default=4, help="prompts decoded per batch size at least, in "
                   "consecutive batches (one short response alone is too little to time)")
    p.add_argument("--prompts", help="prompt-token artifact (default: the shipped one)")
    p.add_argument("--prune-head", help="early-pruning head artifact for the fourth column, ProPD with pruning "
                   "(default: the one shipped for the model; without one the column is left out)")
    p.add_argument("--keep-top-k", type=int, help="override the prune head's keep_top_k")
    p.add_argument("--profile-budget-s", type=float, default=None)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--from-json", help="print the table of an earlier run's --json file (ratios recomputed) and exit")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        saved = saved.get("bench", saved)  # a shipped file (artifacts/measurements/) wraps it with its provenance
        results = [{**row, **paired_ratios(row)} for row in saved["results"]]
        args.max_new_tokens, args.rounds = saved.get("max_new_tokens", "?"), saved.get("rounds", "?")
        print_table(saved["device"], args, results)
        return 0

    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    lm, pt = load_model_and_prompts(args.device, args.dtype, args.prompts)
    head_dir = args.prune_head or find_shipped_prune_head(lm.content_hash)
    head = None
    if head_dir is not None:
        head, _ = load_prune_head(head_dir, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype,
                                  keep_top_k=args.keep_top_k)
        print(f"prune head {head_dir}: layer {head.layer}, keep top {head.keep_top_k}", flush=True)
    profile, name = device_profile(lm, pt, args.batch_sizes, args.profile_budget_s)
    mixed = mixed_held_out_prompts(lm, pt, Path(args.data_dir))

    results = []
    for batch in args.batch_sizes:
        prompts = mixed[:max(batch, args.min_prompts)]
        decoders, static_slots = make_decoders(lm, pt, profile, batch, prune_head=head)
        runs: dict[str, list[dict]] = {m: [] for m in decoders}
        run_round(decoders, prompts, args.max_new_tokens, lm.device, batch)  # warm-up (ProPD starts learning)
        for r in range(args.rounds):
            for m, out in run_round(decoders, prompts, args.max_new_tokens, lm.device, batch, rotation=r).items():
                runs[m].append(out)
        reference = runs["plain"][0]["outputs"]
        row = {"batch": batch, "static_slots": static_slots}
        for m, rs in runs.items():
            same = min(sum(a == b for a, b in zip(r["outputs"], reference)) for r in rs)
            assert same == len(prompts) or lm.dtype != torch.float32, f"{m} at batch {batch} differs from plain"
            median = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]  # ProPD's choices vary by round
            row[m] = {"tok_s": median["tokens"] / median["seconds"], "tau": median["tau"],
                      "per_pass": median["per_pass"], "rounds_tok_s": [r["tokens"] / r["seconds"] for r in rs],
                      "rows_same_as_plain": same}
            if "slots_run" in median:  # why ProPD was as fast as it was: the trees it ran, by round
                row[m]["rounds_slots_run"] = [r["slots_run"] for r in rs]
        row.update(paired_ratios(row))
        results.append(row)
        print(f"batch {batch:3d}: " + "  ".join(
            f"{m} {row[m]['tok_s']:7.1f} tok/s tau {row[m]['tau']:.2f} ({row[m]['per_pass']:.0f}/pass)"
            for m in decoders) + f"  propd/best {row['propd_vs_best']:.3f}"
            + "  rows = plain: " + "/".join(str(row[m]["rows_same_as_plain"]) for m in decoders)
            + "  propd steps by slots, per round: " + " ".join(str(c) for c in row["propd"]["rounds_slots_run"]),
            flush=True)

    print_table(f"{name} {str(lm.dtype).removeprefix('torch.')}", args, results)
    if args.json:
        dtype = str(lm.dtype).removeprefix("torch.")
        Path(args.json).write_text(json.dumps({"device": f"{name} {dtype}", "device_name": name, "dtype": dtype,
                                               "model_id": lm.model_id, "model_hash": lm.content_hash,
                                               "measured_at": started_at, "max_new_tokens": args.max_new_tokens,
                                               "rounds": args.rounds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
