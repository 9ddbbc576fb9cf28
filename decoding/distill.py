"""Self-distillation of PPD prompt tokens: the student, the teacher and the loss, for one sequence at a time.

A sequence S (prompt + the base model's own greedy response) runs once through the frozen model with no
gradient: that gives the KV cache and the teacher. At a cut after position t, prompt token i (0-based) sits
at position t+1+i and must predict S[t+2+i], the token i+2 places after the last real token; the teacher is
the model's own distribution at position t+1+i (after its own greedy tokens). Many cuts share one student
forward: every cut's k prompt tokens (times n ensemble copies) are extra query slots over the cached KV,
each seeing S up to its cut and the earlier prompt tokens of its own chain and copy (the tree mask of
inference, with the prefix varying per slot). Gradients reach only the prompt-token embeddings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from decoding.batch import additive_from_visible, at_least_fp32, crop_cache, embedding_weight, new_cache
from decoding.prompt_tokens import PromptTokens


def valid_cuts(prompt_len: int, seq_len: int, k: int) -> torch.Tensor:
    """Cut positions t (index of the last visible token) whose k targets S[t+2 .. t+k+1] all exist.

    The first, t = prompt_len - 1, is the decoder's first step (guesses right after the prompt).
    """
    return torch.arange(prompt_len - 1, max(prompt_len - 1, seq_len - k - 1))


def cut_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's cuts in one epoch (index -1: the epoch's sample order)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63)


def draw_cuts(prompt_len: int, seq_len: int, k: int, count: int, g: torch.Generator) -> torch.Tensor:
    """At most ``count`` of the sequence's valid cuts, drawn without replacement by ``g``, in order."""
    cuts = valid_cuts(prompt_len, seq_len, k)
    if len(cuts) > count:
        cuts = cuts[torch.randperm(len(cuts), generator=g)[:count]].sort().values
    return cuts


def prefix_pass(model: PreTrainedModel, seq: torch.Tensor):
    """No-grad pass over the whole sequence [L]. Returns (KV cache, last hidden states [L, H])."""
    cache = new_cache(model)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=seq[None], cache=cache,
                                     use_cache=True).last_hidden_state[0]  # [L, H]
    return cache, hidden


def teacher_log_probs(model: PreTrainedModel, hidden: torch.Tensor, cuts: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher for prompt token i at cut t: log-softmax of the model at position t+1+i. [M, k, V]."""
    pos = cuts[:, None] + 1 + torch.arange(k, device=cuts.device)  # [M, k]
    with torch.no_grad():
        logits = model.get_output_embeddings()(hidden[pos.flatten()])  # [M*k, V]
    return F.log_softmax(at_least_fp32(logits), -1).view(len(cuts), k, -1)


def student_logits(model: PreTrainedModel, prompt_tokens: PromptTokens, cache, seq_len: int,
                   cuts: torch.Tensor) -> torch.Tensor:
    """Ensemble-averaged logits of every cut's prompt tokens, in one forward over the cached prefix. [M, k, V].

    ``cache`` holds the KV of the whole sequence (length ``seq_len``); it is cropped back afterwards.
    """
    k, n = prompt_tokens.k, prompt_tokens.n
    M, device = len(cuts), cuts.device
    dtype = embedding_weight(model).dtype
    # Slot order (cut m, token i, copy e).
    m_idx = torch.arange(M, device=device).repeat_interleave(k * n)  # [S]
    i_idx = torch.arange(k, device=device).repeat_interleave(n).repeat(M)  # [S]
    e_idx = torch.arange(n, device=device).repeat(M * k)  # [S]
    slot_cut = cuts[m_idx]  # [S]
    embeds = prompt_tokens.embeddings[i_idx, e_idx].to(dtype)  # [S, H]
    positions = slot_cut + 1 + i_idx  # [S]
    cols = torch.arange(seq_len, device=device)
    sees_prefix = cols[None, :] <= slot_cut[:, None]  # [S, L]
    sees_slots = ((m_idx[:, None] == m_idx[None, :]) & (e_idx[:, None] == e_idx[None, :])
                  & (i_idx[None, :] <= i_idx[:, None]))  # [S, S]: own chain and copy, up to itself
    visible = torch.cat([sees_prefix, sees_slots], 1)  # [S, L+S]
    mask = additive_from_visible(visible, dtype)  # [S, L+S]
    hidden = model.get_decoder()(inputs_embeds=embeds[None], attention_mask=mask[None, None],
                                 position_ids=positions[None], cache=cache,
                                 use_cache=True).last_hidden_state[0]  # [S, H]
    crop_cache(cache, seq_len)  # forget the slots' KV (and their graph)
    logits = at_least_fp32(model.get_output_embeddings()(hidden))  # [S, V]
    return logits.view(M, k, n, -1).mean(2)  # [M, k, V]


def distill_loss(student: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = 0.8) -> torch.Tensor:
    """(1/k) sum_i alpha^i KL(teacher_i || student_i), averaged over cuts. student logits, teacher log-probs:
    [M, k, V]."""
    k = student.shape[1]
    student_logp = F.log_softmax(student, -1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # [M, k]
    weights = alpha ** torch.arange(k, dtype=kl.dtype, device=kl.device)  # alpha^(i-1), 1-based i
    return (kl * weights).sum(-1).mean() / k


def guess_ranks(student: torch.Tensor, seq: torch.Tensor, cuts: torch.Tensor, max_rank: int = 10) -> torch.Tensor:
    """Rank of the true token S[t+2+i] among prompt token i's logits, capped at ``max_rank`` (= not in top
    max_rank). student [M, k, V] -> [M, k] long."""
    k = student.shape[1]
    target = seq[cuts[:, None] + 2 + torch.arange(k, device=seq.device)]  # [M, k]
    true_logit = student.gather(-1, target[..., None])  # [M, k, 1]
    rank = (student > true_logit).sum(-1)  # [M, k]: tokens strictly ahead of the true one
    return rank.clamp(max=max_rank)


def sequence_loss(model: PreTrainedModel, prompt_tokens: PromptTokens, seq: torch.Tensor, cuts: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """The distillation loss of one sequence [L] at these cuts [M]: the teacher's pass (no gradient), then one
    student pass over every cut. Gradients reach only ``prompt_tokens``."""
    cache, hidden = prefix_pass(model, seq)
    teacher = teacher_log_probs(model, hidden, cuts, prompt_tokens.k)
    return distill_loss(student_logits(model, prompt_tokens, cache, len(seq), cuts), teacher, alpha)


def fit_prompt_tokens(model: PreTrainedModel, start: PromptTokens,
                      sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                      *, steps: int, samples_per_step: int = 4, cuts_per_sample: int = 24, lr: float = 1e-2,
                      alpha: float = 0.8, seed: int = 0, deadline: float | None = None,
                      on_step: Callable[[int, float], None] | None = None) -> tuple[PromptTokens, list[float]]:
    """Prompt tokens trained from ``start`` by self-distillation on ``sequences`` (prompt ids, the model's output
    ids for them): ``steps`` AdamW steps of ``samples_per_step`` sequences each, taken in an order reshuffled
    every pass, with a cosine learning-rate decay to 0. ``start`` is left as it was.

    Deterministic for a seed: the order of each pass and the cuts of each sequence come from generators seeded by
    (seed, pass, sequence). Raises TimeoutError when a step ends after ``deadline`` (time.monotonic()) with steps
    left. Returns the trained tokens (fp32, on the model's device, ``start``'s metadata copied) and each step's
    loss; ``on_step(step, loss)`` is called after each."""
    if not sequences:
        raise ValueError("no sequences to learn from")
    device = embedding_weight(model).device
    pt = PromptTokens(start.embeddings.detach().to(device=device, dtype=torch.float32).clone(),
                      replace(start.meta, extra=dict(start.meta.extra)))
    opt = torch.optim.AdamW(pt.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    encoded = [torch.tensor(list(p) + list(r), dtype=torch.long, device=device) for p, r in sequences]
    prompt_lens = [len(p) for p, _ in sequences]
    orders: dict[int, list[int]] = {}  # pass -> its order (the current pass's only)
    losses: list[float] = []
    with torch.enable_grad():
        for step in range(steps):
            batch = []  # (pass, sequence index)
            for position in range(step * samples_per_step, (step + 1) * samples_per_step):
                epoch, at = divmod(position, len(encoded))
                if epoch not in orders:
                    orders = {epoch: torch.randperm(len(encoded), generator=cut_generator(seed, epoch, -1)).tolist()}
                batch.append((epoch, orders[epoch][at]))
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for epoch, index in batch:
                seq = encoded[index]
                cuts = draw_cuts(prompt_lens[index], len(seq), pt.k, cuts_per_sample,
                                 cut_generator(seed, epoch, index)).to(device)
                if len(cuts) == 0:
                    continue
                loss = sequence_loss(model, pt, seq, cuts, alpha) / len(batch)
                loss.backward()
                step_loss += loss.item()
            opt.step()
            sched.step()
            losses.append(step_loss)
            if on_step is not None:
                on_step(step + 1, step_loss)
            if deadline is not None and step + 1 < steps and time.monotonic() > deadline:
                raise TimeoutError(f"training stopped at its deadline after {step + 1} of {steps} steps")
    pt.embeddings.requires_grad_(False)
    return pt, losses
