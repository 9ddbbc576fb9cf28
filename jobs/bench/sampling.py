#!/usr/bin/env python3
"""Sampling benchmark: plain sampling, PPD sampling with a static tree, and PPD sampling with ProPD dynamic
sizing, side by side at each temperature and batch size, in one run on one machine.

    python -m jobs.bench.sampling                                  # CPU: T 0.7 and 1.0, batch 1 and 8
    python -m jobs.bench.sampling --device cuda --max-new-tokens 128 --top-p 0.9

Set up as jobs/bench/propd.py (whose helpers it uses): the same held-out prompts (mixed chat / math / code,
at least ``--min-prompts`` of them, in consecutive batches), the same static tree (the one a worker of that
batch size would choose at start-up from its profile and the artifact's acceptance table), the same ProPD
decoder (starting from that profile and table, learning across rounds), EOS left on as there. Every row of
every method samples with temperature ``T``, ``--top-p``, and the seed ``completion_seed(--seed, row)``, row
being the prompt's index among the prompts of its batch size: the methods draw the same uniform streams, so
they emit the same tokens (decoding/sampling.py) and stop at the same EOS, doing the same work. One untimed
warm-up round, then timed rounds in which the methods take turns on each batch of prompts (the order
rotated), so machine drift hits all alike; the median round counts.

Reported per temperature: tokens/s and tau of each method, and each PPD method's speed over plain sampling
(the median over rounds of each round's ratio). Every row's tokens are compared with plain sampling's (of
the first timed round; plain's own later rounds too, which catches a decoder that is not deterministic): the
rows that differ are counted per method. Tree and plain passes multiply in different shapes, which can move
a draw that lands next to a CDF boundary: each differing row's first differing draw is measured against the
model's CDF (``draw_margin``), and those within BOUNDARY_MARGIN of another token are counted apart. In
float32 any other difference is a bug: the run still prints its table (and writes --json), then exits 1
naming it. In half precision the rounding is coarser: differences are counted and named, the exit status
stays 0 (as bench_propd treats near-ties).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from decoding import SamplingParams, completion_seed
from decoding.sampling import kept_threshold, uniform_stream
from jobs.bench.common import device_profile, load_model_and_prompts, make_decoders, run_round
from jobs.train.data import DEFAULT_DATA_DIR, mixed_held_out_prompts

METHODS = ("plain", "static", "propd")


def row_sampling(n: int, temperature: float, top_p: float, seed: int) -> list[SamplingParams]:
    """Row i's parameters: the seed ``completion_seed(seed, i)``, the same for every method."""
    return [SamplingParams(temperature=temperature, top_p=top_p, seed=completion_seed(seed, i)) for i in range(n)]


# A differing row whose first differing draw lay this close to an edge of plain sampling's token in the
# model's CDF is put down to rounding: tree and plain passes multiply in different shapes, and in float32 that
# moves a CDF by ~1e-7 (seen on the CPU: u 1.8e-7 from an edge at temperature 1, one draw in ~4000). A wrong
# scheme's draws miss by the width of a token's probability.
BOUNDARY_MARGIN = 1e-5


def differing_rows(runs: list[dict], reference: list[list[int]]) -> list[dict]:
    """The rows whose tokens differ from ``reference`` in some round, each once (its first such round):
    {"row", "round", "position" (the first new token that differs)}, by row."""
    found = []
    for i, ref in enumerate(reference):
        for r, run in enumerate(runs):
            got = run["outputs"][i]
            if got != ref:
                position = next((p for p, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
                found.append({"row": i, "round": r, "position": position})
                break
    return found


@torch.inference_mode()
def draw_margin(model, prompt: Sequence[int], prefix: Sequence[int], params: SamplingParams) -> float:
    """How near plain sampling's draw after ``prefix`` was to another token: the distance of its scaled
    uniform from the nearer edge of the drawn token's interval in the model's filtered CDF (greedy: the gap
    between the two largest logits). The model runs the whole sequence afresh, as the oracle does."""
    device = model.get_input_embeddings().weight.device
    logits = model(input_ids=torch.tensor([list(prompt) + list(prefix)], device=device)).logits[:, -1].double()
    if params.greedy:
        top = logits[0].topk(2).values
        return float(top[0] - top[1])
    scaled = logits / params.temperature  # [1, V]
    threshold = kept_threshold(scaled, torch.tensor([params.top_k], device=device),
                               torch.tensor([params.top_p], dtype=torch.float64, device=device))
    cdf = scaled.masked_fill(scaled < threshold[:, None], -math.inf).softmax(-1).cumsum(-1)[0]  # [V]
    x = float(uniform_stream(params.seed, len(prefix) + 1)[len(prefix)]) * float(cdf[-1])
    token = int(torch.searchsorted(cdf, torch.tensor([x], dtype=cdf.dtype, device=device), right=True))
    low = float(cdf[token - 1]) if token else 0.0
    return min(x - low, float(cdf[token]) - x)


def bench_setting(decoders: dict, prompts: list, sampling: list[SamplingParams], max_new_tokens: int,
                  rounds: int, device: torch.device, batch: int) -> dict:
    """A warm-up round and ``rounds`` timed rounds of every method on ``prompts``; the summary row."""
    runs: dict[str, list[dict]] = {m: [] for m in decoders}
    run_round(decoders, prompts, max_new_tokens, device, batch, sampling=sampling)  # warm-up (ProPD learns)
    for r in range(rounds):
        for m, out in run_round(decoders, prompts, max_new_tokens, device, batch, rotation=r,
                                sampling=sampling).items():
            runs[m].append(out)
    reference = runs["plain"][0]["outputs"]
    model = decoders["plain"].model
    row: dict = {}
    for m, rs in runs.items():
        differing = differing_rows(rs, reference)
        for d in differing:
            d["seed"] = sampling[d["row"]].seed
            d["margin"] = draw_margin(model, prompts[d["row"]], reference[d["row"]][: d["position"]],
                                      sampling[d["row"]])
        at_boundary = [d for d in differing if d["margin"] < BOUNDARY_MARGIN]
        count = len(differing)
        first = next((d for d in differing if d["margin"] >= BOUNDARY_MARGIN), differing[0] if differing else None)
        median = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]  # ProPD's choices vary by round
        row[m] = {"tok_s": median["tokens"] / median["seconds"], "tau": median["tau"],
                  "per_pass": median["per_pass"], "rounds_tok_s": [r["tokens"] / r["seconds"] for r in rs],
                  "rows_differing": count, "rows_at_boundary": len(at_boundary), "first_difference": first}
    row.update(paired_ratios(row))
    return row


def paired_ratios(row: dict) -> dict:
    """Each PPD method over plain sampling, paired by round (the methods of one round ran back to back, so
    drift between rounds cancels in the round's ratio): the median round ratio."""
    return {f"{m}_vs_plain": statistics.median(a / b for a, b in zip(row[m]["rounds_tok_s"],
                                                                     row["plain"]["rounds_tok_s"]))
            for m in METHODS[1:] if m in row}


def bench(lm, pt, profile, pool: Sequence[Sequence[int]], *, temperatures: Sequence[float], top_p: float,
          batch_sizes: Sequence[int], max_new_tokens: int, rounds: int, min_prompts: int, seed: int,
          static_slots: int | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Every (temperature, batch size): fresh decoders (ProPD learns within the setting, across its rounds),
    the first max(batch, min_prompts) prompts of ``pool``, one summary row each."""
    results = []
    for temperature in temperatures:
        for batch in batch_sizes:
            prompts = list(pool[:max(batch, min_prompts)])
            sampling = row_sampling(len(prompts), temperature, top_p, seed)
            decoders, slots = make_decoders(lm, pt, profile, batch, static_slots)
            row = {"temperature": temperature, "batch": batch, "static_slots": slots, "prompts": len(prompts)}
            row.update(bench_setting(decoders, prompts, sampling, max_new_tokens, rounds, lm.device, batch))
            results.append(row)
            log(f"T {temperature:g} batch {batch:3d}: " + "  ".join(
                f"{m}{f' ({slots})' if m == 'static' else ''} {row[m]['tok_s']:7.1f} tok/s tau {row[m]['tau']:.2f}"
                for m in METHODS)
                + "  " + "  ".join(f"{m}/plain {row[f'{m}_vs_plain']:.3f}" for m in METHODS[1:])
                + "  rows != plain: " + "/".join(str(row[m]["rows_differing"]) for m in METHODS))
    return results


def first_difference(results: list[dict], explained_too: bool = True) -> str | None:
    """The first row that differs from plain sampling, in words (None: none does); with ``explained_too``
    False, the first whose draw was not at a CDF boundary (BOUNDARY_MARGIN)."""
    for row in results:
        for m in METHODS:
            d = row[m].get("first_difference")
            if d is not None and (explained_too or d.get("margin", math.inf) >= BOUNDARY_MARGIN):
                which = "plain sampling's own timed round" if m == "plain" else f"{m} sampling"
                return (f"{which} at temperature {row['temperature']:g}, batch {row['batch']}: row {d['row']} "
                        f"(seed {d['seed']}) differs from plain sampling's first timed round from new token "
                        f"{d['position']} on (timed round {d['round']}); the plain draw there was "
                        f"{d.get('margin', math.nan):.2g} from another token's interval")
    return None


def print_table(device: str, meta: dict, results: list[dict]) -> None:
    for temperature in dict.fromkeys(r["temperature"] for r in results):
        rows = [r for r in results if r["temperature"] == temperature]
        print(f"\n{device}, temperature {temperature:g}, top-p {meta['top_p']:g}, seeds completion_seed("
              f"{meta['seed']}, row), {meta['max_new_tokens']} new tokens, median of {meta['rounds']} rounds; "
              "x / plain: the median over rounds of the round's ratio to plain sampling; static (slots)")
        print("| batch | " + " | ".join(f"{m} tok/s" for m in METHODS) + " | " + " | ".join(f"{m} tau" for m in METHODS)
              + " | " + " | ".join(f"{m} / plain" for m in METHODS[1:]) + " | rows != plain " + " / ".join(METHODS)
              + " |")
        print("|---" * (1 + 2 * len(METHODS) + len(METHODS) - 1 + 1) + "|")
        for r in rows:
            print(f"| {r['batch']} | " + " | ".join(
                f"{r[m]['tok_s']:.1f}" + (f" ({r['static_slots']})" if m == "static" else "") for m in METHODS)
                + " | " + " | ".join(f"{r[m]['tau']:.2f}" for m in METHODS)
                + " | " + " | ".join(f"{r[f'{m}_vs_plain']:.3f}" for m in METHODS[1:])
                + " | " + " / ".join(str(r[m]["rows_differing"]) for m in METHODS) + " |")
    total = sum(r[m]["rows_differing"] for r in results for m in METHODS)
    boundary = sum(r[m].get("rows_at_boundary", 0) for r in results for m in METHODS)
    print(f"\nrows differing from plain sampling: {total} ({boundary} at a CDF boundary: the plain draw within "
          f"{BOUNDARY_MARGIN:g} of another token's interval, a rounding difference between tree and plain passes)")


def verdict(results: list[dict], dtype: str) -> int:
    """Exit status: 1 when a row differs from plain sampling in float32 other than at a CDF boundary (named on
    stderr), else 0. In half precision the boundary is wider than BOUNDARY_MARGIN: differences are named only."""
    unexplained = first_difference(results, explained_too=False)
    if unexplained is not None and dtype == "float32":
        print(f"FAIL: {unexplained}", file=sys.stderr)
        return 1
    first = first_difference(results)
    if first is not None:
        print(f"note: {first}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.sampling",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on a CPU, bfloat16 on CUDA. Only float32 fails the run (exit 1) on a row "
                        "that differs from plain sampling; half precision counts them")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="base seed: row i samples with completion_seed(seed, i)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--min-prompts", type=int, default=4, help="prompts decoded per batch size at least, in "
                   "consecutive batches (one short response alone is too little to time)")
    p.add_argument("--static-slots", type=int, metavar="N", help="give the static method the tree of budget N "
                   "(default: the one planned from the profile)")
    p.add_argument("--prompts", help="prompt-token artifact (default: the shipped one)")
    p.add_argument("--profile-budget-s", type=float, default=None)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--from-json", help="print the tables of an earlier run's --json file and exit (its status "
                   "as the run's)")
    return p


def summary(lm, device_name: str, args, started_at: str, results: list[dict]) -> dict:
    """What --json holds: the run's setting, the identity check's outcome, and the rows."""
    dtype = str(lm.dtype).removeprefix("torch.")
    return {"device": f"{device_name} {dtype}", "device_name": device_name, "dtype": dtype, "model_id": lm.model_id,
            "model_hash": lm.content_hash, "measured_at": started_at, "max_new_tokens": args.max_new_tokens,
            "rounds": args.rounds, "temperatures": args.temperatures, "top_p": args.top_p, "seed": args.seed,
            "batch_sizes": args.batch_sizes, "min_prompts": args.min_prompts, "eos": "on",
            "static_slots": args.static_slots,
            "rows_differing": sum(r[m]["rows_differing"] for r in results for m in METHODS),
            "rows_at_boundary": sum(r[m]["rows_at_boundary"] for r in results for m in METHODS),
            "first_difference": first_difference(results), "results": results}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        for t in args.temperatures:
            SamplingParams(temperature=t, top_p=args.top_p)
    except ValueError as exc:
        p.error(str(exc))
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print_table(saved["device"], saved, saved["results"])
        return verdict(saved["results"], saved["dtype"])

    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    lm, pt = load_model_and_prompts(args.device, args.dtype, args.prompts)
    profile, name = device_profile(lm, pt, args.batch_sizes, args.profile_budget_s)
    pool = mixed_held_out_prompts(lm, pt, Path(args.data_dir))
    results = bench(lm, pt, profile, pool, temperatures=args.temperatures, top_p=args.top_p,
                    batch_sizes=args.batch_sizes, max_new_tokens=args.max_new_tokens, rounds=args.rounds,
                    min_prompts=args.min_prompts, seed=args.seed, static_slots=args.static_slots,
                    log=lambda s: print(s, flush=True))
    saved = summary(lm, name, args, started_at, results)
    print_table(saved["device"], saved, results)
    if args.json:
        Path(args.json).write_text(json.dumps(saved, indent=2))
    return verdict(results, saved["dtype"])


if __name__ == "__main__":
    sys.exit(main())
