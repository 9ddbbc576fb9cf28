"""Side-by-side decoding benchmark: transformers `generate` (greedy), our vanilla decoder, and PPD.

`generate` runs the model as transformers builds it (nn.Linear). Ours run it as the workers load it: on a CPU
in float32 with weight-stationary linear layers (workers/cpu_linear.py; `--cpu-linear torch` to turn them
off), and then a fourth method, `vanilla_nn_linear`, runs our vanilla decoder on the stock model, so the
linear layers' share and the decoder's show apart.

Every method decodes the same prompts to the same fixed length (EOS switched off, so all do equal work) in
one process, on one device, interleaved run by run; speeds are medians over repeats after a warm-up. Ratios
are against `generate`, measured in the same run. Peak memory is the extra memory one run needs: on CUDA the
allocator's peak; on CPU the peak resident-set growth of a fresh subprocess doing one run (inside a warm
process the allocator reuses freed memory and the growth reads as zero).

    python -m jobs.bench.decode                       # batch 1 and 8 on CPU (and CUDA when available)
    python -m jobs.bench.decode --batch-sizes 1 4 --max-new-tokens 32 --repeats 3 --prompts ARTIFACT_DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field

from decoding import PPDDecoder, PromptTokens, VanillaDecoder, default_tree_set
from jobs.bench.hf_baseline import hf_greedy
from jobs.config import DEMO_INPUT
from jobs.inputs import read_rows
from workers.artifacts import load_prompt_tokens
from workers.configs import CpuLinear, ModelConfig
from workers.cpu_linear import linear_kind
from workers.models import LoadedModel, encode_row, load_model

REPO_ROOT = Path(__file__).resolve().parents[2]


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(default="default", description="Model: 'default', an HF directory or a GGUF file.")
    devices: list[str] = Field(default_factory=lambda: ["auto"],
                               description="Devices to measure; 'auto' = cpu, plus cuda when available.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Model dtype (auto: float32 on CPU, bfloat16 on CUDA).")
    cpu_linear: CpuLinear = Field(
        default="auto", description="Linear layers of our decoders' model on a CPU in float32 "
        "(ModelConfig.cpu_linear); `generate` always runs nn.Linear.")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], description="Batch sizes to measure.")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens generated per row (EOS ignored).")
    repeats: int = Field(default=3, ge=1, description="Timed runs per method; the median is reported.")
    input: str = Field(default=str(DEMO_INPUT), description="JSONL or Parquet prompts (`messages` or `prompt` rows).")
    prompts: str | None = Field(default=None, description="Prompt-token artifact; default: untrained init.")
    output_json: str | None = Field(default=None, description="Also write the results here as JSON.")
    memory_probe: str | None = Field(default=None, description="Internal: 'METHOD:BATCH' runs one method "
                                     "once on CPU and prints its peak memory growth as JSON.")


class PeakRSS:
    """Peak resident memory of this process above its level at start, sampled by a thread (CPU runs)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.proc = interval_s, psutil.Process()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def timed(fn: Callable[[], tuple], device: torch.device) -> tuple[float, float | None, list[list[int]], object]:
    """Run ``fn`` once: (seconds, peak extra CUDA memory in MiB or None on CPU, token ids per row, raw result)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return seconds, peak, out[0], out[1]


def cpu_peak_memory_mb(method: str, batch: int, cfg: BenchConfig) -> float:
    """One run of ``method`` in a fresh subprocess; its peak resident-set growth in MiB."""
    args = [sys.executable, "-m", "jobs.bench.decode", "--memory-probe", f"{method}:{batch}", "--model", cfg.model,
            "--dtype", cfg.dtype, "--cpu-linear", cfg.cpu_linear, "--max-new-tokens", str(cfg.max_new_tokens),
            "--input", cfg.input]
    if cfg.prompts:
        args += ["--prompts", cfg.prompts]
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mem_mb"]


def load_models(cfg: BenchConfig, device: str) -> tuple[LoadedModel, LoadedModel]:
    """(the model as our decoders get it, the model as transformers builds it): the same object unless the
    first has weight-stationary linear layers."""
    ours = load_model(ModelConfig(model=cfg.model, device=device, dtype=cfg.dtype, cpu_linear=cfg.cpu_linear))
    if linear_kind(ours.model) == "torch":
        return ours, ours
    return ours, load_model(ModelConfig(model=cfg.model, device=device, dtype=cfg.dtype, cpu_linear="torch"))


def memory_probe(cfg: BenchConfig) -> None:
    method, batch = cfg.memory_probe.split(":")
    lm, stock = load_models(cfg, "cpu")
    prompts = read_prompts(cfg.input, lm.tokenizer, int(batch))
    fn = methods(lm, stock, cfg)[method]
    with torch.inference_mode():  # page in the (memory-mapped) weights with a one-token forward
        for model in {id(m.model): m.model for m in (lm, stock)}.values():
            model(input_ids=torch.tensor([prompts[0][:1]]))
    with PeakRSS() as mem:
        fn(prompts)
    print(json.dumps({"peak_mem_mb": mem.delta_mb}))


def read_prompts(path: str, tokenizer, count: int) -> list[list[int]]:
    rows = read_rows(path)  # the job's own reader: JSONL or Parquet, bad input named
    encoded = [encode_row(tokenizer, messages=r.get("messages"), prompt=r.get("prompt")) for r in rows]
    return [encoded[i % len(encoded)] for i in range(count)]


def methods(lm: LoadedModel, stock: LoadedModel, cfg: BenchConfig) -> dict[str, Callable]:
    """``stock``: the model with nn.Linear, which `generate` runs (and `vanilla_nn_linear` when ``lm`` is not
    the same model)."""
    model, tok, n = lm.model, lm.tokenizer, cfg.max_new_tokens
    if cfg.prompts:
        pt = load_prompt_tokens(cfg.prompts, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype)
    else:
        pt = PromptTokens.from_token_embeddings(model, k=3, n=1, base_model_id=lm.model_id,
                                                base_model_hash=lm.content_hash)
    vanilla = VanillaDecoder(model, eos_token_ids=[])
    ppd = PPDDecoder(model, pt, default_tree_set(pt.k), eos_token_ids=[])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def hf(prompts):
        return hf_greedy(stock.model, prompts, n, pad_id), None

    def ours(decoder):
        def run(prompts):
            results = decoder.generate(prompts, n)
            return [r.token_ids for r in results], results
        return run

    runners = {"generate": hf, "vanilla": ours(vanilla), "ppd": ours(ppd)}
    if stock is not lm:
        runners["vanilla_nn_linear"] = ours(VanillaDecoder(stock.model, eos_token_ids=[]))
    return runners


def bench_device(device: str, cfg: BenchConfig) -> list[dict]:
    lm, stock = load_models(cfg, device)
    dev = lm.device
    runners = methods(lm, stock, cfg)
    rows = []
    for batch in cfg.batch_sizes:
        prompts = read_prompts(cfg.input, lm.tokenizer, batch)
        for fn in runners.values():  # warm-up: kernels, allocator, caches
            fn([p for p in prompts])
        runs: dict[str, list] = {name: [] for name in runners}
        for _ in range(cfg.repeats):  # interleaved, so drifting machine load hits every method alike
            for name, fn in runners.items():
                runs[name].append(timed(lambda fn=fn, prompts=prompts: fn(prompts), dev))
        reference = runs["generate"][0][2]
        base_s = statistics.median(r[0] for r in runs["generate"])
        for name, measured in runs.items():
            seconds = statistics.median(r[0] for r in measured)
            tokens = sum(len(t) for t in measured[0][2])
            results = measured[0][3]
            steps = sum(r.num_steps for r in results) if results else tokens
            peak = (max(r[1] for r in measured) if dev.type == "cuda"
                    else cpu_peak_memory_mb(name, batch, cfg))
            rows.append({
                "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                "dtype": str(lm.dtype).removeprefix("torch."), "batch": batch, "method": name,
                "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "ratio_vs_generate": base_s / seconds, "steps": steps, "tau": tokens / steps,
                "peak_mem_mb": peak,
                "same_tokens_as_generate": sum(a == b for a, b in zip(measured[0][2], reference)),
                "rows": batch,
            })
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'device':<22} {'dtype':<9} {'batch':>5} {'method':<17} {'tok/s':>8} {'x gen':>6} {'steps':>6} "
            f"{'tau':>5} {'peak MiB':>9} {'= gen':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['device'][:22]:<22} {r['dtype']:<9} {r['batch']:>5} {r['method']:<17} {r['tokens_per_s']:>8.1f} "
              f"{r['ratio_vs_generate']:>6.2f} {r['steps']:>6} {r['tau']:>5.2f} {r['peak_mem_mb']:>9.1f} "
              f"{r['same_tokens_as_generate']:>3}/{r['rows']:<2}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.decode",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in BenchConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name in ("devices", "batch_sizes"):
            p.add_argument(flag, nargs="+", type=int if name == "batch_sizes" else str, help=field.description)
        else:
            p.add_argument(flag, help=field.description)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = BenchConfig(**args)
    if cfg.memory_probe:
        memory_probe(cfg)
        return 0
    devices = cfg.devices
    if devices == ["auto"]:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [row for device in devices for row in bench_device(device, cfg)]
    print(f"\nmax_new_tokens={cfg.max_new_tokens}, repeats={cfg.repeats} (median), torch threads="
          f"{torch.get_num_threads()}, prompts={'artifact ' + cfg.prompts if cfg.prompts else 'untrained init'}\n")
    print_table(rows)
    if cfg.output_json:
        Path(cfg.output_json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
