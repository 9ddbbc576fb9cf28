"""Small, deterministic models for tests: a random tiny Llama (in memory or saved as an HF directory), a
tiny random Llama written as a GGUF file (to exercise the GGUF de-quantise-and-cache path in seconds), and a
tiny Llama wrapped as a `LoadedModel` with a prompt-token artifact that carries an acceptance table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_tiny_llama(
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    **config_overrides: Any,
) -> LlamaForCausalLM:
    """A random LlamaForCausalLM in eval mode with gradients off (like ``load_model``'s). Weights come from
    a generator seeded with ``seed`` and are scaled so logits are O(1): distributions are peaked enough
    that greedy choices are not near-ties."""
    config_kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    config_kwargs.update(config_overrides)
    config = LlamaConfig(**config_kwargs)
    # The constructor's own init draws from the global RNG: fork it so no global state leaks out.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    _reinit_from_generator(model, seed)
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model


def _reinit_from_generator(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() == 1:  # RMSNorm gains: around 1 so activations keep their scale
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:  # Linear [out, in]: unit-variance outputs for unit-variance inputs
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)


def save_tiny_llama_dir(
    path: str | Path, tokenizer: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32, **model_kwargs: Any
) -> Path:
    """Save a tiny random Llama whose vocabulary matches ``tokenizer`` (plus the tokenizer) as a Hugging Face
    directory that ``workers.models.load_model`` accepts."""
    path = Path(path)
    eos_token_id = tokenizer.eos_token_id
    model = make_tiny_llama(
        vocab_size=len(tokenizer),
        seed=seed,
        dtype=dtype,
        eos_token_id=eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **model_kwargs,
    )
    model.generation_config.eos_token_id = eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -----------------------------------------------------------------------------------------------------------
# Tiny GGUF

TINY_GGUF_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_GGUF_MERGES = ["h i", "Ġ t", "Ġt h", "Ġth e"]  # an empty merge list is dropped by the writer
TINY_GGUF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tiny_gguf(
    path: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 1,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """A random Llama in a GGUF file with F32 tensors and a byte-level BPE tokenizer of 3 special tokens,
    the 256 byte symbols and a few merges: enough for transformers to load model and tokenizer from it."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    path = Path(path)
    tokens = TINY_GGUF_SPECIAL_TOKENS + sorted(ByteLevel.alphabet()) + ["".join(m.split()) for m in TINY_GGUF_MERGES]
    vocab_size = len(tokens)
    intermediate_size = 2 * hidden_size
    head_dim = hidden_size // num_heads
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden_size)
    writer.add_feed_forward_length(intermediate_size)
    writer.add_block_count(num_layers)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(TINY_GGUF_SPECIAL_TOKENS) + [1] * (vocab_size - len(TINY_GGUF_SPECIAL_TOKENS)))
    writer.add_token_merges(TINY_GGUF_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_GGUF_CHAT_TEMPLATE)

    def random(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / shape[-1] ** 0.5).astype(np.float32)

    # numpy shapes are torch's [out, in]; the writer stores them in GGUF's reversed order
    writer.add_tensor("token_embd.weight", random(vocab_size, hidden_size))
    writer.add_tensor("output_norm.weight", np.ones(hidden_size, dtype=np.float32))
    for layer in range(num_layers):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(hidden_size, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(hidden_size, dtype=np.float32))
        writer.add_tensor(prefix + "attn_q.weight", random(hidden_size, hidden_size))
        writer.add_tensor(prefix + "attn_k.weight", random(num_kv_heads * head_dim, hidden_size))
        writer.add_tensor(prefix + "attn_v.weight", random(num_kv_heads * head_dim, hidden_size))
        writer.add_tensor(prefix + "attn_output.weight", random(hidden_size, hidden_size))
        writer.add_tensor(prefix + "ffn_gate.weight", random(intermediate_size, hidden_size))
        writer.add_tensor(prefix + "ffn_up.weight", random(intermediate_size, hidden_size))
        writer.add_tensor(prefix + "ffn_down.weight", random(hidden_size, intermediate_size))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class StubTokenizer:
    """Decodes ids as their numbers; enough for engine tests that never encode text."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tiny_loaded_model(content_hash: str = "tinyhash"):
    """A fp32 tiny Llama as `workers.models.LoadedModel` (CPU, EOS id 1, context 256)."""
    from workers.models import LoadedModel

    model = make_tiny_llama(vocab_size=64, hidden_size=32, dtype=torch.float32)
    return LoadedModel(model=model, tokenizer=StubTokenizer(), model_id="tiny", content_hash=content_hash,
                       eos_token_ids=[1], device=torch.device("cpu"), dtype=torch.float32, max_context=256)


def save_trained_artifact(loaded, path: Path, model_hash: str = "tinyhash") -> Path:
    """Untrained k=3 prompt tokens saved as an artifact with a made-up acceptance table (as training writes)."""
    from decoding import PromptTokens
    from workers.artifacts import save_prompt_tokens

    pt = PromptTokens.from_token_embeddings(loaded.model, k=3, base_model_id="tiny", base_model_hash=model_hash)
    pt.meta.extra["acceptance"] = [[0.5, 0.2, 0.1] + [0.01] * 7, [0.4, 0.2, 0.05] + [0.01] * 7,
                                   [0.3, 0.1, 0.1] + [0.01] * 7]
    save_prompt_tokens(pt, path)
    return path
