#!/usr/bin/env python3
"""What a decode step costs beyond its arithmetic: eager, eager at fixed shapes, compiled and (on CUDA) CUDA
graphs, side by side in one run.

    python -m jobs.bench.overhead --proxy --rounds 7                # CPU: the overhead-bound proxy (below)
    python -m jobs.bench.overhead                                   # the default model: batch 1 and 8
    python -m jobs.bench.overhead --device cuda --batch-sizes 1 8 32 --modes eager compile cuda_graphs
    python3 -m jobs.bench.overhead --random-default --device cuda   # no model package: the default's shape

``--proxy``: a random Llama small enough that the host's work dominates a step (4 layers, hidden 64; on this
project's 2-core VM a [8, 256] x [256, 1024] matmul alone takes 0.13 ms, so hidden 256 is compute-bound),
batch 8, a plain step and a 16-slot tree step, timed by ``jobs/bench/time_step.py`` processes that take turns:
the engine of ``--baseline`` (a revision before fixed shapes; its ``decoding/`` extracted with git archive)
eager, and this tree's eager, fixed-shape and compiled steps. It ends with the line
``overhead-bound step speed-up (new compiled / old eager): R``, R the smaller of the two steps' speed-ups.
``--proxy --default-model --batch-sizes 1 4 16 --modes eager fixed``: the same processes on the default model
(loaded with transformers alone, PPD with the default tree), the old engine against this one.

Otherwise, for each batch size, method (``vanilla``; ``ppd``: the default tree set) and step mode, a SlotBatch decodes
batch x ``--rows-per-slot`` held-out prompts, each exactly ``--new-tokens`` tokens (EOS ignored, so every mode
does the same work). A first pass warms up (it compiles or captures every shape the run meets: its time is
the start-up cost); the timed passes follow, the modes taking turns. Reported: tokens/s, the ratio to eager,
the warm-up seconds, aten calls and host reads per step (one eager step, counted as jobs/bench/time_step.py counts
them), and whether every mode's tokens equal eager's (float32 kernels differ in their last bits between
compiled and eager, so a rare divergence late in a row is rounding, not a bug; the float64 tests check
equality).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from decoding import PPDDecoder, PromptTokens, VanillaDecoder, default_tree_set
from decoding.slots import Request, SlotBatch
from jobs.bench.common import RANDOM_SHAPES
from jobs.bench.hf_baseline import hf_greedy
from jobs.bench.host_ops import HOST_READS, top_level_aten_calls

REPO_ROOT = Path(__file__).resolve().parents[2]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_generate(model, batch_size: int, prompts: list[list[int]], new_tokens: int, static: bool
                ) -> tuple[float, dict]:
    """transformers' greedy ``generate`` over the prompts in batches of ``batch_size``, every prompt left-padded
    to the longest (one shape for all batches; ``static``: its static cache, compiled on CUDA). (seconds,
    outputs by row)."""
    device = model.get_input_embeddings().weight.device
    width = max(len(p) for p in prompts)
    outputs = {}
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        rows = hf_greedy(model, prompts[start:start + batch_size], new_tokens, width=width, static_cache=static)
        outputs.update({start + i: row for i, row in enumerate(rows)})
    sync(device)
    return time.perf_counter() - t0, outputs


def decode(decoder, batch_size: int, prompts: list[list[int]], new_tokens: int, mode: str) -> tuple[float, dict]:
    """(seconds, outputs by row) of one pass."""
    if mode in HF_MODES:
        return hf_generate(decoder.model, batch_size, prompts, new_tokens, static=mode == "hf_static")
    batch = SlotBatch(decoder, batch_size, eos_token_ids=[], step_mode=mode)
    batch.add([Request(p, new_tokens, tag=i) for i, p in enumerate(prompts)])
    sync(decoder.device)
    t0 = time.perf_counter()
    finished = batch.run()
    sync(decoder.device)
    return time.perf_counter() - t0, {req.tag: res.token_ids for req, res in finished}


def ops_per_step(decoder, batch_size: int, prompts: list[list[int]], fixed: bool) -> tuple[int, int]:
    """(aten calls, host reads) in one eager step of a full batch, admission excluded, counted as the proxy
    counts them (jobs/bench/time_step.py)."""
    batch = SlotBatch(decoder, batch_size, eos_token_ids=[], step_mode="fixed" if fixed else "eager")
    batch.add([Request(p, 8) for p in prompts[:batch_size]])
    batch.step()  # admission and a first step
    calls = top_level_aten_calls(batch.step)
    return len(calls), sum(name in HOST_READS for name in calls)


def load(args):
    """(model, prompt tokens, prompts): the default model, its trained prompt tokens and held-out prompts; or,
    ``--random-default``, a random model of its shape, untrained prompt tokens and random prompts."""
    if not args.random_default and not args.random_shape:
        from jobs.bench.common import load_model_and_prompts
        from jobs.train.data import DEFAULT_DATA_DIR, mixed_held_out_prompts

        lm, pt = load_model_and_prompts(args.device, args.dtype, None)
        return lm.model, pt, mixed_held_out_prompts(lm, pt, args.data_dir or DEFAULT_DATA_DIR)
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    shape = RANDOM_SHAPES[args.random_shape or "default"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(device=device, dtype=dtype).eval()
    pt = PromptTokens.from_token_embeddings(model, k=3, base_model_id="random", base_model_hash="random")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, shape["vocab_size"], (int(n),), generator=g).tolist()
               for n in torch.randint(40, 200, (64,), generator=g)]
    return model, pt, prompts


PROXY_MODES = ("old", "eager", "fixed", "compile")
# transformers' generate as the baselines of plain decoding: eager with its dynamic cache; a static cache, compiled
HF_MODES = ("hf_eager", "hf_static")


class StepTimer:
    """One ``jobs/bench/time_step.py --serve`` process: started (and warmed up) at construction, then one command at
    a time. Between commands it is stopped (SIGSTOP), so that its threads cannot spin beside the one being
    timed: with eight processes waiting, every step measured 1.5-2x slower than alone."""

    def __init__(self, pythonpath: Path, child_args: list[str]):
        # ``decoding`` from ``pythonpath`` (an older revision's, or this tree's), ``jobs`` from this tree.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pythonpath), str(REPO_ROOT)]))
        self.proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "jobs" / "bench" / "time_step.py"), "--serve",
                                      *child_args], env=env, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self.ready = self._read()
        self.proc.send_signal(signal.SIGSTOP)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"jobs/bench/time_step.py exited ({self.proc.wait()}) before answering")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        self.proc.send_signal(signal.SIGSTOP)
        return answer

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def extract_decoding(revision: str, into: Path) -> Path:
    """``decoding/`` of ``revision`` under ``into`` (a directory to put first on PYTHONPATH)."""
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", revision, "decoding"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def save_default_inputs(args, into: Path) -> list[str]:
    """The default model's directory, and its prompt tokens and held-out prompts saved under ``into``: the
    time_step.py arguments that load them."""
    from workers.models import resolve_cache_dir

    model, pt, prompts = load(args)
    model_dir = resolve_cache_dir(None) / f"gguf-{pt.meta.base_model_hash[:16]}"
    assert (model_dir / "config.json").exists(), f"no de-quantised default model at {model_dir}"
    inputs = into / "inputs.pt"
    torch.save({"embeddings": pt.embeddings.detach().float().cpu(), "meta": pt.meta.to_json_dict(),
                "prompts": prompts}, inputs)
    del model
    return ["--model-dir", str(model_dir), "--inputs", str(inputs)]


def side_by_side(args) -> list[dict]:
    """Old against new steps (see the module docstring): ms per step and host ops per step."""
    default = args.default_model
    steps = {"vanilla": "plain step", "ppd": "default-tree step" if default else "16-slot tree step"}
    batch_sizes = args.batch_sizes if default else [8]
    modes = args.modes if default else PROXY_MODES
    with tempfile.TemporaryDirectory() as tmp:
        old = extract_decoding(args.baseline, Path(tmp))
        model_args = save_default_inputs(args, Path(tmp)) if default else []
        print(f"{'default model' if default else 'overhead-bound proxy'}: old engine = {args.baseline}; "
              f"{args.rounds} timed rounds of {args.steps} steps", flush=True)
        timers = {}
        for batch in batch_sizes:
            for method in steps:
                for mode in ("old", *[m for m in modes if m != "old"]):  # one warm-up at a time
                    child = [*model_args, "--method", method, "--mode", mode, "--batch", str(batch),
                             "--steps", str(args.steps)]
                    timers[batch, method, mode] = StepTimer(old if mode == "old" else REPO_ROOT, child)
        times = {key: [] for key in timers}
        order = list(timers)
        for r in range(args.rounds):
            for key in (order if r % 2 == 0 else order[::-1]):
                times[key].append(timers[key].ask("time")["ms_per_step"])
        results = []
        print(f"{'batch':>5} {'step':<18} {'engine':<8} {'ms/step':>8} {'x old':>6} {'host ops':>8} "
              f"{'(aten+kernels)':>14} {'reads':>5} {'warm-up s':>9}")
        for (batch, method, mode), timer in timers.items():
            counts = timer.ask("count")
            timer.close()
            ms = statistics.median(times[batch, method, mode])
            old_ms = statistics.median(times[batch, method, "old"])
            row = {"section": "default" if default else "proxy", "batch": batch, "step": steps[method],
                   "engine": mode, "ms_per_step": ms, "ms_runs": times[batch, method, mode],
                   "speedup_vs_old": old_ms / ms, **counts, "warmup_s": timer.ready["warmup_s"],
                   "threads": timer.ready["threads"]}
            results.append(row)
            print(f"{batch:>5} {steps[method]:<18} {mode:<8} {ms:>8.2f} {old_ms / ms:>6.2f} {counts['host_ops']:>8} "
                  f"{'(' + str(counts['aten_calls']) + '+' + str(counts['kernels']) + ')':>14} "
                  f"{counts['host_reads']:>5} {timer.ready['warmup_s']:>9.1f}", flush=True)
    if default:
        worst = min((r for r in results if r["engine"] != "old"), key=lambda r: r["speedup_vs_old"])
        print(f"slowest against the old engine: {worst['speedup_vs_old']:.2f}x ({worst['engine']}, "
              f"{worst['step']}, batch {worst['batch']})", flush=True)
        return results
    by = {(r["step"], r["engine"]): r for r in results}
    for step in steps.values():
        old_row, new = by[step, "old"], by[step, "compile"]
        print(f"{step}: compiled {new['speedup_vs_old']:.2f}x the old eager step; host ops "
              f"{old_row['host_ops']} -> {new['host_ops']} ({old_row['host_ops'] / new['host_ops']:.1f}x fewer)")
    speedup = min(by[step, "compile"]["speedup_vs_old"] for step in steps.values())
    print(f"overhead-bound step speed-up (new compiled / old eager): {speedup:.2f}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--methods", nargs="+", default=["vanilla", "ppd"], choices=["vanilla", "ppd"])
    p.add_argument("--modes", nargs="+", default=["eager", "fixed", "compile"],
                   choices=["eager", "fixed", "compile", "cuda_graphs", *HF_MODES],
                   help="step modes; hf_eager / hf_static: transformers' generate (plain decoding only)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rows-per-slot", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data-dir", type=Path, default=None, help="the prompt data (default: ../shared/data)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--proxy", action="store_true", help="the overhead-bound proxy instead of the default model")
    p.add_argument("--default-model", action="store_true",
                   help="with --proxy: the old engine against this one on the default model (--batch-sizes, "
                   "--modes among eager fixed compile), in time_step.py processes")
    p.add_argument("--steps", type=int, default=30, help="with --proxy: steps per timed run")
    p.add_argument("--baseline", default="a057ee3",
                   help="the revision whose engine is the proxy's old eager step (default: the last before fixed "
                   "shapes)")
    p.add_argument("--random-default", action="store_true",
                   help="a randomly initialised model of the default's shape and random prompts (needs only torch "
                   "and transformers: for a GPU machine without the model package)")
    p.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES),
                   help="like --random-default, another shape (tiny: a smoke run on a CPU in seconds)")
    args = p.parse_args(argv)
    if args.proxy:
        results = side_by_side(args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return

    model, pt, all_prompts = load(args)
    device = model.get_input_embeddings().weight.device
    print(f"{device} {model.dtype}; {args.new_tokens} tokens a row, {args.rounds} timed rounds", flush=True)
    decoders = {"vanilla": lambda: VanillaDecoder(model),
                "ppd": lambda: PPDDecoder(model, pt, default_tree_set(pt.k))}
    results = []
    header = f"{'batch':>5} {'method':<8} {'mode':<12} {'tok/s':>7} {'x eager':>7} {'warm-up s':>9} {'ops/step':>8} " \
             f"{'reads':>5} {'= eager':>7}"
    print(header, flush=True)
    for batch_size in args.batch_sizes:
        prompts = [all_prompts[i % len(all_prompts)] for i in range(batch_size * args.rows_per_slot)]
        for method in args.methods:
            decoder = decoders[method]()
            modes = [m for m in args.modes if method == "vanilla" or m not in HF_MODES]
            warm, outputs, times = {}, {}, {mode: [] for mode in modes}
            for mode in modes:
                torch._dynamo.reset()
                warm[mode], outputs[mode] = decode(decoder, batch_size, prompts, args.new_tokens, mode)
            for r in range(args.rounds):
                for mode in (modes if r % 2 == 0 else modes[::-1]):
                    seconds, _ = decode(decoder, batch_size, prompts, args.new_tokens, mode)
                    times[mode].append(seconds)
            eager_rate = None
            for mode in modes:
                tokens = sum(len(t) for t in outputs[mode].values())
                rate = tokens / statistics.median(times[mode])
                eager_rate = eager_rate or (rate if mode == "eager" else None)
                ops, reads = ops_per_step(decoder, batch_size, prompts, mode == "fixed") \
                    if mode in ("eager", "fixed") else (None, None)
                same = sum(outputs[mode][i] == outputs[modes[0]][i] for i in outputs[mode])
                row = {"batch": batch_size, "method": method, "mode": mode, "dtype": str(model.dtype),
                       "device": str(device), "tokens_per_s": rate,
                       "vs_eager": rate / eager_rate if eager_rate else None, "warmup_s": warm[mode],
                       "ops_per_step": ops, "host_reads_per_step": reads, "rows_equal_first_mode": same,
                       "rows": len(outputs[mode])}
                results.append(row)
                print(f"{batch_size:>5} {method:<8} {mode:<12} {rate:>7.1f} "
                      f"{(row['vs_eager'] or float('nan')):>7.2f} {warm[mode]:>9.1f} {ops or '-':>8} "
                      f"{'-' if reads is None else reads:>5} {same:>3}/{len(outputs[mode]):<3}", flush=True)
            if args.json:  # after every method: a run cut short by a timeout keeps what it measured
                args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
