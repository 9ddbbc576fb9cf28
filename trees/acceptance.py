"""Acceptance measured on known greedy continuations: the rank of the true token in every prompt token's
guesses at every position, and an exact replay of greedy PPD decoding from those ranks.

Greedy PPD is lossless, so decoding a prompt walks through the model's own greedy continuation S; the
guesses a step verifies are those of the prompt tokens attached to the previous step's deepest accepted
node, which see exactly S up to that node. One teacher-forced pass (``decoding.distill``) therefore gives,
for every cut c (index of the last visible token), the rank of S[c+2+i] among prompt token i's logits, and
replaying the tree walk over those ranks reproduces the decoder's steps, hence its tau, without running the
tree forwards. (Up to rounding: the tree pass and the teacher-forced pass multiply in different shapes.)
"""

from __future__ import annotations

import torch

from decoding.distill import guess_ranks, prefix_pass, student_logits
from decoding.prompt_tokens import PromptTokens
from decoding.tree import TreeSet


@torch.no_grad()
def ranks_at_every_cut(model, prompt_tokens: PromptTokens, prompt_ids: list[int], response_ids: list[int],
                       max_rank: int = 10, chunk: int = 128) -> torch.Tensor:
    """[R, k] long for cuts c = P-1 .. P+R-2 (R = len(response)): the rank of S[c+2+i] under prompt token i,
    ``max_rank`` when it is not in the top ``max_rank`` or lies past the end of S."""
    return ranks_of_versions(model, [prompt_tokens], prompt_ids, response_ids, max_rank, chunk)[0]


@torch.no_grad()
def ranks_of_versions(model, versions: list[PromptTokens], prompt_ids: list[int], response_ids: list[int],
                      max_rank: int = 10, chunk: int = 128) -> list[torch.Tensor]:
    """``ranks_at_every_cut`` for several versions of prompt tokens (the same k), over one teacher-forced pass."""
    k = versions[0].k
    seq = torch.tensor(prompt_ids + response_ids, dtype=torch.long, device=model.get_input_embeddings().weight.device)
    P, R = len(prompt_ids), len(response_ids)
    cache, _ = prefix_pass(model, seq)
    padded = torch.cat([seq, seq.new_zeros(k + 1)])  # targets past the end: ranked, then marked missing
    out: list[list[torch.Tensor]] = [[] for _ in versions]
    for start in range(P - 1, P - 1 + R, chunk):
        cuts = torch.arange(start, min(start + chunk, P - 1 + R), device=seq.device)
        past_end = cuts[:, None] + 2 + torch.arange(k, device=seq.device) >= len(seq)  # [M, k]
        for ranks, prompt_tokens in zip(out, versions):
            logits = student_logits(model, prompt_tokens, cache, len(seq), cuts)  # crops the cache back
            ranks.append(guess_ranks(logits, padded, cuts, max_rank).masked_fill(past_end, max_rank))
    return [torch.cat(ranks).cpu() for ranks in out]


def replay_decoding(ranks: torch.Tensor, tree_set: TreeSet, num_tokens: int) -> int:
    """Steps greedy PPD takes to emit ``num_tokens`` tokens of the continuation, from ``ranks_at_every_cut``.

    Step 1 (the prefill) emits one token in state 0. After a step whose deepest accepted node sits at cut c
    in state s, the next step's tree is ``tree_set.trees[s]``, its candidate at depth d holds the rank-r
    guess for S[c+1+d], and it emits (accepted depth + 1) tokens.
    """
    if num_tokens <= 0:
        return 0
    table = ranks.tolist()
    counts = [dict(zip(((),) + t.paths, t.prompt_counts)) for t in tree_set.trees]
    steps, emitted = 1, 1
    cut, state = 0, counts[0][()]  # cut index relative to P-1
    while emitted < num_tokens:
        tree = counts[state]
        node: tuple[int, ...] = ()
        for depth in range(state):
            child = node + (table[cut][depth],)
            if child not in tree:
                break
            node = child
        steps += 1
        emitted += len(node) + 1
        cut += len(node) + 1
        state = tree[node]
    return steps
