"""The two kinds of sampled draw (decoding/draws.py), eager, side by side: does the fixed-shape walk (every row
drawn at every depth, top_p's cut over the whole sorted vocabulary) cost anything measurable against the walk
sized to the rows? If it did not, one algorithm would do for every step mode.

    python -m jobs.bench.draws --batch-sizes 1 8 --rounds 3

Same rows, same seeds, the default model and its shipped prompt tokens, PPD at the default tree, eager steps;
the two kinds take turns in each round. Prints each kind's seconds (median over rounds), their ratio, and
whether the tokens are the same (they must be). The last line reads ``fixed / eager draw: R`` (the largest
ratio over the batch sizes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decoding import PPDDecoder, SamplingParams, completion_seed, default_tree_set
from decoding.draws import FixedShapeDraw, SlotDraw
from decoding.slots import Request, SlotBatch
from jobs.bench.common import load_model_and_prompts

PROMPTS = ["Write a short poem about the sea.", "Explain what a hash table is.",
           "Give three tips for a job interview.", "Summarise the plot of Hamlet in two sentences.",
           "What is the capital of Australia, and why is it not Sydney?",
           "Write a Python function that reverses a list.",
           "Describe a sunrise to someone who has never seen one.",
           "List the planets of the solar system in order."]


@torch.inference_mode()
def decode(lm, pt, prompts: list[list[int]], batch: int, new_tokens: int, draw_class: type[SlotDraw],
           params: list[SamplingParams]) -> tuple[float, list[list[int]]]:
    decoder = PPDDecoder(lm.model, pt, default_tree_set(pt.k), eos_token_ids=[])
    slots = SlotBatch(decoder, batch, eos_token_ids=[])
    slots.runner.draw_class = draw_class  # the eager runner, with the draw of this kind
    slots.add([Request(p, new_tokens, params[i], tag=i) for i, p in enumerate(prompts)])
    started = time.perf_counter()
    out = {req.tag: res.token_ids for req, res in slots.run()}
    return time.perf_counter() - started, [out[i] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.9)
    args = p.parse_args(argv)
    lm, pt = load_model_and_prompts("cpu", "float32", None)
    chats = [lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=False) for text in PROMPTS]
    prompts = [lm.tokenizer.encode(chat, add_special_tokens=False) for chat in chats]
    params = [SamplingParams(args.temperature, args.top_p, seed=completion_seed(7, i)) for i in range(len(prompts))]
    worst = 0.0
    for batch in args.batch_sizes:
        seconds: dict[str, list[float]] = {"eager": [], "fixed": []}
        tokens: dict[str, list[list[int]]] = {}
        for _ in range(args.rounds):
            for name, kind in (("eager", SlotDraw), ("fixed", FixedShapeDraw)):
                took, tokens[name] = decode(lm, pt, prompts, batch, args.max_new_tokens, kind, params)
                seconds[name].append(took)
        eager, fixed = statistics.median(seconds["eager"]), statistics.median(seconds["fixed"])
        same = tokens["eager"] == tokens["fixed"]
        worst = max(worst, fixed / eager)
        print(f"batch {batch}: eager draw {eager:.2f} s, fixed-shape draw {fixed:.2f} s, ratio {fixed / eager:.3f}, "
              f"tokens {'the same' if same else 'DIFFERENT'}", flush=True)
        if not same:
            return 1
    print(f"fixed / eager draw: {worst:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
