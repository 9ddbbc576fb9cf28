"""Which prompt tokens and tree the engine picks: shipped artifact by model hash, explicit, untrained, tree size."""

import pytest
import torch

from decoding import PromptTokens
from tests.helpers_models import make_tiny_llama
from workers.artifacts import find_shipped_artifact, save_prompt_tokens
from workers.engine import DecodeEngine, DecodingConfig
from workers.models import LoadedModel


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def loaded():
    model = make_tiny_llama(vocab_size=64, hidden_size=32, dtype=torch.float32)
    return LoadedModel(model=model, tokenizer=_Tok(), model_id="tiny", content_hash="tinyhash", eos_token_ids=[1],
                       device=torch.device("cpu"), dtype=torch.float32, max_context=256)


def trained_artifact(loaded, path, model_hash="tinyhash"):
    pt = PromptTokens.from_token_embeddings(loaded.model, k=3, base_model_id="tiny", base_model_hash=model_hash)
    pt.meta.extra["acceptance"] = [[0.5, 0.2, 0.1] + [0.01] * 7, [0.4, 0.2, 0.05] + [0.01] * 7,
                                   [0.3, 0.1, 0.1] + [0.01] * 7]
    save_prompt_tokens(pt, path)
    return path


def test_auto_without_a_shipped_artifact_is_untrained(loaded):
    engine = DecodeEngine(loaded, DecodingConfig())
    assert engine.describe()["prompts"] == "untrained"
    with pytest.raises(ValueError, match="acceptance table"):
        DecodeEngine(loaded, DecodingConfig(tree_nodes=10))


def test_explicit_artifact_and_fixed_tree_size(loaded, tmp_path):
    path = trained_artifact(loaded, tmp_path / "pt")
    engine = DecodeEngine(loaded, DecodingConfig(prompts=str(path), tree_nodes=7))
    tree = engine.decoder.tree_set.trees[3]
    assert len(tree.paths) == 7 and set(tree.prompt_counts) == {3}
    assert engine.describe()["tree_hash"] == engine.decoder.tree_set.tree_hash


def test_shipped_artifacts_are_found_by_model_hash(loaded, tmp_path):
    trained_artifact(loaded, tmp_path / "a-other", model_hash="otherhash")
    mine = trained_artifact(loaded, tmp_path / "b-mine")
    assert find_shipped_artifact("tinyhash", tmp_path) == mine
    assert find_shipped_artifact("nohash", tmp_path) is None
    assert find_shipped_artifact("tinyhash", tmp_path / "missing") is None
