"""Prompt-token artifacts: round trip, integrity and model checks, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from decoding.prompt_tokens import PromptTokens, PromptTokensMeta
from workers.artifacts import (
    METADATA_NAME,
    WEIGHTS_NAME,
    ArtifactCorrupt,
    ArtifactError,
    ArtifactModelMismatch,
    artifact_hash,
    load_prompt_tokens,
    save_prompt_tokens,
)

MODEL_HASH = "a" * 64
OTHER_MODEL_HASH = "b" * 64


def make_prompt_tokens(k: int = 3, n: int = 2, hidden: int = 8, seed: int = 0) -> PromptTokens:
    generator = torch.Generator().manual_seed(seed)
    meta = PromptTokensMeta(
        base_model_id="tiny/base",
        base_model_hash=MODEL_HASH,
        k=k,
        n=n,
        extra={"steps": 12, "acceptance": [[0.5, 0.25]]},
    )
    return PromptTokens(torch.randn(k, n, hidden, generator=generator), meta)


@pytest.fixture
def saved(tmp_path) -> tuple[Path, PromptTokens, str]:
    pt = make_prompt_tokens()
    path = tmp_path / "artifact"
    return path, pt, save_prompt_tokens(pt, path)


def test_round_trip(saved) -> None:
    path, pt, content_hash = saved
    assert sorted(p.name for p in path.iterdir()) == [METADATA_NAME, WEIGHTS_NAME]
    assert content_hash == hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert artifact_hash(path) == content_hash

    loaded = load_prompt_tokens(path, expect_model_hash=MODEL_HASH, device="cpu", dtype=torch.float32)
    assert torch.equal(loaded.embeddings, pt.embeddings)
    assert loaded.meta == pt.meta
    assert (loaded.k, loaded.n) == (3, 2)


def test_load_converts_dtype_and_skips_model_check_when_not_asked(saved) -> None:
    path, pt, _ = saved
    loaded = load_prompt_tokens(str(path), expect_model_hash=None, device=torch.device("cpu"), dtype=torch.float64)
    assert loaded.embeddings.dtype == torch.float64
    assert torch.equal(loaded.embeddings, pt.embeddings.double())


def test_saving_is_deterministic_and_replaces_an_earlier_artifact(saved) -> None:
    path, pt, content_hash = saved
    assert save_prompt_tokens(pt, path) == content_hash
    other = make_prompt_tokens(seed=1)
    other_hash = save_prompt_tokens(other, path)
    assert other_hash != content_hash
    assert artifact_hash(path) == other_hash
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp/trash left


def test_bfloat16_embeddings_are_stored_as_float32(tmp_path) -> None:
    pt = make_prompt_tokens()
    pt_bf16 = PromptTokens(pt.embeddings.detach().to(torch.bfloat16), pt.meta)
    save_prompt_tokens(pt_bf16, tmp_path / "a")
    loaded = load_prompt_tokens(tmp_path / "a", expect_model_hash=None)
    assert loaded.embeddings.dtype == torch.float32
    assert torch.equal(loaded.embeddings, pt_bf16.embeddings.float())


def test_refuses_to_overwrite_a_foreign_directory(tmp_path) -> None:
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a prompt-token artifact"):
        save_prompt_tokens(make_prompt_tokens(), target)
    assert (target / "notes.txt").read_text() == "mine"


def test_corrupted_safetensors_is_detected(saved) -> None:
    path, _, _ = saved
    weights = path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one embedding value
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        load_prompt_tokens(path, expect_model_hash=MODEL_HASH)
    with pytest.raises(ArtifactCorrupt):
        artifact_hash(path)


def test_model_mismatch_is_refused_naming_both_models(saved) -> None:
    path, _, _ = saved
    with pytest.raises(ArtifactModelMismatch) as info:
        load_prompt_tokens(path, expect_model_hash=OTHER_MODEL_HASH, expect_model_id="other/model")
    message = str(info.value)
    assert "tiny/base" in message and "other/model" in message
    assert MODEL_HASH[:16] in message and OTHER_MODEL_HASH[:16] in message
    assert isinstance(info.value, ValueError)


def test_hidden_size_mismatch_is_refused(saved) -> None:
    path, _, _ = saved
    with pytest.raises(ArtifactModelMismatch, match="hidden size"):
        load_prompt_tokens(path, expect_model_hash=MODEL_HASH, expect_hidden_size=16)


def test_missing_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_prompt_tokens(tmp_path / "nowhere", expect_model_hash=None)


@pytest.mark.parametrize("missing", [METADATA_NAME, WEIGHTS_NAME])
def test_missing_file(saved, missing: str) -> None:
    path, _, _ = saved
    (path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load_prompt_tokens(path, expect_model_hash=None)


def test_path_that_is_a_file(tmp_path) -> None:
    file_path = tmp_path / "prompt_tokens.safetensors"
    file_path.write_bytes(b"x")
    with pytest.raises(ArtifactError, match="must be a directory"):
        load_prompt_tokens(file_path, expect_model_hash=None)


def test_json_that_is_not_json(saved) -> None:
    path, _, _ = saved
    (path / METADATA_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_prompt_tokens(path, expect_model_hash=None)


def _edit_metadata(path: Path, edit) -> None:
    metadata = json.loads((path / METADATA_NAME).read_text())
    edit(metadata)
    (path / METADATA_NAME).write_text(json.dumps(metadata))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format="something-else"), "not ppd-prompt-tokens"),
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.pop("safetensors_sha256"), "lacks"),
        (lambda m: m["meta"].pop("base_model_hash"), "base_model_hash"),
        (lambda m: m["meta"].update(k=4), "k=4"),
        (lambda m: m.update(shape=[3, 2, 9]), "metadata records"),
    ],
)
def test_inconsistent_metadata(saved, edit, match: str) -> None:
    path, _, _ = saved
    _edit_metadata(path, edit)
    with pytest.raises(ArtifactError, match=match):
        load_prompt_tokens(path, expect_model_hash=None)


def test_unreadable_safetensors_with_matching_hash(saved) -> None:
    # Bytes that hash as recorded but are not a safetensors file: still a clear error.
    path, _, _ = saved
    garbage = b"definitely not safetensors"
    (path / WEIGHTS_NAME).write_bytes(garbage)
    _edit_metadata(path, lambda m: m.update(safetensors_sha256=hashlib.sha256(garbage).hexdigest()))
    with pytest.raises(ArtifactCorrupt, match="cannot read"):
        load_prompt_tokens(path, expect_model_hash=None)
