#!/usr/bin/env python3
"""Evaluate prompt tokens on the held-out split: guess accuracy per distance, and tau at a fixed tree size.

    python jobs/eval_prompts.py --prompts artifacts/prompt_tokens/smollm2-135m-instruct --tree-nodes 63

For the trained prompt tokens, untrained ones (the mean-embedding start) and plain decoding, per kind of
prompt (chat / math / code): top-1/5/10 accuracy of prompt token i for the token i+2 places ahead (teacher
forced on the model's own greedy responses), the tau predicted from the acceptance table, and the tau
measured by decoding held-out prompts with PPD on the same fixed-size tree (the trained acceptance table
picks its paths; every node carries k prompt tokens). PPD outputs are checked against plain decoding.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402

from decoding import PPDDecoder, PromptTokens, VanillaDecoder  # noqa: E402
from jobs.train import TrainConfig, evaluate, load_samples  # noqa: E402
from profiling.trees import best_paths, expected_tokens_per_step, fixed_size_tree_set  # noqa: E402
from workers.artifacts import load_prompt_tokens  # noqa: E402
from workers.models import ModelConfig, load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs/eval_prompts.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="the trained prompt-token artifact")
    p.add_argument("--model", default="default")
    p.add_argument("--tree-nodes", type=int, default=63, help="candidate nodes of the fixed-size tree")
    p.add_argument("--per-kind", type=int, default=8, help="held-out prompts decoded per kind for tau")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eval-cuts-per-sample", type=int, default=32)
    p.add_argument("--output-json", help="also write the report here")
    args = p.parse_args(argv)

    lm = load_model(ModelConfig(model=args.model))
    trained = load_prompt_tokens(args.prompts, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype)
    untrained = PromptTokens.from_token_embeddings(lm.model, k=trained.k, n=1, base_model_id=lm.model_id,
                                                   base_model_hash=lm.content_hash).to(lm.device)
    # The held-out split the training run evaluated on (same selection rules and response length).
    train_cfg = TrainConfig(**trained.meta.extra.get("training", {}).get("config", {}))
    samples = load_samples(train_cfg.model_copy(update={"model": ModelConfig(model=args.model)}), lm, held_out=True)

    acc = {"trained": evaluate(lm, trained, samples, args.eval_cuts_per_sample),
           "untrained": evaluate(lm, untrained, samples, args.eval_cuts_per_sample)}
    tree_set = fixed_size_tree_set(acc["trained"]["all"]["acceptance"], args.tree_nodes, trained.k)
    paths = best_paths(acc["trained"]["all"]["acceptance"], args.tree_nodes, trained.k)

    report = {"tree_nodes": args.tree_nodes, "tree_hash": tree_set.tree_hash, "accuracy": acc, "tau": {}}
    vanilla = VanillaDecoder(lm.model, eos_token_ids=lm.eos_token_ids)
    for kind in ("chat", "math", "code"):
        prompts = [s.prompt_ids for s in samples if s.kind == kind][: args.per_kind]
        if not prompts:
            continue
        plain = [r.token_ids for r in vanilla.generate(prompts, args.max_new_tokens)]
        row = {"plain": 1.0, "prompts": len(prompts)}
        for name, pt in (("trained", trained), ("untrained", untrained)):
            results = PPDDecoder(lm.model, pt, tree_set, eos_token_ids=lm.eos_token_ids).generate(
                prompts, args.max_new_tokens)
            row[name] = sum(r.num_tokens for r in results) / sum(r.num_steps for r in results)
            row[f"{name}_predicted"] = expected_tokens_per_step(acc[name][kind]["acceptance"], paths)
            row[f"{name}_identical_to_plain"] = sum(r.token_ids == t for r, t in zip(results, plain))
        report["tau"][kind] = row

    print(f"\nheld-out accuracy (prompt token i guesses the token i+2 places ahead), tree of {args.tree_nodes} nodes")
    print(f"{'kind':<6} {'tokens':<10} " + "  ".join(f"{'d=' + str(i + 2) + ' top1/5/10':<19}" for i in range(trained.k)))
    for kind in ("chat", "math", "code", "all"):
        for name in ("trained", "untrained"):
            ev = acc[name].get(kind)
            if ev:
                cells = "  ".join(f"{ev['top1'][i]:.2f}/{ev['top5'][i]:.2f}/{ev['top10'][i]:.2f}     "
                                  for i in range(trained.k))
                print(f"{kind:<6} {name:<10} {cells}")
    print(f"\n{'kind':<6} {'prompts':>7} {'plain':>6} {'untrained':>10} {'trained':>8} {'predicted':>10} {'= plain':>8}")
    for kind, row in report["tau"].items():
        print(f"{kind:<6} {row['prompts']:>7} {1.0:>6.2f} {row['untrained']:>10.2f} {row['trained']:>8.2f} "
              f"{row['trained_predicted']:>10.2f} {row['trained_identical_to_plain']:>5}/{row['prompts']}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
