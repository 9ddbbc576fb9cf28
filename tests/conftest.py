"""Shared fixtures: a local Ray for the job tests (started once per module that asks for it)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray with 2 CPUs (never an already running cluster), shut down after the module."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


TINY_MAX_CONTEXT = 256


@pytest.fixture(scope="session")
def default_tokenizer():
    from workers.models import ModelConfig, load_model

    return load_model(ModelConfig()).tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_tokenizer):
    """A tiny random Llama with the default model's tokenizer, as a Hugging Face directory."""
    from tests.helpers_models import save_tiny_llama_dir

    return save_tiny_llama_dir(
        tmp_path_factory.mktemp("tiny-llama"), default_tokenizer, max_position_embeddings=TINY_MAX_CONTEXT
    )
