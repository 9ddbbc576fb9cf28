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

import torch
import torch.nn.functional as F
from torch import nn

from decoding.batch import additive_from_visible, at_least_fp32, crop_cache, new_cache
from decoding.prompt_tokens import PromptTokens


def valid_cuts(prompt_len: int, seq_len: int, k: int) -> torch.Tensor:
    """Cut positions t (index of the last visible token) whose k targets S[t+2 .. t+k+1] all exist.

    The first, t = prompt_len - 1, is the decoder's first step (guesses right after the prompt).
    """
    return torch.arange(prompt_len - 1, max(prompt_len - 1, seq_len - k - 1))


def prefix_pass(model: nn.Module, seq: torch.Tensor):
    """No-grad pass over the whole sequence [L]. Returns (KV cache, last hidden states [L, H])."""
    cache = new_cache(model)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=seq[None], cache=cache,
                                     use_cache=True).last_hidden_state[0]  # [L, H]
    return cache, hidden


def teacher_log_probs(model: nn.Module, hidden: torch.Tensor, cuts: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher for prompt token i at cut t: log-softmax of the model at position t+1+i. [M, k, V]."""
    pos = cuts[:, None] + 1 + torch.arange(k, device=cuts.device)  # [M, k]
    with torch.no_grad():
        logits = model.get_output_embeddings()(hidden[pos.flatten()])  # [M*k, V]
    return F.log_softmax(at_least_fp32(logits), -1).view(len(cuts), k, -1)


def student_logits(model: nn.Module, prompt_tokens: PromptTokens, cache, seq_len: int,
                   cuts: torch.Tensor) -> torch.Tensor:
    """Ensemble-averaged logits of every cut's prompt tokens, in one forward over the cached prefix. [M, k, V].

    ``cache`` holds the KV of the whole sequence (length ``seq_len``); it is cropped back afterwards.
    """
    k, n = prompt_tokens.k, prompt_tokens.n
    M, device = len(cuts), cuts.device
    dtype = model.get_input_embeddings().weight.dtype
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
