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
    from workers.configs import ModelConfig
    from workers.models import load_model

    return load_model(ModelConfig()).tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_tokenizer):
    """A tiny random Llama with the default model's tokenizer, as a Hugging Face directory."""
    from tests.helpers_models import save_tiny_llama_dir

    return save_tiny_llama_dir(
        tmp_path_factory.mktemp("tiny-llama"), default_tokenizer, max_position_embeddings=TINY_MAX_CONTEXT
    )


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback (moto's server, on a free port), with buckets ``jobs-in`` and ``jobs-out``.
    Its endpoint and throwaway credentials are set in the standard AWS environment variables for the session,
    so pyarrow here and a driver subprocess reach it the way they would reach S3."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "moto-key-7f3a",
           "AWS_SECRET_ACCESS_KEY": "moto-secret-7f3a", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        for bucket in ("jobs-in", "jobs-out"):
            fs.create_dir(bucket)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
