"""How well prompt tokens guess: the draws of cut points shared by training and evaluation, and the held-out
accuracy of an artifact (top-1/5/10 per distance, and the acceptance table the tree search reads)."""

from __future__ import annotations

import hashlib

import torch

from decoding import PromptTokens
from decoding.distill import cut_generator, guess_ranks, prefix_pass, student_logits
from decoding.distill import draw_cuts as draw_sequence_cuts
from jobs.train.data import Sample
from workers.models import LoadedModel

sample_generator = cut_generator


def draw_cuts(sample: Sample, k: int, count: int, g: torch.Generator) -> torch.Tensor:
    return draw_sequence_cuts(len(sample.prompt_ids), len(sample.prompt_ids) + len(sample.response_ids), k, count, g)


def sequence(sample: Sample, device) -> torch.Tensor:
    return torch.tensor(sample.prompt_ids + sample.response_ids, dtype=torch.long, device=device)


@torch.no_grad()
def evaluate(lm: LoadedModel, pt: PromptTokens, samples: list[Sample], cuts_per_sample: int,
             max_rank: int = 10) -> dict:
    """Per kind: top-1/5/10 accuracy per distance and the acceptance table a[i][r] (rank r exactly)."""
    by_kind: dict[str, torch.Tensor] = {}
    for s in samples:
        # Seeded by the sample's id, not its place in the list: any caller draws the same held-out cuts.
        id_seed = int(hashlib.sha256(s.id.encode()).hexdigest()[:15], 16)
        cuts = draw_cuts(s, pt.k, cuts_per_sample, sample_generator(12345, 0, id_seed)).to(lm.device)
        if len(cuts) == 0:
            continue
        seq = sequence(s, lm.device)
        cache, _ = prefix_pass(lm.model, seq)
        ranks = guess_ranks(student_logits(lm.model, pt, cache, len(seq), cuts), seq, cuts, max_rank)  # [M, k]
        counts = torch.stack([torch.bincount(ranks[:, i].cpu(), minlength=max_rank + 1) for i in range(pt.k)])
        for kind in (s.kind, "all"):
            by_kind[kind] = by_kind.get(kind, 0) + counts  # [k, max_rank+1]
    report = {}
    for kind, counts in by_kind.items():
        total = counts.sum(1, keepdim=True).clamp(min=1)
        table = (counts[:, :max_rank] / total).tolist()  # [k, max_rank]: P(rank == r)
        cumulative = (counts[:, :max_rank].cumsum(1) / total)
        report[kind] = {
            "cuts": int(counts[0].sum()),
            "acceptance": table,
            "top1": cumulative[:, 0].tolist(), "top5": cumulative[:, 4].tolist(), "top10": cumulative[:, 9].tolist(),
        }
    return report
