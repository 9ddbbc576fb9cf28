"""Prompt tokens learned from a job's own rows, on a worker: self-distillation from the current tokens, then the
gate that decides whether they are published.

Contract of ``adapt_prompt_tokens``: train from ``current`` on the training rows (``decoding.distill``), then
replay greedy PPD exactly over the held-back rows' text (``trees.acceptance``) for the current and the new tokens,
each on its own trees: a tree of 63 nodes and the tree the worker would use at its batch size, both built from
the acceptance table each version shows on the held-back rows. The replay covers each held-back row's first
``settings.gate_tokens`` output tokens: it is exactly the decoding of those rows at that token budget, at about
half the cost of whole 128-token rows (the gate's two passes over a row cost what two to three training rows do).
The new tokens pass the gate only when they give more tokens per step at 63 nodes and no fewer at the worker's
tree. Sampled rows are replayed the same way, as if their text were the greedy continuation: the replay then
measures how well the guesses match that text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from decoding.distill import fit_prompt_tokens
from decoding.prompt_tokens import PromptTokens
from decoding.tree import TreeSet
from trees.acceptance import ranks_at_every_cut, ranks_of_versions, replay_decoding
from trees.paths import fixed_size_tree_set
from workers.configs import AdaptationConfig

GATE_TREE_NODES = 63
MAX_RANK = 10  # the acceptance tables' columns: ranks 0..9 of each prompt token's guesses

Sequences = Sequence[tuple[Sequence[int], Sequence[int]]]  # (prompt ids, output ids)


@dataclass
class Replay:
    """Greedy PPD replayed over rows: tokens, steps, and the acceptance table measured on them."""

    tokens: int
    steps: int
    table: list[list[float]]

    @property
    def tau(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


@dataclass
class AdaptOutcome:
    prompt_tokens: PromptTokens  # the new tokens, their acceptance table in meta.extra
    passed: bool
    report: dict[str, Any] = field(default_factory=dict)


def rank_tables(model: nn.Module, prompt_tokens: PromptTokens, rows: Sequences) -> list[torch.Tensor]:
    """Each row's ranks at every cut, [R, k] (``trees.acceptance.ranks_at_every_cut``)."""
    return [ranks_at_every_cut(model, prompt_tokens, list(p), list(r), max_rank=MAX_RANK) for p, r in rows]


def acceptance_table(ranks: Sequence[torch.Tensor], k: int) -> list[list[float]]:
    """a[i][r] = P(the true token at distance i+2 is exactly rank r of prompt token i's guesses), over the cuts
    whose target lies inside the row. [k][MAX_RANK]."""
    counts = torch.zeros(k, MAX_RANK + 1, dtype=torch.float64)
    for r in ranks:
        R = r.shape[0]
        for i in range(k):
            inside = r[: max(R - i - 1, 0), i]  # cut j's target for token i is output index j + i + 1
            counts[i] += torch.bincount(inside, minlength=MAX_RANK + 1).double()
    total = counts.sum(1, keepdim=True).clamp(min=1)
    return (counts[:, :MAX_RANK] / total).tolist()


def replay(ranks: Sequence[torch.Tensor], rows: Sequences, tree_set: TreeSet, table: list[list[float]]) -> Replay:
    tokens = sum(len(r) for _, r in rows)
    steps = sum(replay_decoding(rk, tree_set, len(r)) for rk, (_, r) in zip(ranks, rows))
    return Replay(tokens, steps, table)


def adapt_prompt_tokens(model: nn.Module, current: PromptTokens, train: Sequences, held_out: Sequences,
                        settings: AdaptationConfig, worker_tree: Callable[[list[list[float]]], TreeSet],
                        *, on_step: Callable[[int, float], None] | None = None) -> AdaptOutcome:
    """Train, measure and gate (see the module docstring). ``worker_tree(table)``: the tree set the worker would
    decode with at its batch size, were that its prompt tokens' table. Raises TimeoutError past
    ``settings.timeout_s``."""
    started = time.monotonic()
    if not train or not held_out:
        raise ValueError(f"adaptation needs training and held-back rows, got {len(train)} and {len(held_out)}")
    trained = bool(current.meta.extra.get("training") or current.meta.extra.get("adaptation"))
    lr = settings.lr or (settings.lr_from_trained if trained else settings.lr_untrained)
    steps = settings.steps_for(len(train))
    new, losses = fit_prompt_tokens(model, current, train, steps=steps, samples_per_step=settings.samples_per_step,
                                    cuts_per_sample=settings.cuts_per_sample, lr=lr, seed=settings.seed,
                                    deadline=started + settings.timeout_s, on_step=on_step)
    train_seconds = time.monotonic() - started
    held_out = [(p, r[: settings.gate_tokens]) for p, r in held_out]
    with torch.no_grad():
        both = [ranks_of_versions(model, [current, new], list(p), list(r), max_rank=MAX_RANK) for p, r in held_out]
        versions = {}
        for v, (name, tokens) in enumerate((("before", current), ("after", new))):
            ranks = [row[v] for row in both]
            table = acceptance_table(ranks, tokens.k)
            versions[name] = {
                "tree_63": replay(ranks, held_out, fixed_size_tree_set(table, GATE_TREE_NODES, tokens.k), table),
                "worker_tree": replay(ranks, held_out, worker_tree(table), table),
            }
    before, after = versions["before"], versions["after"]
    passed = (after["tree_63"].tau > before["tree_63"].tau
              and after["worker_tree"].tau >= before["worker_tree"].tau)
    report = {
        "rows_learned": len(train), "rows_held_out": len(held_out),
        "gate_tokens": sum(len(r) for _, r in held_out), "steps": steps, "lr": lr,
        "final_loss": sum(losses[-8:]) / len(losses[-8:]), "first_loss": losses[0],
        "train_seconds": round(train_seconds, 2), "gate_seconds": round(time.monotonic() - started - train_seconds, 2),
        "tau_before": {name: round(r.tau, 4) for name, r in before.items()},
        "tau_after": {name: round(r.tau, 4) for name, r in after.items()},
        "replay_gain": {name: round(after[name].tau - before[name].tau, 4) for name in before},
        "passed": passed,
    }
    table = after["tree_63"].table
    new.meta = replace(new.meta, extra={
        "init": current.meta.extra.get("init", "mean_token_embedding"),
        "adaptation": {"settings": settings.model_dump(mode="json"), **report},
        "evaluation": {"all": {"cuts": sum(len(r) for _, r in held_out), "acceptance": table}},
        "acceptance": table,
    })
    return AdaptOutcome(new, passed, report)
