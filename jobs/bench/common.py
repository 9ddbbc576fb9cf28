"""What the decoding benchmarks share: the default model with its shipped prompt tokens, this device's latency
profile, the methods a worker would run at a batch size (plain, static PPD, ProPD, ProPD with pruning), and one
interleaved round of them over the same prompts."""

from __future__ import annotations

import time
from collections import Counter

import torch

from decoding import PPDDecoder, VanillaDecoder
from decoding.online_stats import LatencyModel
from decoding.propd import ProPDDecoder
from decoding.pruning import PruneHead
from profiling.device import identify
from profiling.latency import DEFAULT_SLOTS
from trees.builder import choose_budget, tree_family
from workers.artifacts import find_shipped_artifact, load_prompt_tokens
from workers.configs import ModelConfig
from workers.models import load_model, resolve_cache_dir
from workers.profiles import load_or_measure_profile

# Model shapes for random weights (--random-default, --random-shape; jobs/bench/real_size.py): the step cost of
# the real model, with no download.
RANDOM_SHAPES = {
    "default": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),  # SmolLM2-135M-Instruct
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                     rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),  # Llama-3.1-8B
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),  # smoke runs
}


def run_round(decoders: dict, prompts: list, max_new_tokens: int, device: torch.device, batch: int,
              rotation: int = 0, sampling: list | None = None) -> dict[str, dict]:
    """One round: ``prompts`` in consecutive batches of ``batch``, every method decoding each batch in turn
    (the order rotated per batch), so that the machine's drift, which on a shared 2-core VM moves a method's
    speed by 10-20% within a minute, falls on all methods alike. Each method's time is the sum of its calls.
    ``sampling``: per-prompt SamplingParams (None: greedy)."""
    methods = list(decoders)
    seconds = {m: 0.0 for m in methods}
    results: dict[str, list] = {m: [] for m in methods}
    slots_run: dict[str, Counter] = {m: Counter() for m in methods}  # ProPD: steps per slot count chosen
    for dec in decoders.values():
        if isinstance(dec, PPDDecoder):
            dec.passes, dec.tokens_processed = 0, 0.0
    for c, start in enumerate(range(0, len(prompts), batch)):
        shift = (rotation + c) % len(methods)
        for m in methods[shift:] + methods[:shift]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            results[m] += decoders[m].generate(prompts[start: start + batch], max_new_tokens,
                                               sampling=None if sampling is None else sampling[start: start + batch])
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[m] += time.perf_counter() - t0
            if isinstance(decoders[m], ProPDDecoder):
                slots_run[m].update(slots for _, slots in decoders[m].choices)
    out = {}
    for m, dec in decoders.items():
        rs = results[m]
        tokens, steps = sum(r.num_tokens for r in rs), sum(r.num_steps for r in rs)
        if isinstance(dec, PPDDecoder):  # pruned passes count their later layers' fewer tokens
            per_pass = dec.tokens_processed / dec.passes
        else:  # plain decoding: one token per active row per pass
            per_pass = steps / sum(max(r.num_steps for r in rs[start: start + batch])
                                   for start in range(0, len(rs), batch))
        out[m] = {"seconds": seconds[m], "tokens": tokens, "tau": tokens / steps, "per_pass": per_pass,
                  "outputs": [r.token_ids for r in rs]}
        if slots_run[m]:
            out[m]["slots_run"] = dict(sorted(slots_run[m].items()))
    return out


def load_model_and_prompts(device: str, dtype: str, prompts: str | None):
    """The default model and its prompt tokens (``prompts``: an artifact directory; None: the shipped one)."""
    lm = load_model(ModelConfig(device=device, dtype=dtype))
    artifact = prompts or find_shipped_artifact(lm.content_hash)
    if artifact is None:
        raise SystemExit("no trained prompt-token artifact for this model (give --prompts)")
    return lm, load_prompt_tokens(artifact, expect_model_hash=lm.content_hash, device=lm.device, dtype=lm.dtype)


def device_profile(lm, pt, batch_sizes, budget_s: float | None):
    """(this device's latency profile, cached or measured now, as a worker gets it; the device's name)."""
    profile, cached = load_or_measure_profile(lm.model, pt, model_hash=lm.content_hash,
                                              cache_dir=resolve_cache_dir(None), batch_sizes=batch_sizes,
                                              budget_s=budget_s)
    name = identify(lm.device, lm.dtype).readable
    print(f"{name}; profile {'cached' if cached else f'measured in {profile.profile_seconds:.0f} s'}", flush=True)
    return profile, name


def make_decoders(lm, pt, profile, batch: int, static_slots: int | None = None,
                  prune_head: PruneHead | None = None) -> tuple[dict, int]:
    """The methods at one batch size, with the static tree's slot count: plain decoding; PPD with the static
    tree a worker of this batch size plans from its profile; ProPD starting from that tree, as a worker's does;
    and, given a prune head, ProPD with early pruning. ``static_slots``: the static tree of that budget instead
    of the planned one (to see what a tree of a given size yields where the profile says no tree pays)."""
    table = pt.meta.extra["acceptance"]
    budgets = [static_slots] if static_slots else profile.measured_slots(batch)
    choice = choose_budget(table, pt.k, lambda s: profile.step_seconds(batch, s), budgets, n=pt.n)
    start = None if static_slots else choice.chosen.tree_set  # a forced budget may be outside the family
    family = tree_family(pt.k, DEFAULT_SLOTS, n=pt.n)
    prior = [(q.batch, q.slots, float(profile.context_len), q.seconds) for q in profile.points]

    def propd(head: PruneHead | None = None) -> ProPDDecoder:
        return ProPDDecoder(lm.model, pt, family, table, LatencyModel(prior), eos_token_ids=lm.eos_token_ids,
                            prune_head=head, start=start)

    decoders = {
        "plain": VanillaDecoder(lm.model, eos_token_ids=lm.eos_token_ids),
        "static": PPDDecoder(lm.model, pt, choice.chosen.tree_set, eos_token_ids=lm.eos_token_ids),
        "propd": propd(),
    }
    if prune_head is not None:
        decoders["pruned"] = propd(prune_head)
    return decoders, choice.chosen.slots
