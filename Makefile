# Every target sets itself up from a fresh clone: it creates .venv and installs
# what it needs (stamps record what is installed, so reruns are quick).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# On a machine with an NVIDIA GPU, the bench installs JAX's CUDA build.
JAX_PIP ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'jax[cuda12]' || echo jax)

.PHONY: test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[test,examples,notebooks]'
	touch $@

$(VENV)/.bench: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[test,bench]' '$(JAX_PIP)'
	touch $@

test: $(VENV)/.test
	$(BIN)/python -m pytest -q lovasz_jax tests

demo: $(VENV)/.test
	$(BIN)/python -m examples.train $(ARGS)

bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
