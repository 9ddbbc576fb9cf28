"""jobs/train/prompt_tokens.py end to end on a tiny random Llama: deterministic for a seed, a stopped run resumes to
the same result, the artifact loads for its model only, the loss falls, and evaluation reports sane tables."""

import json

import pytest
import torch

from jobs.train.prompt_tokens import TrainConfig, checkpoint_path, train
from workers.artifacts import ArtifactModelMismatch, load_prompt_tokens
from workers.configs import ModelConfig
from workers.models import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.helpers_models import save_tiny_llama_dir

    tokenizer = load_model(ModelConfig()).tokenizer
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny"), tokenizer, max_position_embeddings=512)


def config(tiny_dir, tmp_path, name, **overrides) -> TrainConfig:
    base = dict(
        model={"model": str(tiny_dir), "cache_dir": str(tmp_path / "cache")},
        data={"train_counts": {"chat": 3, "math": 3, "code": 2}, "eval_counts": {"chat": 1, "math": 1, "code": 1},
              "max_new_tokens": 24, "generate_batch_size": 8},
        output=str(tmp_path / name), epochs=2, cuts_per_sample=6, samples_per_step=2, checkpoint_every=1,
        eval_cuts_per_sample=8, threads=1, ensemble=2,
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_training_is_deterministic_and_resumes_exactly(tiny_dir, tmp_path):
    full = train(config(tiny_dir, tmp_path, "a"))
    train(config(tiny_dir, tmp_path, "b"))
    stopped = train(config(tiny_dir, tmp_path, "c", stop_after_steps=3))
    assert stopped.get("stopped") and stopped["steps"] == 3
    resumed = train(config(tiny_dir, tmp_path, "c"))
    lm = load_model(ModelConfig(model=str(tiny_dir), cache_dir=str(tmp_path / "cache")))
    a, b, c = (load_prompt_tokens(tmp_path / n, expect_model_hash=lm.content_hash) for n in "abc")
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.embeddings, c.embeddings)
    assert full["steps"] == resumed["steps"] == 8  # 8 samples / 2 per step * 2 epochs
    assert a.k == 3 and a.n == 2 and a.meta.base_model_hash == lm.content_hash

    losses = torch.load(checkpoint_path(tmp_path / "a"), weights_only=True)["losses"]
    assert sum(losses[-2:]) < sum(losses[:2])  # lr 1e-2 on a tiny model: the loss drops within 8 steps

    meta = json.loads((tmp_path / "a" / "prompt_tokens.json").read_text())["meta"]
    table = meta["extra"]["acceptance"]
    assert len(table) == 3 and all(len(row) == 10 for row in table)
    assert all(0 <= sum(row) <= 1 + 1e-9 for row in table)
    ev = meta["extra"]["evaluation"]["all"]
    assert all(t1 <= t5 <= t10 <= 1 for t1, t5, t10 in zip(ev["top1"], ev["top5"], ev["top10"]))
    assert meta["extra"]["data"]["train_samples"] == {"chat": 3, "math": 3, "code": 2}

    with pytest.raises(ArtifactModelMismatch):
        load_prompt_tokens(tmp_path / "a", expect_model_hash=load_model(ModelConfig()).content_hash)


def test_a_checkpoint_from_another_config_is_refused(tiny_dir, tmp_path):
    train(config(tiny_dir, tmp_path, "d", stop_after_steps=1))
    with pytest.raises(SystemExit, match="another training config"):
        train(config(tiny_dir, tmp_path, "d", lr=0.5))
