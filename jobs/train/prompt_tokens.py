#!/usr/bin/env python3
"""Train PPD prompt tokens by self-distillation and write a prompt-token artifact.

    python -m jobs.train.prompt_tokens  # the default model -> outputs/prompt_tokens
    python -m jobs.train.prompt_tokens --config train.yaml --epochs 3 --ensemble 2
    python -m jobs.train.prompt_tokens --ray  # the same, as one task on a Ray GPU (or CPU) worker

Only the prompt-token embeddings train; the base model is frozen. Each sample (a prompt and the model's own
greedy response, see jobs/train/data.py) runs once through the model without gradient; then many random
cut points share one student pass (decoding/distill.py). Loss: forward KL(teacher || student) per prompt
token, weighted by alpha^(i-1). AdamW with a cosine schedule. Deterministic for a seed: the sample order of
each epoch and the cuts of each sample come from generators seeded by (seed, epoch, sample), so a resumed run
draws exactly what an uninterrupted one would. Checkpoints go to OUTPUT.checkpoint.pt beside the artifact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from decoding import PromptTokens
from decoding.distill import sequence_loss
from jobs.train.accuracy import draw_cuts, evaluate, sample_generator, sequence
from jobs.train.data import DataConfig, Sample, load_samples
from workers.artifacts import save_prompt_tokens
from workers.configs import ModelConfig
from workers.models import load_model


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelConfig = Field(default_factory=ModelConfig, description="The frozen base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Distillation data.")
    output: str = Field(default="outputs/prompt_tokens", description="Artifact directory (and checkpoints).")
    k: int = Field(default=3, ge=1, le=8, description="Number of prompt tokens.")
    ensemble: int = Field(default=1, ge=1, le=16, description="Ensemble copies per prompt token (EPT).")
    epochs: int = Field(default=2, ge=1, description="Passes over the training samples.")
    cuts_per_sample: int = Field(default=24, ge=1, description="Random cut points drawn per sample and epoch.")
    samples_per_step: int = Field(default=4, ge=1, description="Samples whose gradients add up per step.")
    lr: float = Field(default=1e-2, gt=0, description="AdamW peak learning rate (cosine decay to 0).")
    alpha: float = Field(default=0.8, gt=0, le=1, description="Loss weight decay per prompt-token distance.")
    seed: int = Field(default=0, description="Seed for the sample order, the cuts and the EPT init noise.")
    checkpoint_every: int = Field(default=25, ge=1, description="Steps between checkpoints.")
    eval_cuts_per_sample: int = Field(default=32, ge=1, description="Cuts per held-out sample when evaluating.")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's choice).")
    stop_after_steps: int | None = Field(default=None, ge=1, description="Stop (with a checkpoint) after this "
                                         "many steps in this run, to time-box it; run again to resume.")

    def training_hash(self) -> str:
        """What a checkpoint must agree with to be resumed (everything that changes the result)."""
        keys = self.model_dump(exclude={"output", "checkpoint_every", "threads", "eval_cuts_per_sample",
                                        "stop_after_steps"})
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_path(output: Path) -> Path:
    """Beside the artifact directory, which holds the artifact alone."""
    return output.with_name(output.name + ".checkpoint.pt")


def train(cfg: TrainConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    lm = load_model(cfg.model)
    model, device = lm.model, lm.device
    train_samples = load_samples(cfg.data, lm, held_out=False, cache_dir=cfg.model.cache_dir)
    eval_samples = load_samples(cfg.data, lm, held_out=True, cache_dir=cfg.model.cache_dir)

    pt = PromptTokens.from_token_embeddings(model, k=cfg.k, n=cfg.ensemble, base_model_id=lm.model_id,
                                            base_model_hash=lm.content_hash,
                                            generator=torch.Generator().manual_seed(cfg.seed))
    pt = pt.to(device=device, dtype=torch.float32)  # the trained parameters stay fp32 even for a bf16 model
    steps_per_epoch = math.ceil(len(train_samples) / cfg.samples_per_step)
    total_steps = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(pt.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps)
                                                                                  / total_steps)))
    ckpt_path, step, losses = checkpoint_path(out), 0, []
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt["training_hash"] != cfg.training_hash():
            raise SystemExit(f"{ckpt_path} belongs to another training config; remove it or use another --output")
        pt.embeddings.data.copy_(ckpt["embeddings"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step, losses = ckpt["step"], ckpt["losses"]
        print(f"resuming from step {step} of {total_steps}")

    started, first_step = time.perf_counter(), step
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=None)
    while step < total_steps:
        if cfg.stop_after_steps and step - first_step >= cfg.stop_after_steps:
            bar.close()
            return {"artifact": None, "steps": step, "stopped": True}
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_samples), generator=sample_generator(cfg.seed, epoch, -1)).tolist()
        batch = order[in_epoch * cfg.samples_per_step: (in_epoch + 1) * cfg.samples_per_step]
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for index in batch:
            s = train_samples[index]
            cuts = draw_cuts(s, cfg.k, cfg.cuts_per_sample, sample_generator(cfg.seed, epoch, index)).to(device)
            if len(cuts) == 0:
                continue
            loss = sequence_loss(model, pt, sequence(s, device), cuts, cfg.alpha) / len(batch)
            loss.backward()
            step_loss += loss.item()
        opt.step()
        sched.step()
        step += 1
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", epoch=epoch)
        stopping = cfg.stop_after_steps and step - first_step >= cfg.stop_after_steps
        if step % cfg.checkpoint_every == 0 or step == total_steps or stopping:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"training_hash": cfg.training_hash(), "embeddings": pt.embeddings.data, "step": step,
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "losses": losses}, tmp)
            os.replace(tmp, ckpt_path)
    bar.close()
    train_seconds = time.perf_counter() - started

    evaluation = evaluate(lm, pt, eval_samples, cfg.eval_cuts_per_sample)
    pt.meta.extra = {
        "init": "mean_token_embedding",
        "training": {"config": cfg.model_dump(mode="json"), "training_hash": cfg.training_hash(), "steps": step,
                     "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])), "seconds_this_run": train_seconds},
        "data": {"sources": {"chat": "alpaca_seed_tasks.jsonl", "math": "gsm8k_train.jsonl",
                             "code": "python stdlib docstrings"},
                 "train_samples": _count_by_kind(train_samples), "eval_samples": _count_by_kind(eval_samples),
                 "response_max_new_tokens": cfg.data.max_new_tokens},
        "evaluation": evaluation,
        "acceptance": evaluation["all"]["acceptance"],  # a[i][r], for building trees
    }
    artifact_hash = save_prompt_tokens(pt, out)
    return {"artifact": str(out), "artifact_hash": artifact_hash, "steps": step,
            "final_loss": pt.meta.extra["training"]["final_loss"], "evaluation": evaluation}


def _count_by_kind(samples: list[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return counts


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, bool]:
    p = argparse.ArgumentParser(prog="python -m jobs.train.prompt_tokens", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE", help="YAML with TrainConfig values; flags override it")
    p.add_argument("--ray", action="store_true", help="run as one task on a Ray worker (a GPU when one is free)")
    p.add_argument("--model", help="'default', an HF model directory or a GGUF file")
    p.add_argument("--device", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    flag_types = {"output": str, "k": int, "ensemble": int, "epochs": int, "cuts_per_sample": int,
                  "samples_per_step": int, "lr": float, "alpha": float, "seed": int, "checkpoint_every": int,
                  "threads": int, "stop_after_steps": int}
    for name, kind in flag_types.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=TrainConfig.model_fields[name].description)
    args = vars(p.parse_args(argv))
    config_file, use_ray = args.pop("config"), args.pop("ray")
    raw = (yaml.safe_load(Path(config_file).read_text()) if config_file else None) or {}
    for key in ("model", "device", "dtype"):
        value = args.pop(key)
        if value is not None:
            raw.setdefault("model", {})[key] = value
    raw.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**raw), use_ray


def main(argv: list[str] | None = None) -> int:
    cfg, use_ray = parse_config(argv)
    if use_ray:
        import ray

        ray.init()
        # Paths are the driver's: resolve them before the task runs in another process.
        cfg = cfg.model_copy(update={"output": str(Path(cfg.output).resolve())})
        if ray.cluster_resources().get("GPU", 0) >= 1:
            resources = {"num_gpus": 1}
        else:  # a CPU task gets 1 CPU (and 1 torch thread) unless it asks for more
            cpus = int(max(n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")))
            resources = {"num_cpus": cpus}
            cfg = cfg.model_copy(update={"threads": cfg.threads or cpus})
        result = ray.get(ray.remote(**resources)(train).remote(cfg))
    else:
        result = train(cfg)
    if result.get("stopped"):
        print(f"stopped at step {result['steps']} (checkpoint saved); run again to resume")
        return 0
    ev = result["evaluation"]["all"]
    print(f"wrote {result['artifact']} ({result['steps']} steps, final loss {result['final_loss']:.3f})")
    for i in range(cfg.k):
        print(f"  distance {i + 2}: top-1 {ev['top1'][i]:.3f}  top-5 {ev['top5'][i]:.3f}  top-10 {ev['top10'][i]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
