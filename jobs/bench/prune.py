#!/usr/bin/env python3
"""Early-pruning sweep: one static tree, decoded without pruning and with each prune head at each keep_top_k,
side by side in one run.

    python -m jobs.bench.prune --heads outputs/prune_heads/L16 --keep-top-k 4 8 16 32
    python -m jobs.bench.prune --device cuda --tree-slots 128 --batch-sizes 8 32

For each batch size it decodes the same held-out prompts (the split the prompt tokens never trained on) with
the tree a worker would build for ``--tree-slots`` slots. Reported per configuration: tokens/s (median of
interleaved rounds after a warm-up), tau, input tokens per forward pass (averaged over layers: the layers
after the head run on the surviving slots only), the speed ratio to the unpruned tree, and how many rows equal
the unpruned output (all of them in float32; half precision can flip near-ties).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from decoding import PPDDecoder
from jobs.bench.common import run_round
from jobs.train.data import DEFAULT_DATA_DIR, mixed_held_out_prompts
from profiling.device import identify
from trees.builder import build_tree_set
from workers.artifacts import find_shipped_artifact, load_prompt_tokens
from workers.configs import ModelConfig
from workers.models import load_model
from workers.prune_heads import find_shipped_prune_head, load_prune_head


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.prune",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--heads", nargs="+", help="prune-head artifacts (default: the shipped one)")
    p.add_argument("--keep-top-k", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--tree-slots", type=int, default=64, help="slot budget of the static tree")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    args = p.parse_args(argv)

    lm = load_model(ModelConfig(device=args.device, dtype=args.dtype))
    artifact = find_shipped_artifact(lm.content_hash)
    if artifact is None:
        raise SystemExit("no trained prompt-token artifact for this model")
    pt = load_prompt_tokens(artifact, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype)
    tree_set = build_tree_set(pt.meta.extra["acceptance"], pt.k, args.tree_slots, n=pt.n).tree_set
    heads = args.heads or [h for h in [find_shipped_prune_head(lm.content_hash)] if h]
    if not heads:
        raise SystemExit("no prune head given and none shipped for this model (give --heads)")
    decoders = {"unpruned": PPDDecoder(lm.model, pt, tree_set, eos_token_ids=lm.eos_token_ids)}
    for head_dir in heads:
        for keep in args.keep_top_k:
            head, _ = load_prune_head(head_dir, expect_model_hash=lm.content_hash, device=lm.device,
                                      dtype=lm.dtype, keep_top_k=keep)
            decoders[f"L{head.layer} top{keep}"] = PPDDecoder(lm.model, pt, tree_set, eos_token_ids=lm.eos_token_ids,
                                                              prune_head=head)
    mixed = mixed_held_out_prompts(lm, pt, Path(args.data_dir))
    name = f"{identify(lm.device, lm.dtype).readable} {str(lm.dtype).removeprefix('torch.')}"
    print(f"{name}; tree of {args.tree_slots} slots; {args.max_new_tokens} new tokens; median of {args.rounds} rounds")
    for batch in args.batch_sizes:
        prompts = mixed[:batch]
        run_round(decoders, prompts, args.max_new_tokens, lm.device, batch)  # warm-up
        runs: dict[str, list[dict]] = {m: [] for m in decoders}
        for r in range(args.rounds):
            for m, out in run_round(decoders, prompts, args.max_new_tokens, lm.device, batch, rotation=r).items():
                runs[m].append(out)
        reference = runs["unpruned"][0]["outputs"]
        base = None
        print(f"\nbatch {batch}\n| config | tok/s | x unpruned | tau | tokens/pass | rows = unpruned |\n"
              "|---|---|---|---|---|---|")
        for m, rs in runs.items():
            median = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]
            tok_s = median["tokens"] / median["seconds"]
            base = base or tok_s
            same = min(sum(a == b for a, b in zip(r["outputs"], reference)) for r in rs)
            assert same == batch or lm.dtype != torch.float32, f"{m} at batch {batch} differs from unpruned decoding"
            print(f"| {m} | {tok_s:.1f} | {tok_s / base:.3f} | {median['tau']:.2f} | {median['per_pass']:.0f} | "
                  f"{same}/{batch} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
