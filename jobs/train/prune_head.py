#!/usr/bin/env python3
"""Train an early-pruning head (decoding/pruning.py) and write a prune-head artifact.

    python -m jobs.train.prune_head                          # default model, layer 12 -> outputs/prune_heads/default
    python -m jobs.train.prune_head --device cuda --max-new-tokens 256 --keep-top-k 16     # the shipped head

The head reads the hidden state after ``layer`` decoder layers and learns the model's own greedy next token
there (cross-entropy against the final layer's argmax: pruning keeps a child only when its token is among its
parent's head top-K, so the final argmax is what must rank high). The base model is frozen; only the head's
low-rank adapter trains. Data: the same prompts and cached greedy responses as prompt-token training
(jobs/train/data.py), every response position. The held-out split reports recall@K, the chance that the
model's argmax is in the head's top K, for the trained head and for the plain logit lens (the untrained head).
The artifact's keep_top_k is ``keep_top_k`` when given, else the smallest K whose held-out recall reaches
``target_recall`` (64 at most).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from decoding.batch import additive_mask, new_cache, pad_prompts
from decoding.pruning import PruneHead, run_layers
from jobs.train.data import DataConfig, load_samples
from workers.configs import ModelConfig
from workers.models import LoadedModel, load_model
from workers.prune_heads import save_prune_head

RECALL_KS = (1, 2, 4, 8, 16, 32, 64)


class PruneHeadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelConfig = Field(default_factory=ModelConfig, description="The frozen base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompts and greedy responses.")
    output: str = Field(default="outputs/prune_heads/default", description="Artifact directory.")
    layer: int = Field(default=12, ge=1, description="Decoder layers the head reads after.")
    rank: int = Field(default=256, ge=1, description="Rank of the head's residual adapter.")
    epochs: int = Field(default=30, ge=1, description="Passes over the training positions.")
    tokens_per_step: int = Field(default=2048, ge=1, description="Positions per optimiser step.")
    lr: float = Field(default=3e-3, gt=0, description="AdamW peak learning rate (cosine decay to 0).")
    target_recall: float = Field(default=0.97, gt=0, le=1, description="keep_top_k: the smallest K whose "
                                 "held-out recall@K reaches this (without keep_top_k).")
    keep_top_k: int | None = Field(default=None, ge=1, description="The artifact's keep_top_k (default: from "
                                   "target_recall). Pick it with jobs/bench/prune.py on the target device.")
    feature_batch: int = Field(default=16, ge=1, description="Samples per frozen forward pass.")
    positions: Literal["response", "all"] = Field(default="all", description="Positions trained on: "
                                                  "the responses only, or the prompts too (more data).")
    seed: int = Field(default=0, description="Seed for the position order.")


@torch.no_grad()
def features(lm: LoadedModel, samples, layer: int, batch: int, prompts_too: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states after ``layer`` layers [n, H] (fp32, on the CPU) and the model's argmax [n] at every
    position that predicts a response token (``prompts_too``: every position), computed by the same
    run_layers the decoder prunes with."""
    decoder, lm_head = lm.model.get_decoder(), lm.model.get_output_embeddings()
    hidden, targets = [], []
    for start in range(0, len(samples), batch):
        chunk = samples[start: start + batch]
        seqs = [s.prompt_ids + s.response_ids for s in chunk]
        ids, valid, attend, positions = pad_prompts(seqs, lm.device)  # [B, P]
        embeds = lm.model.get_input_embeddings()(ids)  # [B, P, H]
        mask = additive_mask(valid[:, :0], attend, embeds.dtype)  # [B, 1, P, P]: causal per row
        cache = new_cache(lm.model)
        early = run_layers(decoder, embeds, mask, positions, cache, slice(0, layer))  # [B, P, H]
        late = decoder.norm(run_layers(decoder, early, mask, positions, cache, slice(layer, None)))
        for b, s in enumerate(chunk):
            lo, hi = len(s.prompt_ids) - 1, len(s.prompt_ids) + len(s.response_ids) - 1  # predicts response[i]
            lo = 0 if prompts_too else lo
            hidden.append(early[b, lo:hi].float().cpu())
            targets.append(lm_head(late[b, lo:hi]).argmax(-1).cpu())
    return torch.cat(hidden), torch.cat(targets)


@torch.no_grad()
def recall_at(head: PruneHead, lm: LoadedModel, hidden: torch.Tensor, targets: torch.Tensor,
              chunk: int = 4096) -> dict[int, float]:
    """recall@K: the fraction of positions whose model argmax is among the head's top K."""
    decoder, lm_head = lm.model.get_decoder(), lm.model.get_output_embeddings()
    hits = torch.zeros(len(RECALL_KS))
    for start in range(0, len(targets), chunk):
        h = hidden[start: start + chunk].to(lm.device, lm.dtype)
        logits = head(h, decoder.norm, lm_head)  # [n, V]
        rank = (logits > logits.gather(1, targets[start: start + chunk, None].to(lm.device))).sum(1)  # [n]
        hits += torch.tensor([(rank < k).sum().item() for k in RECALL_KS], dtype=torch.float)
    return {k: float(h) / len(targets) for k, h in zip(RECALL_KS, hits)}


def train(cfg: PruneHeadConfig) -> dict:
    lm = load_model(cfg.model)
    layers = len(lm.model.get_decoder().layers)
    if cfg.layer >= layers:
        raise SystemExit(f"--layer {cfg.layer}: the model has {layers} layers; the head must read an earlier one")
    started = time.perf_counter()
    train_samples = load_samples(cfg.data, lm, held_out=False, cache_dir=cfg.model.cache_dir)
    eval_samples = load_samples(cfg.data, lm, held_out=True, cache_dir=cfg.model.cache_dir)
    train_h, train_y = features(lm, train_samples, cfg.layer, cfg.feature_batch,
                                prompts_too=cfg.positions == "all")
    eval_h, eval_y = features(lm, eval_samples, cfg.layer, cfg.feature_batch)
    feature_seconds = time.perf_counter() - started
    print(f"{len(train_y)} training and {len(eval_y)} held-out positions, layer {cfg.layer}/{layers} "
          f"({feature_seconds:.0f} s)", flush=True)

    decoder, lm_head = lm.model.get_decoder(), lm.model.get_output_embeddings()
    head = PruneHead(lm.model.config.hidden_size, cfg.layer, rank=cfg.rank).to(lm.device, lm.dtype)
    lens = recall_at(head, lm, eval_h, eval_y)  # the untrained head is the logit lens
    lens_train = recall_at(head, lm, train_h, train_y)
    head = head.float()
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(train_y) / cfg.tokens_per_step)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    # The frozen norm and lm_head run in fp32 for the head's gradients; copies, so the model stays as loaded.
    norm32 = copy.deepcopy(decoder.norm).float()
    weight32 = lm_head.weight.detach().float()
    losses = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train_y), generator=g)
        for step in range(steps_per_epoch):
            idx = order[step * cfg.tokens_per_step: (step + 1) * cfg.tokens_per_step]
            h, y = train_h[idx].to(lm.device), train_y[idx].to(lm.device)
            logits = norm32(h + head.up(head.down(h))) @ weight32.T  # [n, V]
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}/{cfg.epochs}: loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.3f}",
              flush=True)
    head = head.to(lm.dtype).eval().requires_grad_(False)
    trained = recall_at(head, lm, eval_h, eval_y)
    trained_train = recall_at(head, lm, train_h, train_y)
    keep = cfg.keep_top_k or next((k for k in RECALL_KS if trained[k] >= cfg.target_recall), RECALL_KS[-1])
    head.keep_top_k = keep
    extra = {"training": {"config": cfg.model_dump(exclude={"output"}), "positions": len(train_y),
                          "steps": total, "first_epoch_loss": sum(losses[:steps_per_epoch]) / steps_per_epoch,
                          "final_loss": sum(losses[-steps_per_epoch:]) / steps_per_epoch,
                          "seconds": time.perf_counter() - started,
                          "recall": {str(k): v for k, v in trained_train.items()},
                          "logit_lens_recall": {str(k): v for k, v in lens_train.items()}},
             "evaluation": {"positions": len(eval_y), "recall": {str(k): v for k, v in trained.items()},
                            "logit_lens_recall": {str(k): v for k, v in lens.items()}},
             "model_layers": layers}
    save_prune_head(head, cfg.output, base_model_id=lm.model_id, base_model_hash=lm.content_hash, extra=extra)
    return {"artifact": cfg.output, "recall": trained, "lens": lens, "train_recall": trained_train,
            "train_lens": lens_train, "keep_top_k": keep, "first_epoch_loss": extra["training"]["first_epoch_loss"],
            "final_loss": extra["training"]["final_loss"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train.prune_head", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="'default', an HF model directory or a GGUF file")
    p.add_argument("--device", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--data-dir", help=DataConfig.model_fields["data_dir"].description)
    p.add_argument("--generate-batch-size", type=int, help=DataConfig.model_fields["generate_batch_size"].description)
    p.add_argument("--max-new-tokens", type=int, help=DataConfig.model_fields["max_new_tokens"].description)
    flag_types = {"output": str, "layer": int, "rank": int, "epochs": int, "tokens_per_step": int, "lr": float,
                  "target_recall": float, "feature_batch": int, "seed": int, "positions": str, "keep_top_k": int}
    for name, kind in flag_types.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=PruneHeadConfig.model_fields[name].description)
    args = vars(p.parse_args(argv))
    raw: dict = {"model": {}, "data": {}}
    for key in ("model", "device", "dtype"):
        if (value := args.pop(key)) is not None:
            raw["model"][key] = value
    for key in ("data_dir", "generate_batch_size", "max_new_tokens"):
        if (value := args.pop(key)) is not None:
            raw["data"][key] = value
    raw.update({k: v for k, v in args.items() if v is not None})
    result = train(PruneHeadConfig(**raw))
    print(f"wrote {result['artifact']} (keep_top_k {result['keep_top_k']})")
    print("recall@K   " + "  ".join(f"{k:>5}" for k in RECALL_KS))
    for name in ("lens", "recall"):
        print(f"{'logit lens' if name == 'lens' else 'trained':<10} " + "  ".join(
            f"{result[name][k]:5.3f}" for k in RECALL_KS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
