#!/usr/bin/env python3
"""Evaluate prompt tokens on the held-out split: guess accuracy per distance, and tau at a fixed tree size.

    python -m jobs.train.evaluate --prompts artifacts/prompt_tokens/smollm2-135m-instruct --tree-nodes 63

For the trained prompt tokens, untrained ones (the mean-embedding start) and plain decoding, per kind of
prompt (chat / math / code): top-1/5/10 accuracy of prompt token i for the token i+2 places ahead (teacher
forced on the model's own greedy responses), the tau predicted from the acceptance table, and the tau of
greedy PPD decoding on the fixed-size tree (the trained table's most probable paths, every node carrying k
prompt tokens) over every held-out prompt's whole response. That tau is replayed exactly from guess ranks
at every position (trees/acceptance.py); ``--check-decode`` prompts per kind are also decoded for real,
and their outputs and step counts must equal plain decoding's tokens and the replay's steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from decoding import PPDDecoder, PromptTokens
from jobs.train.accuracy import evaluate
from jobs.train.data import load_samples, trained_data_config
from trees.acceptance import ranks_at_every_cut, replay_decoding
from trees.builder import estimate
from trees.paths import fixed_size_tree_set
from workers.artifacts import load_prompt_tokens
from workers.configs import ModelConfig
from workers.models import load_model


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="the trained prompt-token artifact")
    p.add_argument("--model", default="default")
    p.add_argument("--tree-nodes", type=int, default=63, help="candidate nodes of the fixed-size tree")
    p.add_argument("--check-decode", type=int, default=2, help="held-out prompts per kind decoded for real")
    p.add_argument("--eval-cuts-per-sample", type=int, default=32)
    p.add_argument("--output-json", help="also write the report here")
    args = p.parse_args(argv)

    lm = load_model(ModelConfig(model=args.model))
    trained = load_prompt_tokens(args.prompts, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype)
    untrained = PromptTokens.from_token_embeddings(lm.model, k=trained.k, n=1, base_model_id=lm.model_id,
                                                   base_model_hash=lm.content_hash).to(lm.device)
    # The held-out split the training run evaluated on (same selection rules and response length).
    data = trained_data_config(trained.meta.extra)
    samples = load_samples(data, lm, held_out=True)
    candidates = {"trained": trained, "untrained": untrained}

    acc = {name: evaluate(lm, pt, samples, args.eval_cuts_per_sample) for name, pt in candidates.items()}
    tree_set = fixed_size_tree_set(acc["trained"]["all"]["acceptance"], args.tree_nodes, trained.k)
    report = {"tree_nodes": args.tree_nodes, "tree_hash": tree_set.tree_hash, "accuracy": acc, "tau": {},
              "decode_check": {}}
    tokens: dict[tuple[str, str], list[int]] = {}
    steps: dict[tuple[str, str], list[int]] = {}
    replayed_steps: dict[str, int] = {}  # trained, by sample id: the real-decoding check below compares
    for s in samples:
        for name, pt in candidates.items():
            ranks = ranks_at_every_cut(lm.model, pt, s.prompt_ids, s.response_ids)
            replayed = replay_decoding(ranks, tree_set, len(s.response_ids))
            tokens.setdefault((name, s.kind), []).append(len(s.response_ids))
            steps.setdefault((name, s.kind), []).append(replayed)
            if name == "trained":
                replayed_steps[s.id] = replayed
    for kind in ("chat", "math", "code"):
        if ("trained", kind) not in tokens:
            continue
        row = {"plain": 1.0, "prompts": len(tokens[("trained", kind)]),
               "response_tokens": sum(tokens[("trained", kind)])}
        for name in candidates:
            row[name] = sum(tokens[(name, kind)]) / sum(steps[(name, kind)])
            row[f"{name}_predicted"] = estimate(acc[name][kind]["acceptance"], tree_set).expected_tokens
        report["tau"][kind] = row

    # Real decoding on a few prompts per kind: lossless, and the replay counts the same steps.
    decoder = PPDDecoder(lm.model, trained, tree_set, eos_token_ids=lm.eos_token_ids)
    for kind in ("chat", "math", "code"):
        chosen = [s for s in samples if s.kind == kind][: args.check_decode]
        if not chosen:
            continue
        results = decoder.generate([s.prompt_ids for s in chosen], [len(s.response_ids) for s in chosen])
        report["decode_check"][kind] = {
            "prompts": len(chosen),
            "identical_to_plain": sum(r.token_ids == s.response_ids for r, s in zip(results, chosen)),
            "steps_decoded": [r.num_steps for r in results], "steps_replayed": [replayed_steps[s.id] for s in chosen],
        }

    print(f"\nheld-out accuracy (prompt token i guesses the token i+2 places ahead), tree of {args.tree_nodes} nodes")
    print(f"{'kind':<6} {'tokens':<10} "
          + "  ".join(f"{'d=' + str(i + 2) + ' top1/5/10':<19}" for i in range(trained.k)))
    for kind in ("chat", "math", "code", "all"):
        for name in candidates:
            ev = acc[name].get(kind)
            if ev:
                cells = "  ".join(f"{ev['top1'][i]:.2f}/{ev['top5'][i]:.2f}/{ev['top10'][i]:.2f}     "
                                  for i in range(trained.k))
                print(f"{kind:<6} {name:<10} {cells}")
    print(f"\ntau over whole held-out responses ({data.max_new_tokens} tokens at most), "
          f"{args.tree_nodes}-node tree")
    print(f"{'kind':<6} {'prompts':>7} {'tokens':>7} {'plain':>6} {'untrained':>10} {'trained':>8} {'predicted':>10}")
    for kind, row in report["tau"].items():
        print(f"{kind:<6} {row['prompts']:>7} {row['response_tokens']:>7} {1.0:>6.2f} {row['untrained']:>10.2f} "
              f"{row['trained']:>8.2f} {row['trained_predicted']:>10.2f}")
    print("\nreal decoding check (trained): identical to plain / steps decoded vs replayed")
    for kind, row in report["decode_check"].items():
        print(f"{kind:<6} {row['identical_to_plain']}/{row['prompts']}  "
              f"{row['steps_decoded']} vs {row['steps_replayed']}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
