"""jobs/train/prune_head.py end to end on a tiny random Llama, and the prune-head artifact: the trained head
ranks the model's argmax higher than the logit lens it starts from, the artifact round-trips, and it is refused
for another model or when its weights were altered."""

import json
from pathlib import Path

import pytest

from decoding import PPDDecoder, PromptTokens
from jobs.train.prune_head import PruneHeadConfig, train
from workers.artifacts import ArtifactCorrupt, ArtifactModelMismatch
from workers.configs import ModelConfig
from workers.models import load_model
from workers.prune_heads import find_shipped_prune_head, load_prune_head


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.helpers_models import save_tiny_llama_dir

    tmp = tmp_path_factory.mktemp("prune")
    tokenizer = load_model(ModelConfig()).tokenizer
    tiny = save_tiny_llama_dir(tmp / "tiny", tokenizer, max_position_embeddings=512, num_layers=3)
    cfg = PruneHeadConfig(
        model={"model": str(tiny), "cache_dir": str(tmp / "cache"), "device": "cpu"},
        data={"train_counts": {"chat": 6, "math": 6, "code": 6}, "eval_counts": {"chat": 2, "math": 2, "code": 2},
              "max_new_tokens": 16, "generate_batch_size": 8},
        output=str(tmp / "head"), layer=1, rank=16, epochs=10, tokens_per_step=64, lr=1e-2)
    result = train(cfg)
    return cfg, result


def test_training_beats_the_logit_lens(trained):
    """On the positions it trained on (a random tiny model has little to generalise from), the head ranks the
    model's argmax higher than the logit lens it started as; recall grows with K."""
    _, result = trained
    assert result["final_loss"] < result["first_epoch_loss"]
    assert result["train_recall"][1] > result["train_lens"][1] + 0.05
    for recall in (result["recall"], result["train_recall"]):
        assert all(a <= b for a, b in zip(list(recall.values()), list(recall.values())[1:]))


def test_artifact_round_trips_and_is_checked(trained, tmp_path):
    cfg, result = trained
    lm = load_model(cfg.model)
    head, meta = load_prune_head(cfg.output, expect_model_hash=lm.content_hash, dtype=lm.dtype)
    assert (head.layer, head.keep_top_k) == (1, result["keep_top_k"])
    assert meta["extra"]["evaluation"]["recall"]["1"] == pytest.approx(result["recall"][1])
    pt = PromptTokens.from_token_embeddings(lm.model, k=3, base_model_id="t", base_model_hash=lm.content_hash)
    PPDDecoder(lm.model, pt.to(lm.dtype), prune_head=head)  # fits the model it was trained for
    with pytest.raises(ArtifactModelMismatch):
        load_prune_head(cfg.output, expect_model_hash="0" * 64)
    assert find_shipped_prune_head(lm.content_hash) is None  # nothing shipped for a random tiny model
    (tmp_path / "copy").mkdir()
    for f in ("prune_head.json", "prune_head.safetensors"):
        data = (Path(cfg.output) / f).read_bytes()
        (tmp_path / "copy" / f).write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if f.endswith("safetensors") else data)
    with pytest.raises(ArtifactCorrupt):
        load_prune_head(tmp_path / "copy", expect_model_hash=lm.content_hash)
    assert json.loads((tmp_path / "copy" / "prune_head.json").read_text())["layer"] == 1
