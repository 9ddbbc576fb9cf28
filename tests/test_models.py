"""Model loading: the embedded default (via its safetensors cache), a tiny GGUF through the whole
de-quantise-and-cache path, Hugging Face directories, and the refusals."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from tests.helpers_models import make_tiny_llama, save_tiny_llama_dir, write_tiny_gguf
from workers import models
from workers.configs import ModelConfig
from workers.models import (
    DEFAULT_MODEL_ID,
    LoadedModel,
    default_gguf_path,
    encode_row,
    eos_token_ids_of,
    load_model,
    resolve_cache_dir,
)

SHORT_INPUT = torch.tensor([[1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]])


def last_logits(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids.to(loaded.device)).logits


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    # The session-wide cache ($PPD_CACHE_DIR or ~/.cache/ppd-batch): de-quantising takes ~30 s, once.
    return load_model(ModelConfig())


# --- the embedded default ----------------------------------------------------------------------------------


def test_default_model_identity(default_model: LoadedModel) -> None:
    assert default_model.model_id == DEFAULT_MODEL_ID
    gguf_bytes = default_gguf_path().read_bytes()
    assert default_model.content_hash == hashlib.sha256(gguf_bytes).hexdigest()
    assert default_model.device == torch.device("cpu")
    assert default_model.dtype == torch.float32
    assert default_model.max_context == 8192
    assert not default_model.model.training
    assert not any(p.requires_grad for p in default_model.model.parameters())
    assert all(p.dtype == torch.float32 for p in default_model.model.parameters())


def test_default_model_eos_includes_im_end(default_model: LoadedModel) -> None:
    im_end = default_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in default_model.eos_token_ids
    assert len(set(default_model.eos_token_ids)) == len(default_model.eos_token_ids)


def test_chat_encoding_ends_with_generation_prompt(default_model: LoadedModel) -> None:
    tokenizer = default_model.tokenizer
    ids = encode_row(tokenizer, messages=[{"role": "user", "content": "What is 2+2?"}])
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    generation_prompt = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[-len(generation_prompt) :] == generation_prompt
    assert "What is 2+2?" in tokenizer.decode(ids)


def test_prompt_encoding_is_plain_list(default_model: LoadedModel) -> None:
    ids = encode_row(default_model.tokenizer, prompt="Hello world")
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    assert default_model.tokenizer.decode(ids) == "Hello world"  # SmolLM2 defines no BOS to add


@pytest.mark.parametrize("kwargs", [{}, {"messages": [{"role": "user", "content": "x"}], "prompt": "x"}])
def test_encode_row_needs_exactly_one_input(default_model: LoadedModel, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        encode_row(default_model.tokenizer, **kwargs)


def test_default_cache_is_used_and_was_checked_against_gguf(default_model: LoadedModel) -> None:
    cache_dir = resolve_cache_dir(None)
    assert os.path.dirname(default_model.loaded_from) == str(cache_dir)
    marker = json.loads(Path(default_model.loaded_from, models.CACHE_MARKER_NAME).read_text())
    assert marker["source_sha256"] == default_model.content_hash
    assert len(marker["logits_equal_to_gguf_on"]) > 0  # the builder compared cache and GGUF logits exactly

    again = load_model(ModelConfig())
    assert again.loaded_from == default_model.loaded_from
    assert again.content_hash == default_model.content_hash
    assert torch.equal(last_logits(again, SHORT_INPUT), last_logits(default_model, SHORT_INPUT))


@pytest.mark.skipif(
    not os.environ.get("PPD_FULL_GGUF_CHECK"),
    reason="de-quantises the real GGUF again (15-40 s); set PPD_FULL_GGUF_CHECK=1 to run",
)
def test_default_cache_reproduces_gguf_logits(default_model: LoadedModel) -> None:
    gguf = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    with torch.no_grad():
        assert torch.equal(reference(SHORT_INPUT).logits, last_logits(default_model, SHORT_INPUT))


# --- a GGUF file given as a path (tiny, so the cache can be built in a temporary dir) ----------------------


def test_gguf_path_is_cached_then_reused(tmp_path, monkeypatch) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache_dir = tmp_path / "cache"
    # nn.Linear as it is, so that the logits can be compared bit for bit with transformers' own load below.
    cfg = ModelConfig(model=str(gguf), cache_dir=str(cache_dir), cpu_linear="torch")

    first = load_model(cfg)
    assert first.model_id == str(gguf.resolve())
    assert first.content_hash == hashlib.sha256(gguf.read_bytes()).hexdigest()
    entry = cache_dir / f"gguf-{first.content_hash[:16]}"
    assert first.loaded_from == str(entry)
    assert {"config.json", "model.safetensors", "generation_config.json", models.CACHE_MARKER_NAME} <= {
        p.name for p in entry.iterdir()
    }
    assert "quantization_config" not in (entry / "config.json").read_text()
    assert (cache_dir / models.HASH_INDEX_NAME).is_file()
    assert first.eos_token_ids == [2]

    # The second load neither re-hashes the file nor de-quantises again.
    def forbidden(*args, **kwargs):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(models, "_sha256_of_files", forbidden)
    monkeypatch.setattr(models, "_build_gguf_cache", forbidden)
    second = load_model(cfg)
    assert second.loaded_from == first.loaded_from
    input_ids = torch.tensor([[1, 40, 41, 42, 2]])
    assert torch.equal(last_logits(first, input_ids), last_logits(second, input_ids))

    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    with torch.no_grad():
        assert torch.equal(reference(input_ids).logits, last_logits(second, input_ids))
    chat = [{"role": "user", "content": "hi"}]
    assert encode_row(second.tokenizer, messages=chat)[-3:] == encode_row(first.tokenizer, messages=chat)[-3:]


def test_cache_that_changes_the_logits_is_refused(tmp_path, monkeypatch) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache_dir = tmp_path / "cache"
    write_dir = models._write_dequantised_dir

    def write_then_perturb(model, tokenizer, out_dir):
        with torch.no_grad():
            model.model.norm.weight[0] += 1e-3
        try:
            write_dir(model, tokenizer, out_dir)
        finally:
            with torch.no_grad():
                model.model.norm.weight[0] -= 1e-3

    monkeypatch.setattr(models, "_write_dequantised_dir", write_then_perturb)
    with pytest.raises(RuntimeError, match="does not reproduce the GGUF logits"):
        load_model(ModelConfig(model=str(gguf), cache_dir=str(cache_dir)))
    assert not [p for p in cache_dir.iterdir() if p.name.startswith("gguf-") or p.name.startswith(".tmp")]


def test_gguf_rewritten_in_place_gets_a_new_hash(tmp_path) -> None:
    gguf = tmp_path / "model.gguf"
    cache_dir = tmp_path / "cache"
    write_tiny_gguf(gguf, seed=0)
    first = load_model(ModelConfig(model=str(gguf), cache_dir=str(cache_dir)))
    write_tiny_gguf(gguf, seed=1)
    os.utime(gguf, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    second = load_model(ModelConfig(model=str(gguf), cache_dir=str(cache_dir)))
    assert second.content_hash == hashlib.sha256(gguf.read_bytes()).hexdigest() != first.content_hash
    assert second.loaded_from != first.loaded_from


def test_broken_cache_entry_is_rebuilt(tmp_path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cfg = ModelConfig(model=str(gguf), cache_dir=str(tmp_path / "cache"))
    first = load_model(cfg)
    os.remove(os.path.join(first.loaded_from, "model.safetensors"))
    second = load_model(cfg)
    assert second.loaded_from == first.loaded_from
    assert os.path.isfile(os.path.join(second.loaded_from, "model.safetensors"))


def test_concurrent_cache_builders_share_one_entry(tmp_path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache_dir = tmp_path / "cache"
    content_hash = hashlib.sha256(gguf.read_bytes()).hexdigest()
    # The second builder finds the entry taken when it renames its temp dir, and uses the winner's.
    winner = models._build_gguf_cache(gguf, cache_dir, content_hash)
    loser = models._build_gguf_cache(gguf, cache_dir, content_hash)
    assert winner == loser
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []


# --- Hugging Face directories ------------------------------------------------------------------------------


def test_hf_directory_loads(tmp_path, default_model: LoadedModel) -> None:
    tokenizer = default_model.tokenizer
    model_dir = save_tiny_llama_dir(tmp_path / "tiny-llama", tokenizer, seed=3)
    loaded = load_model(ModelConfig(model=str(model_dir), cache_dir=str(tmp_path / "cache")))
    assert loaded.model_id == str(model_dir.resolve())
    weights = sorted(model_dir.glob("*.safetensors"))
    assert loaded.content_hash == hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()
    assert loaded.eos_token_ids == [tokenizer.eos_token_id]
    assert loaded.max_context == 1024
    assert loaded.loaded_from == str(model_dir.resolve())
    expected = make_tiny_llama(vocab_size=len(tokenizer), seed=3, dtype=torch.float32)
    assert torch.equal(loaded.model.model.embed_tokens.weight, expected.model.embed_tokens.weight)
    assert encode_row(loaded.tokenizer, prompt="Hi") == encode_row(tokenizer, prompt="Hi")


def test_dtype_and_attention_options(tmp_path, default_model: LoadedModel) -> None:
    model_dir = save_tiny_llama_dir(tmp_path / "m", default_model.tokenizer)
    loaded = load_model(
        ModelConfig(model=str(model_dir), dtype="bfloat16", attn_implementation="eager", cache_dir=str(tmp_path))
    )
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "eager"


def test_directory_without_config_is_refused(tmp_path) -> None:
    # A name that looks like a model gets no special treatment: what is on disk decides.
    not_a_model = tmp_path / "Llama-3-8B-Instruct"
    not_a_model.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model(ModelConfig(model=str(not_a_model), cache_dir=str(tmp_path / "cache")))


def test_directory_without_safetensors_is_refused(tmp_path, default_model: LoadedModel) -> None:
    model_dir = save_tiny_llama_dir(tmp_path / "m", default_model.tokenizer)
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        load_model(ModelConfig(model=str(model_dir), cache_dir=str(tmp_path / "cache")))


# --- refusals ----------------------------------------------------------------------------------------------


def test_non_gguf_file_is_refused(tmp_path) -> None:
    fake = tmp_path / "llama-2-7b.Q4_0.gguf"
    fake.write_bytes(os.urandom(64).replace(b"GGUF", b"xxxx"))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(ModelConfig(model=str(fake), cache_dir=str(tmp_path / "cache")))


def test_missing_path_is_refused(tmp_path) -> None:
    missing = tmp_path / "llama" / "SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="SmolLM2-135M-Instruct"):
        load_model(ModelConfig(model=str(missing), cache_dir=str(tmp_path / "cache")))


def test_model_keyword_is_exact(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="Default"):
        load_model(ModelConfig(model="Default", cache_dir=str(tmp_path / "cache")))


# --- config and small helpers ------------------------------------------------------------------------------


def test_model_config_validation() -> None:
    assert ModelConfig().model == "default"
    with pytest.raises(ValidationError):
        ModelConfig(dtype="float64")
    with pytest.raises(ValidationError):
        ModelConfig(device="not-a-device")
    with pytest.raises(ValidationError):
        ModelConfig(attn_implementation="flash")
    with pytest.raises(ValidationError):
        ModelConfig(dtpye="float32")
    for name, field in ModelConfig.model_fields.items():
        assert field.description, name


def test_cache_dir_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PPD_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"
    monkeypatch.delenv("PPD_CACHE_DIR")
    assert resolve_cache_dir(None).name == "ppd-batch"


def test_eos_ids_merge_generation_config_and_tokenizer() -> None:
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 3, 7]))
    assert eos_token_ids_of(model, SimpleNamespace(eos_token_id=3)) == [7, 3]
    assert eos_token_ids_of(model, SimpleNamespace(eos_token_id=9)) == [7, 3, 9]
    single = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=5))
    assert eos_token_ids_of(single, SimpleNamespace(eos_token_id=None)) == [5]
    assert eos_token_ids_of(SimpleNamespace(), SimpleNamespace(eos_token_id=4)) == [4]


def test_token_list_normalisation() -> None:
    assert models._as_token_list({"input_ids": [1, 2]}) == [1, 2]
    assert models._as_token_list(torch.tensor([[3, 4]])) == [3, 4]
    assert models._as_token_list([[5, 6]]) == [5, 6]
    assert models._as_token_list([]) == []
    with pytest.raises(ValueError):
        models._as_token_list([[1], [2]])


def test_tiny_llama_is_deterministic_and_leaks_no_rng_state() -> None:
    state = torch.random.get_rng_state()
    a = make_tiny_llama(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = make_tiny_llama(seed=1)
    c = make_tiny_llama(seed=2)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        assert not torch.equal(a(ids).logits, c(ids).logits)
    assert a.dtype == torch.float64 and not a.training
