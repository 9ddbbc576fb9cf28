#!/usr/bin/env python3
"""A random-weight model of a real size, built on the device (no download), run as a worker would run it: the
memory plan it gets, step costs at tree widths 1, 16 and 64, tokens/s at batch 1, 32 and 128, and transformers'
`generate` with a compiled static cache at batch 1 as the baseline.

    python3 -m jobs.bench.real_size --shape llama-8b --device cuda --json out/real_size-llama-8b.json
    python3 -m jobs.bench.real_size --shape default --device cuda --json out/real_size-default.json
    python -m jobs.bench.real_size --smoke                         # tiny shapes on a CPU, in seconds (CI)

Step costs are a latency profile (profiling/latency.py) of plain steps (width 1) and static PPD steps (16 and 64
slots per row) at each batch size, captured as CUDA graphs on CUDA. Plain tokens/s is also measured by decoding
``--new-tokens`` tokens for every row of a full batch through a SlotBatch at the memory plan's capacity. Random
weights make acceptance meaningless, so PPD's tokens/s is an estimate: the tree a worker would choose from the
shipped artifact's acceptance table and the measured step costs, its expected tau over its step time.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from decoding import PromptTokens, VanillaDecoder
from decoding.slots import Request, SlotBatch
from jobs.bench.common import RANDOM_SHAPES
from jobs.bench.hf_baseline import hf_greedy
from profiling.latency import measure_profile
from workers.artifacts import reference_acceptance_table
from workers.memory import DoesNotFit, ModelShape, device_memory, job_capacity, plan_memory
from workers.planning import best_tree_set


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A LlamaForCausalLM of this shape, its random weights made on the device in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with device:
            model = LlamaForCausalLM(LlamaConfig(**RANDOM_SHAPES[shape]))
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_seconds(model, prompts: list[list[int]], new_tokens: int, capacity: int, step_mode: str) -> float:
    """Seconds to decode ``new_tokens`` plain tokens for every prompt at once (after a warm-up pass that captures
    the shapes), in a SlotBatch of one slot per prompt at ``capacity`` columns."""
    decoder = VanillaDecoder(model, eos_token_ids=[])
    batch = SlotBatch(decoder, len(prompts), step_mode=step_mode, capacity=capacity)
    seconds = []
    for _ in range(2):
        batch.add([Request(p, new_tokens) for p in prompts])
        sync(decoder.device)
        started = time.perf_counter()
        batch.run()
        sync(decoder.device)
        seconds.append(time.perf_counter() - started)
    return seconds[-1]


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    sync(device)
    out: dict = {"shape": args.shape, "device": str(device), "dtype": args.dtype,
                 "build_s": round(time.perf_counter() - started, 1), "config": RANDOM_SHAPES[args.shape]}
    shape = ModelShape.of(model)
    total, free = device_memory(device)
    capacity = job_capacity(args.max_prompt_tokens, args.new_tokens, shape.max_context, max(args.widths))
    plan = partial(plan_memory, shape, device=str(device), total=total, free=free, capacity=capacity,
                   step_tokens=max(args.widths), prefill_columns=args.max_prompt_tokens, graphs=device.type == "cuda",
                   gpu_memory_utilization=0.9, cpu_memory_share=0.5)
    plans = {}
    for batch in args.batch_sizes:
        try:
            plans[batch] = plan(batch_size=batch, max_batch_size=batch).as_dict()
        except DoesNotFit as exc:
            plans[batch] = {"does_not_fit": str(exc)}
    auto = plan(batch_size=None, max_batch_size=max(args.batch_sizes))
    out["memory"] = {"capacity": capacity, "auto": auto.as_dict(), "by_batch": plans}
    print(f"[{args.shape}] {auto.describe()}", flush=True)

    prompt_tokens = PromptTokens.from_token_embeddings(model, k=3, base_model_id=args.shape, base_model_hash="random")
    step_mode = "cuda_graphs" if device.type == "cuda" else "eager"
    started = time.perf_counter()
    profile = measure_profile(model, prompt_tokens, model_hash="random", batch_sizes=args.batch_sizes,
                              slots=args.widths, context_len=args.context, budget_s=args.profile_budget_s,
                              step_mode=step_mode)
    out["profile_s"] = round(time.perf_counter() - started, 1)
    out["step_ms"] = {str(b): {str(s): round(profile.step_seconds(b, s) * 1e3, 3) for s in profile.measured_slots(b)}
                      for b in profile.batches()}
    table = reference_acceptance_table(3)
    g = torch.Generator().manual_seed(1)
    vocab = shape.vocab
    rows = []
    for batch in args.batch_sizes:
        row: dict = {"batch": batch, "plain_tokens_per_s_profile": round(batch / profile.step_seconds(batch, 1), 1)}
        if table and profile.measured_slots(batch):
            choice = best_tree_set(profile, table, 3, 1, batch)
            row.update(ppd_slots=choice.chosen.slots, ppd_tau=round(choice.chosen.estimate.expected_tokens, 3),
                       ppd_tokens_per_s_estimate=round(batch * choice.chosen.estimate.expected_tokens
                                                       / choice.step_seconds, 1),
                       ppd_speedup_estimate=round(choice.speedup, 3))
        if "does_not_fit" not in plans[batch]:
            prompts = [torch.randint(0, vocab, (args.context,), generator=g).tolist() for _ in range(batch)]
            seconds = decode_seconds(model, prompts, args.new_tokens, capacity, step_mode)
            row["plain_tokens_per_s_decoded"] = round(batch * args.new_tokens / seconds, 1)
        rows.append(row)
        print(f"[{args.shape}] {row}", flush=True)
    out["by_batch"] = rows
    if args.hf:
        prompt = [torch.randint(0, vocab, (args.context,), generator=g).tolist()]
        static = device.type == "cuda"  # generate compiles its static cache's forward on CUDA only
        hf_greedy(model, prompt, args.new_tokens, static_cache=static)  # compiles
        sync(device)
        started = time.perf_counter()
        hf_greedy(model, prompt, args.new_tokens, static_cache=static)
        sync(device)
        out["hf_generate_b1"] = {"static_cache": static,
                                 "tokens_per_s": round(args.new_tokens / (time.perf_counter() - started), 1)}
        print(f"[{args.shape}] transformers generate, batch 1: {out['hf_generate_b1']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.real_size", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(RANDOM_SHAPES), default="llama-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--widths", type=int, nargs="+", default=[1, 16, 64], help="slots per row timed")
    p.add_argument("--context", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="the memory plan's prompt budget")
    p.add_argument("--profile-budget-s", type=float, default=60.0)
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' generate")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU, in seconds: checks the command runs")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.dtype = "tiny", "cpu", "float32"
        args.batch_sizes, args.widths, args.context, args.new_tokens = [1, 2], [1, 4], 8, 4
        args.max_prompt_tokens, args.profile_budget_s = 16, 2.0
    result = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
