#!/usr/bin/env python3
"""Continuous against static batching, side by side in one run, on the default model as a worker runs it.

    python -m jobs.bench.continuous                               # CPU: batch 4 8 16, every input
    python -m jobs.bench.continuous --device cuda --batch-sizes 4 8 16 32

Inputs (held-out prompts, mixed chat / math / code):
- ``cycling``: per-row max_new_tokens cycling through 8, 16, 32 and 128 (EOS still ends a row);
- ``eos``: max_new_tokens 256, rows ending at their natural EOS;
- ``same``: every row exactly ``--same-tokens`` tokens (EOS ignored): nothing for continuous batching to win.

For each batch size and method (``vanilla``; ``ppd``: the worker's default, ProPD over the device's profile),
a fresh worker engine (workers/engine.py) decodes ``--rows-per-slot`` x batch rows twice: with its slots
refilled as rows finish (continuous) and in batches each run until its longest row ends (static). The two
take turns, the order swapped every round; the median round counts. Reported: tokens/s of each, their ratio,
slot occupancy while rows waited, and how many rows of continuous equal static's token for token.

Then where a newcomer's prefill goes: beside the step (a forward of the step, then one of the newcomer's
prompt) or folded into it (one forward whose rows all carry the prompt's length, as right padding forces).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from decoding.batch import crop_cache, new_cache
from decoding.slots import Request, SlotBatch
from jobs.bench.common import load_model_and_prompts
from jobs.train.data import DEFAULT_DATA_DIR, mixed_held_out_prompts
from profiling.device import identify
from workers.configs import DecodingConfig
from workers.engine import DecodeEngine

CYCLE = (8, 16, 32, 128)


def inputs(prompts: list[list[int]], rows: int, same_tokens: int) -> dict[str, tuple[list[Request], bool]]:
    """Each input's requests (tagged by row index) and whether EOS ends rows."""
    chosen = [prompts[i % len(prompts)] for i in range(rows)]
    return {
        "cycling": ([Request(p, CYCLE[i % len(CYCLE)], tag=i) for i, p in enumerate(chosen)], True),
        "eos": ([Request(p, 256, tag=i) for i, p in enumerate(chosen)], True),
        "same": ([Request(p, same_tokens, tag=i) for i, p in enumerate(chosen)], False),
    }


def decode(engine: DecodeEngine, requests: list[Request], batching: str, eos: bool, device) -> dict:
    """All the requests through the engine's decoder on ``batch_size`` slots; tokens, seconds, outputs."""
    batch = SlotBatch(engine.decoder, engine.batch_size, "continuous" if batching == "continuous" else "when_empty",
                      eos_token_ids=None if eos else [])
    batch.add([Request(r.prompt, r.max_new_tokens, tag=r.tag) for r in requests])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    finished = batch.run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    outputs = {req.tag: res.token_ids for req, res in finished}
    return {"seconds": seconds, "tokens": sum(len(t) for t in outputs.values()), "outputs": outputs,
            "occupancy": batch.occupancy.while_waiting, "steps": batch.occupancy.steps}


def bench(lm, method: str, batch: int, requests: list[Request], eos: bool, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {"continuous": [], "static": []}
    for r in range(rounds):
        order = ["continuous", "static"] if r % 2 == 0 else ["static", "continuous"]
        for batching in order:  # a fresh engine each time: ProPD learns from the same start in both
            engine = DecodeEngine(lm, DecodingConfig(method=method, batching=batching), batch_size=batch)
            runs[batching].append(decode(engine, requests, batching, eos, lm.device))
    ratios = [c["tokens"] / c["seconds"] / (s["tokens"] / s["seconds"])
              for c, s in zip(runs["continuous"], runs["static"])]
    med = {b: sorted(rs, key=lambda x: x["tokens"] / x["seconds"])[len(rs) // 2] for b, rs in runs.items()}
    same = sum(med["continuous"]["outputs"][t] == med["static"]["outputs"][t] for t in med["static"]["outputs"])
    return {"method": method, "batch": batch, "rows": len(requests),
            **{f"{b}_tok_s": m["tokens"] / m["seconds"] for b, m in med.items()},
            **{f"{b}_occupancy": m["occupancy"] for b, m in med.items()},
            **{f"{b}_steps": m["steps"] for b, m in med.items()},
            "ratio": statistics.median(ratios), "round_ratios": ratios, "rows_same": same}


@torch.inference_mode()
def prefill_placement(lm, batch: int, tree_slots: int, prompt_len: int, context: int = 128, repeats: int = 5):
    """Seconds of a step over ``batch`` rows of ``tree_slots`` tokens plus a newcomer's prefill of ``prompt_len``
    tokens run beside it, against one forward with the prompt folded in (every row padded to prompt + tree)."""
    decoder, vocab = lm.model.get_decoder(), lm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    cache = new_cache(lm.model)
    decoder(input_ids=torch.randint(0, vocab, (batch, context), generator=g).to(lm.device), cache=cache,
            use_cache=True)

    def timed(fn) -> float:
        times = []
        for i in range(repeats + 1):
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            crop_cache(cache, context)
        return statistics.median(times)

    def ids(rows: int, n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (rows, n), generator=g).to(lm.device)

    step = timed(lambda: decoder(input_ids=ids(batch, tree_slots), cache=cache, use_cache=True))
    alone = timed(lambda: decoder(input_ids=ids(1, prompt_len)))
    folded = timed(lambda: decoder(input_ids=ids(batch, prompt_len + tree_slots), cache=cache, use_cache=True))
    return {"batch": batch, "tree_slots": tree_slots, "prompt_len": prompt_len, "beside_s": step + alone,
            "folded_s": folded, "folded_over_beside": folded / (step + alone)}


def print_table(device: str, results: list[dict]) -> None:
    print(f"\ncontinuous vs static batching, {device}")
    print(f"{'input':8} {'method':8} {'batch':>5} {'rows':>4}  {'cont tok/s':>10} {'static tok/s':>12} {'ratio':>6}  "
          f"{'occ cont':>8} {'occ static':>10}  {'= static':>8}")
    for r in results:
        occ = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("continuous_occupancy", "static_occupancy")]
        print(f"{r['input']:8} {r['method']:8} {r['batch']:5d} {r['rows']:4d}  {r['continuous_tok_s']:10.1f} "
              f"{r['static_tok_s']:12.1f} {r['ratio']:6.2f}  {occ[0]:>8} {occ[1]:>10}  "
              f"{r['rows_same']:>3}/{r['rows']:<4}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.continuous", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--methods", nargs="+", default=["vanilla", "ppd"], choices=["vanilla", "ppd"])
    p.add_argument("--inputs", nargs="+", default=["cycling", "eos", "same"], choices=["cycling", "eos", "same"])
    p.add_argument("--rows-per-slot", type=int, default=8, help="rows decoded per slot (rows = this x batch; the "
                   "eos input half as many): a job's long run, where the last rows' tail does not weigh much")
    p.add_argument("--same-tokens", type=int, default=48, help="tokens of every row of the 'same' input")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    lm, pt = load_model_and_prompts(args.device, args.dtype, None)  # the artifact names the held-out split
    prompts = mixed_held_out_prompts(lm, pt, Path(args.data_dir))
    device = f"{identify(lm.device, lm.dtype).readable} {str(lm.dtype).removeprefix('torch.')}"
    print(device, flush=True)
    results = []
    for name in args.inputs:
        for batch in args.batch_sizes:
            per_slot = max(1, args.rows_per_slot // 2) if name == "eos" else args.rows_per_slot
            requests, eos = inputs(prompts, per_slot * batch, args.same_tokens)[name]
            for method in args.methods:
                row = {"input": name, **bench(lm, method, batch, requests, eos, args.rounds)}
                results.append(row)
                print(f"{name} {method} batch {batch}: continuous {row['continuous_tok_s']:.1f} tok/s, static "
                      f"{row['static_tok_s']:.1f} tok/s, ratio {row['ratio']:.2f}, occupancy "
                      f"{row['continuous_occupancy']} vs {row['static_occupancy']}, rows equal "
                      f"{row['rows_same']}/{row['rows']}", flush=True)
    print_table(device, results)
    mean_prompt = round(statistics.mean(len(q) for q in prompts))
    placement = [prefill_placement(lm, b, s, mean_prompt) for b in args.batch_sizes for s in (1, 16)]
    print(f"\nnewcomer prefill (a prompt of {mean_prompt} tokens, the held-out mean): folded into the step / beside it")
    for r in placement:
        print(f"  batch {r['batch']:3d}, {r['tree_slots']:2d} slots per row: beside {r['beside_s'] * 1e3:7.1f} ms, "
              f"folded {r['folded_s'] * 1e3:7.1f} ms, folded/beside {r['folded_over_beside']:.2f}")
    if args.json:
        for r in results:
            r.pop("outputs", None)
        Path(args.json).write_text(json.dumps({"device": device, "results": results, "prefill": placement}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
