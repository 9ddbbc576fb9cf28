"""Lossless on the real default model (SmolLM2-135M-Instruct, fp32 on CPU): both decoders, one ragged batch,
token for token equal to transformers' greedy `generate` run row by row, EOS included."""

import pytest
import torch

from decoding import FinishReason, PPDDecoder, PromptTokens, VanillaDecoder, chain_tree_set, default_tree_set
from trees.paths import fixed_size_tree_set
from workers.artifacts import find_shipped_artifact, load_prompt_tokens
from workers.configs import ModelConfig
from workers.models import encode_row, load_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Natalia sold 48 clips in April and half as many in May. How many clips did she sell altogether?",
    "Say hi.",
    "List three colours of the rainbow.",
]
MAX_NEW = 40


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def prompts_and_expected(loaded):
    prompts = [encode_row(loaded.tokenizer, messages=[{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts.append(encode_row(loaded.tokenizer, prompt="The quick brown fox"))  # raw text, no template
    expected = []
    for p in prompts:
        with torch.inference_mode():
            out = loaded.model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                        max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=loaded.eos_token_ids,
                                        pad_token_id=loaded.eos_token_ids[0], top_k=None, top_p=None,
                                        temperature=None)
        expected.append(out[0, len(p):].tolist())
    return prompts, expected


def test_expected_outputs_exercise_eos_and_length(loaded, prompts_and_expected):
    _, expected = prompts_and_expected
    ends = [e[-1] in loaded.eos_token_ids for e in expected]
    assert any(ends) and not all(ends)  # some rows stop on EOS, some on the length limit


@pytest.mark.parametrize("decoder", ["vanilla", "ppd-default", "ppd-chain-ensemble", "ppd-shipped-31"])
def test_decoders_equal_generate_on_the_default_model(loaded, prompts_and_expected, decoder):
    prompts, expected = prompts_and_expected
    model, eos = loaded.model, loaded.eos_token_ids
    if decoder == "vanilla":
        dec = VanillaDecoder(model, eos_token_ids=eos)
    elif decoder == "ppd-shipped-31":  # the trained artifact: real acceptance, deep accepted paths
        shipped = find_shipped_artifact(loaded.content_hash)
        assert shipped is not None, "the repository ships prompt tokens for the default model"
        pt = load_prompt_tokens(shipped, expect_model_hash=loaded.content_hash)
        dec = PPDDecoder(model, pt, fixed_size_tree_set(pt.meta.extra["acceptance"], 31, pt.k), eos_token_ids=eos)
    else:
        n, trees = (1, default_tree_set(3)) if decoder == "ppd-default" else (2, chain_tree_set(3))
        pt = PromptTokens.from_token_embeddings(model, k=3, n=n, base_model_id=loaded.model_id,
                                                base_model_hash=loaded.content_hash,
                                                generator=torch.Generator().manual_seed(0))
        dec = PPDDecoder(model, pt, trees, eos_token_ids=eos)
    results = dec.generate(prompts, MAX_NEW)
    assert [r.token_ids for r in results] == expected
    if decoder == "ppd-shipped-31":  # trained guesses are accepted: several tokens per step
        assert sum(r.num_tokens for r in results) / sum(r.num_steps for r in results) > 1.5
    for r in results:
        stopped = r.token_ids[-1] in eos
        assert r.finish_reason == (FinishReason.STOP if stopped else FinishReason.LENGTH)
