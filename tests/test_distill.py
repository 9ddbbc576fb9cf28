"""Distillation pieces: the many-cuts student pass equals one plain pass per cut; the teacher, loss and ranks."""

import pytest
import torch

from decoding import PromptTokens
from decoding.distill import (
    distill_loss,
    guess_ranks,
    prefix_pass,
    student_logits,
    teacher_log_probs,
    valid_cuts,
)
from tests.helpers_models import make_tiny_llama

K = 3


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(vocab_size=64, hidden_size=32, seed=2)


def test_valid_cuts_leave_room_for_every_target():
    cuts = valid_cuts(prompt_len=4, seq_len=12, k=3)
    assert cuts.tolist() == [3, 4, 5, 6, 7]  # the last target t+k+1 stays <= 11
    assert valid_cuts(prompt_len=4, seq_len=6, k=3).numel() == 0


@pytest.mark.parametrize("n", [1, 2])
def test_student_pass_equals_one_plain_pass_per_cut(model, n):
    g = torch.Generator().manual_seed(0)
    pt = PromptTokens.from_token_embeddings(model, k=K, n=n, base_model_id="t", base_model_hash="0", generator=g)
    pt.embeddings.data += 0.3 * torch.randn(pt.embeddings.shape, generator=g, dtype=pt.embeddings.dtype)
    seq = torch.randint(0, 64, (14,), generator=g)
    cuts = torch.tensor([3, 6, 9])
    cache, _ = prefix_pass(model, seq)
    with torch.no_grad():
        got = student_logits(model, pt, cache, len(seq), cuts)  # [M, k, V]
    assert cache.get_seq_length() == len(seq)  # the slots' KV is gone again
    embed = model.get_input_embeddings()
    for m, t in enumerate(cuts.tolist()):
        for i in range(K):
            per_copy = []
            for e in range(n):
                chain = torch.cat([embed(seq[: t + 1]), pt.embeddings[: i + 1, e]])  # prefix, own chain
                with torch.no_grad():
                    per_copy.append(model(inputs_embeds=chain[None]).logits[0, -1])
            torch.testing.assert_close(got[m, i], torch.stack(per_copy).mean(0), rtol=0, atol=1e-9)


def test_teacher_is_the_model_after_its_own_tokens(model):
    seq = torch.randint(0, 64, (10,), generator=torch.Generator().manual_seed(1))
    _, hidden = prefix_pass(model, seq)
    cuts = torch.tensor([2, 5])
    teacher = teacher_log_probs(model, hidden, cuts, K)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=seq[None]).logits[0], -1)
    for m, t in enumerate(cuts.tolist()):
        for i in range(K):
            torch.testing.assert_close(teacher[m, i], full[t + 1 + i], rtol=0, atol=1e-9)


def test_loss_is_zero_at_the_teacher_and_weights_by_distance():
    teacher = torch.log_softmax(torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0)), -1)
    assert distill_loss(teacher.clone(), teacher).abs() < 1e-6
    off = teacher.clone()
    off[:, 2] = 0.0  # a uniform student for the third prompt token only
    kl = (teacher[:, 2].exp() * (teacher[:, 2] - torch.log_softmax(off[:, 2], -1))).sum(-1).mean()
    torch.testing.assert_close(distill_loss(off, teacher, alpha=0.5), kl * 0.25 / 3)
    assert distill_loss(off, teacher, alpha=0.5) < distill_loss(off, teacher, alpha=1.0)


def test_guess_ranks():
    student = torch.tensor([[[0.0, 5.0, 1.0, 3.0]]])  # one cut, one prompt token, vocab 4
    seq = torch.tensor([0, 0, 3])  # target S[t+2] with t=0 is token 3: one token (1) ranks above it
    assert guess_ranks(student, seq, torch.tensor([0])).tolist() == [[1]]
    assert guess_ranks(student, torch.tensor([0, 0, 0]), torch.tensor([0]), max_rank=2).tolist() == [[2]]
