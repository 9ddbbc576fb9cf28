"""Saving, loading and finding early-pruning head artifacts (decoding/pruning.py's PruneHead).

An artifact is a directory holding ``prune_head.safetensors`` (fp32 "down.weight" [r, H] and "up.weight"
[H, r]) and ``prune_head.json``: format and version, the safetensors file's sha256 (checked on every load),
the base model's id and weights hash (a head fits only that model), the layer it reads, its rank, the
default keep_top_k, and its training and held-out evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from decoding.pruning import PruneHead
from workers.artifacts import ArtifactCorrupt, ArtifactError, ArtifactModelMismatch, _sha256_file

WEIGHTS_NAME = "prune_head.safetensors"
METADATA_NAME = "prune_head.json"
FORMAT_NAME = "ppd-prune-head"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "artifacts" / "prune_heads"


def save_prune_head(head: PruneHead, path: str | os.PathLike[str], *, base_model_id: str, base_model_hash: str,
                    extra: dict[str, Any] | None = None) -> str:
    """Write the artifact directory ``path`` (replacing an earlier prune-head artifact there); returns the
    safetensors file's sha256."""
    target = Path(path)
    if target.exists() and not (target / METADATA_NAME).exists():
        raise ArtifactError(f"{str(target)!r} exists and is not a prune-head artifact; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        tensors = {name: p.detach().to(device="cpu", dtype=torch.float32).contiguous()
                   for name, p in head.state_dict().items()}
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_NAME))
        digest = _sha256_file(tmp / WEIGHTS_NAME)
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "sha256": digest,
                "base_model_id": base_model_id, "base_model_hash": base_model_hash, "layer": head.layer,
                "rank": head.down.weight.shape[0], "hidden_size": head.down.weight.shape[1],
                "keep_top_k": head.keep_top_k, "extra": extra or {}}
        (tmp / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return digest


def read_prune_head_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    directory = Path(path)
    try:
        meta = json.loads((directory / METADATA_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{str(directory)!r} is not a readable prune-head artifact: {exc}") from exc
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{str(directory)!r}: unknown format {meta.get('format')!r} v{meta.get('version')}")
    return meta


def load_prune_head(path: str | os.PathLike[str], *, expect_model_hash: str, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, keep_top_k: int | None = None) -> tuple[PruneHead, dict]:
    """The head (frozen, on ``device`` in ``dtype``) and its metadata. Refuses a head made for another model
    and a weights file that does not match its recorded hash. ``keep_top_k`` overrides the artifact's."""
    directory = Path(path)
    meta = read_prune_head_metadata(directory)
    if meta["base_model_hash"] != expect_model_hash:
        raise ArtifactModelMismatch(f"prune head {str(directory)!r} was trained for model "
                                    f"{meta['base_model_hash'][:16]}, the loaded model is {expect_model_hash[:16]}")
    if _sha256_file(directory / WEIGHTS_NAME) != meta["sha256"]:
        raise ArtifactCorrupt(f"{directory / WEIGHTS_NAME}: contents do not match the recorded sha256")
    head = PruneHead(int(meta["hidden_size"]), int(meta["layer"]), rank=int(meta["rank"]),
                     keep_top_k=int(keep_top_k or meta["keep_top_k"]))
    head.load_state_dict(safetensors.torch.load_file(str(directory / WEIGHTS_NAME)))
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False), meta


def find_shipped_prune_head(model_hash: str, shipped_dir: Path = SHIPPED_DIR) -> Path | None:
    """The shipped head trained for this model, if any (matched by the weights hash, never by name)."""
    if not shipped_dir.is_dir():
        return None
    for candidate in sorted(p for p in shipped_dir.iterdir() if (p / METADATA_NAME).exists()):
        try:
            if read_prune_head_metadata(candidate)["base_model_hash"] == model_hash:
                return candidate
        except ArtifactError:
            continue
    return None
