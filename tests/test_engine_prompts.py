"""Which prompt tokens and tree the engine picks: shipped artifact by model hash, explicit, untrained, tree size."""

import pytest

from tests.helpers_models import save_trained_artifact, tiny_loaded_model
from workers.artifacts import find_shipped_artifact
from workers.configs import DecodingConfig
from workers.engine import DecodeEngine


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model()


def test_auto_without_a_shipped_artifact_is_untrained(loaded):
    engine = DecodeEngine(loaded, DecodingConfig())
    assert engine.describe()["prompts"] == "untrained"
    with pytest.raises(ValueError, match="acceptance table"):
        DecodeEngine(loaded, DecodingConfig(tree_nodes=10))


def test_explicit_artifact_and_fixed_tree_size(loaded, tmp_path):
    path = save_trained_artifact(loaded, tmp_path / "pt")
    engine = DecodeEngine(loaded, DecodingConfig(prompts=str(path), tree_nodes=7))
    tree = engine.decoder.tree_set.trees[3]
    assert len(tree.paths) == 7 and set(tree.prompt_counts) == {3}
    assert engine.describe()["tree_hash"] == engine.decoder.tree_set.tree_hash


def test_shipped_artifacts_are_found_by_model_hash(loaded, tmp_path):
    save_trained_artifact(loaded, tmp_path / "a-other", model_hash="otherhash")
    mine = save_trained_artifact(loaded, tmp_path / "b-mine")
    assert find_shipped_artifact("tinyhash", tmp_path) == mine
    assert find_shipped_artifact("nohash", tmp_path) is None
    assert find_shipped_artifact("tinyhash", tmp_path / "missing") is None
