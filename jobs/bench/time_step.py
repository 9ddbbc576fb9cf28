#!/usr/bin/env python3
"""Time the decode step of a small random Llama, for ``jobs/bench/overhead.py``'s overhead-bound proxy.

Runs against whichever ``decoding`` package comes first on the path: bench_overhead runs it once with this
tree's and once with the engine of an older revision (extracted with ``git archive``), in separate processes
that take turns. It uses only the API both share, plus ``step_mode`` for the new engine.

    PYTHONPATH=. python -m jobs.bench.time_step --method ppd --mode compile

It warms up (two timed runs: compiling, for a compiled step), prints a JSON line, then answers each command
with one: ``time``, milliseconds per step of one run of ``--steps`` steps; ``count``, what the host launches
in one step, counted with torch.profiler:
``aten_calls``, the aten ops called from Python or from inductor's wrapper (an op's own inner aten calls
excluded: ``linear`` is one call, not ``t`` plus ``mm``), plus for a compiled step ``kernels``, the kernels
inductor generated for the step's graph (the profiler does not see them; the wrapper calls each once), the
most of any one graph (rows grow through two attention views, so two graphs are compiled; a step runs one).
``host_ops`` is their sum; ``host_reads`` counts ``aten::item``/``_local_scalar_dense``/``nonzero`` calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from decoding import PPDDecoder, PromptTokens, TreeSet, TreeSpec, VanillaDecoder
from decoding.slots import Request, SlotBatch
from jobs.bench.host_ops import HOST_READS, kernel_launches, top_level_aten_calls


def sixteen_slot_tree_set(k: int = 3, top_k: int = 10) -> TreeSet:
    """Every node carries k prompt tokens, so after its first step a row is always in state k, whose tree is
    4 nodes x (1 + 3 prompt tokens) = 16 slots; the shallower states' trees are their depth's part of it."""
    full = {(): k, (0,): k, (1,): k, (0, 0): k}
    trees = tuple(TreeSpec.build({p: c for p, c in full.items() if len(p) <= m}) for m in range(k + 1))
    return TreeSet(k=k, top_k=top_k, trees=trees)


def build(args):
    if args.model_dir is not None:
        return from_saved(args)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    if args.method == "vanilla":
        decoder = VanillaDecoder(model)
    else:
        pt = PromptTokens.from_token_embeddings(model, k=3, base_model_id="random", base_model_hash="random")
        decoder = PPDDecoder(model, pt, sixteen_slot_tree_set())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    return decoder, prompts


def from_saved(args):
    """A Hugging Face model directory, and the prompt tokens and prompts bench_overhead saved (``--inputs``);
    PPD decodes with the default tree."""
    from transformers import AutoModelForCausalLM

    from decoding import PromptTokensMeta, default_tree_set

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    saved = torch.load(args.inputs)
    if args.method == "vanilla":
        decoder = VanillaDecoder(model)
    else:
        pt = PromptTokens(saved["embeddings"], PromptTokensMeta.from_json_dict(saved["meta"]))
        decoder = PPDDecoder(model, pt, default_tree_set(pt.k))
    prompts = saved["prompts"]
    return decoder, [prompts[i % len(prompts)] for i in range(args.batch)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["vanilla", "ppd"], default="vanilla")
    p.add_argument("--mode", choices=["old", "eager", "fixed", "compile"], default="eager",
                   help="old: the SlotBatch of a revision without step modes; the rest: new engine step modes")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="steps a timed run takes (fresh rows each run)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a Hugging Face model directory instead of the random Llama (with --inputs)")
    p.add_argument("--inputs", type=Path, default=None,
                   help="with --model-dir: a torch file of prompt-token embeddings, their meta and the prompts")
    p.add_argument("--serve", action="store_true",
                   help="after the warm-up, answer commands on stdin: 'time' (one timed run), 'count', 'quit'")
    args = p.parse_args(argv)
    if args.mode == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False  # generate the code each time: its kernels are counted

    decoder, prompts = build(args)
    kwargs = {} if args.mode == "old" else dict(step_mode=args.mode)
    batch = SlotBatch(decoder, args.batch, eos_token_ids=[], **kwargs)
    runner = StepRunner(batch, prompts, args.steps)
    t0 = time.perf_counter()
    source = runner.warm_up()
    answer({"ready": True, "warmup_s": time.perf_counter() - t0, "threads": torch.get_num_threads()})
    kernels = max((kernel_launches(code) for code in source), default=0)  # a step runs one graph
    commands = sys.stdin if args.serve else ["time", "count"]
    for line in commands:
        command = line.strip()
        if command == "time":
            answer({"ms_per_step": runner.timed_run()})
        elif command == "count":
            calls = runner.counted_step()
            answer({"aten_calls": len(calls), "kernels": kernels, "host_ops": len(calls) + kernels,
                    "host_reads": sum(name in HOST_READS for name in calls)})
        elif command == "quit":
            break
        else:
            answer({"error": f"unknown command {command!r}"})


class StepRunner:
    """Timed runs of ``steps`` steps, each over fresh rows that never finish inside it (admission and the
    first step untimed), so every timed step has the same shape: a full batch, one attention bucket."""

    def __init__(self, batch: SlotBatch, prompts: list[list[int]], steps: int):
        self.batch, self.prompts, self.steps = batch, prompts, steps

    def fresh_rows(self) -> None:
        self.batch.take_in_flight()
        self.batch.add([Request(p, self.steps * 8) for p in self.prompts])
        self.batch.step()

    def warm_up(self) -> list[str]:
        """Two runs; returns the code inductor generated, one source per graph (none eager)."""
        from torch._inductor.utils import run_and_get_code

        _, code = run_and_get_code(lambda: [self.timed_run() for _ in range(2)])
        return code

    def timed_run(self) -> float:
        """Milliseconds per step."""
        self.fresh_rows()
        t0 = time.perf_counter()
        for _ in range(self.steps):
            self.batch.step()
        ms = (time.perf_counter() - t0) / self.steps * 1e3
        assert self.batch.busy == len(self.prompts), "every row decodes throughout"
        return ms

    def counted_step(self) -> list[str]:
        self.fresh_rows()
        return top_level_aten_calls(self.batch.step)


def answer(record: dict) -> None:
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
