# Every target sets itself up from a fresh clone: it creates .venv and installs
# what it needs (stamps record what is installed, so reruns are quick).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[test,examples,notebooks]'
	touch $@

$(VENV)/.bench: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[test,bench]'
	touch $@

test: $(VENV)/.test
	$(BIN)/python -m pytest -q lovasz_jax tests

demo: $(VENV)/.test
	$(BIN)/python -m examples.train $(ARGS)

bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
