"""Saving and loading PPD prompt-token artifacts.

An artifact is a directory holding ``prompt_tokens.safetensors`` (one fp32 tensor "embeddings" [k, n, H])
and ``prompt_tokens.json`` (format version, the safetensors file's sha256, the tensor shape and the
PromptTokensMeta). The recorded sha256 is the artifact's identity: it is checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from decoding.prompt_tokens import PromptTokens, PromptTokensMeta

WEIGHTS_NAME = "prompt_tokens.safetensors"
METADATA_NAME = "prompt_tokens.json"
TENSOR_NAME = "embeddings"
FORMAT_NAME = "ppd-prompt-tokens"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A prompt-token artifact is malformed, inconsistent or unusable."""


class ArtifactCorrupt(ArtifactError):
    """The safetensors file does not match the hash recorded next to it, or cannot be read."""


class ArtifactModelMismatch(ArtifactError):
    """The prompt tokens were trained for a different base model than the one loaded."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_files(pt: PromptTokens) -> tuple[dict[str, bytes], str]:
    """The artifact's two files as bytes ({file name: content}; the weights first) and its hash (the sha256 of
    the safetensors file): what ``save_prompt_tokens`` writes, for a store that is not a local directory."""
    embeddings = pt.embeddings.detach().to(device="cpu", dtype=torch.float32).contiguous()
    weights = safetensors.torch.save({TENSOR_NAME: embeddings}, metadata={"format": "pt"})
    content_hash = hashlib.sha256(weights).hexdigest()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "safetensors_sha256": content_hash,
        "shape": list(embeddings.shape),
        "meta": pt.meta.to_json_dict(),
    }
    return {WEIGHTS_NAME: weights, METADATA_NAME: json.dumps(metadata, indent=1, sort_keys=True).encode()}, content_hash


def save_prompt_tokens(pt: PromptTokens, path: str | os.PathLike[str]) -> str:
    """Write the artifact directory ``path`` atomically (replacing an earlier artifact there) and return
    the sha256 of its safetensors file."""
    target = Path(path)
    if target.exists() and not _is_replaceable(target):
        raise ArtifactError(f"{str(target)!r} exists and is not a prompt-token artifact; refusing to replace it")
    files, content_hash = artifact_files(pt)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return content_hash


def prompt_tokens_from_files(files: dict[str, bytes], **checks: Any) -> tuple[PromptTokens, str]:
    """An artifact given as its files' bytes (``artifact_files``), loaded and checked as ``load_prompt_tokens``
    does (``checks`` are its keyword arguments); returns the prompt tokens and the artifact's hash."""
    if set(files) != {WEIGHTS_NAME, METADATA_NAME}:
        raise ArtifactError(f"a prompt-token artifact is {WEIGHTS_NAME} and {METADATA_NAME}, got {sorted(files)}")
    with tempfile.TemporaryDirectory(prefix="prompt-tokens-") as tmp:
        for name, content in files.items():
            (Path(tmp) / name).write_bytes(content)
        return load_prompt_tokens(tmp, **checks), artifact_hash(tmp)


def _is_replaceable(target: Path) -> bool:
    """Only an earlier artifact or an empty directory may be overwritten, never someone's other files."""
    if not target.is_dir():
        return False
    names = {entry.name for entry in target.iterdir()}
    return names <= {WEIGHTS_NAME, METADATA_NAME}


def _swap_into_place(new_dir: Path, target: Path) -> None:
    try:
        os.rename(new_dir, target)  # atomic when target is absent or an empty directory
        return
    except OSError:
        if not target.exists():
            raise
    # An earlier artifact is there: move it aside, put the new one in, drop the old one.
    trash = target.with_name(f".trash-{target.name}-{uuid.uuid4().hex[:8]}")
    os.rename(target, trash)
    try:
        os.rename(new_dir, target)
    except OSError:
        os.rename(trash, target)  # put the old artifact back rather than leave nothing
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _read_metadata(directory: Path) -> dict[str, Any]:
    metadata_path = directory / METADATA_NAME
    if not metadata_path.is_file():
        raise FileNotFoundError(f"prompt-token artifact {str(directory)!r} has no {METADATA_NAME}")
    try:
        metadata = json.loads(metadata_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{str(metadata_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{str(metadata_path)!r} is not {FORMAT_NAME} metadata")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{str(metadata_path)!r} has format version {metadata.get('format_version')!r}; "
            f"this code reads version {FORMAT_VERSION}"
        )
    if not isinstance(metadata.get("safetensors_sha256"), str) or not isinstance(metadata.get("meta"), dict):
        raise ArtifactError(f"{str(metadata_path)!r} lacks safetensors_sha256 or meta")
    return metadata


def _artifact_dir(path: str | os.PathLike[str]) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"prompt-token artifact {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise ArtifactError(f"prompt-token artifact {str(directory)!r} must be a directory")
    return directory


def artifact_hash(path: str | os.PathLike[str]) -> str:
    """The artifact's identity: the sha256 of its safetensors file, checked against the recorded one."""
    directory = _artifact_dir(path)
    metadata = _read_metadata(directory)
    return _verified_weights_hash(directory, metadata)


def _verified_weights_hash(directory: Path, metadata: dict[str, Any]) -> str:
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"prompt-token artifact {str(directory)!r} has no {WEIGHTS_NAME}")
    actual = _sha256_file(weights_path)
    if actual != metadata["safetensors_sha256"]:
        raise ArtifactCorrupt(
            f"{str(weights_path)!r} has sha256 {actual[:16]}… but {METADATA_NAME} records "
            f"{metadata['safetensors_sha256'][:16]}…: the file was changed or damaged"
        )
    return actual


def load_prompt_tokens(
    path: str | os.PathLike[str],
    *,
    expect_model_hash: str | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    expect_model_id: str | None = None,
    expect_hidden_size: int | None = None,
) -> PromptTokens:
    """Load and check an artifact. With ``expect_model_hash``, refuse (ArtifactModelMismatch) prompt tokens
    trained for another base model; ``expect_model_id`` only makes that message name the loaded model."""
    directory = _artifact_dir(path)
    metadata = _read_metadata(directory)
    try:
        meta = PromptTokensMeta.from_json_dict(metadata["meta"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ArtifactError(f"bad prompt-token metadata in {str(directory / METADATA_NAME)!r}: {exc}") from exc
    _verified_weights_hash(directory, metadata)

    if expect_model_hash is not None and meta.base_model_hash != expect_model_hash:
        loaded = f"{expect_model_id} " if expect_model_id else "a different model "
        raise ArtifactModelMismatch(
            f"prompt tokens at {str(directory)!r} were trained for {meta.base_model_id} "
            f"(weights sha256 {meta.base_model_hash[:16]}…), but the loaded model is {loaded}"
            f"(weights sha256 {expect_model_hash[:16]}…); train prompt tokens for this model"
        )

    weights_path = directory / WEIGHTS_NAME
    try:
        tensors = safetensors.torch.load_file(str(weights_path))
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise ArtifactCorrupt(f"cannot read {str(weights_path)!r}: {exc}") from exc
    if set(tensors) != {TENSOR_NAME}:
        raise ArtifactError(f"{str(weights_path)!r} holds {sorted(tensors)}, expected only {TENSOR_NAME!r}")
    embeddings = tensors[TENSOR_NAME]
    if embeddings.dim() != 3 or tuple(embeddings.shape[:2]) != (meta.k, meta.n):
        raise ArtifactError(
            f"{str(weights_path)!r} holds embeddings of shape {tuple(embeddings.shape)}, "
            f"but the metadata says k={meta.k}, n={meta.n} ([k, n, hidden] expected)"
        )
    if list(embeddings.shape) != metadata.get("shape"):
        raise ArtifactError(
            f"{str(weights_path)!r} holds shape {list(embeddings.shape)}, metadata records {metadata.get('shape')}"
        )
    if expect_hidden_size is not None and embeddings.shape[-1] != expect_hidden_size:
        raise ArtifactModelMismatch(
            f"prompt tokens at {str(directory)!r} have hidden size {embeddings.shape[-1]}, "
            f"the loaded model has {expect_hidden_size}"
        )
    return PromptTokens(embeddings.to(device=device, dtype=dtype), meta)


SHIPPED_DIR = Path(__file__).resolve().parents[1] / "artifacts" / "prompt_tokens"


def _shipped(shipped_dir: Path = SHIPPED_DIR):
    """(directory, metadata) of every readable artifact shipped in the repository, by name."""
    if not shipped_dir.is_dir():
        return
    for candidate in sorted(shipped_dir.iterdir()):
        try:
            yield candidate, _read_metadata(candidate)["meta"]
        except (OSError, ArtifactError):
            continue


def find_shipped_artifact(model_hash: str, shipped_dir: Path = SHIPPED_DIR) -> Path | None:
    """The artifact shipped in the repository for the model with this content hash, if there is one."""
    return next((candidate for candidate, meta in _shipped(shipped_dir)
                 if meta.get("base_model_hash") == model_hash), None)


def reference_acceptance_table(k: int) -> list[list[float]] | None:
    """The acceptance table of a shipped artifact with k prompt tokens: what trained prompt tokens typically
    reach, for planning before a model has its own (None when none is shipped)."""
    return next(((meta.get("extra") or {})["acceptance"] for _, meta in _shipped()
                 if meta.get("k") == k and (meta.get("extra") or {}).get("acceptance")), None)
