# `make help` lists the targets. `make venv` (and every target that runs Python) bootstraps .venv
# with a Python >= 3.12 found on this machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra pytest arguments for `make test` / `make test-fast`, e.g. PYTEST_ARGS='-k scan'.
PYTEST_ARGS ?=
# Extra train.py overrides for `make train`, e.g. ARGS='train.steps=50'.
ARGS ?=
PYTEST := $(PY) -m pytest -n 2 --dist loadgroup -q
# What test-fast leaves out: tests marked slow, and the files whose tests train through train.py
# or several processes, compare sharded runs on 8-device meshes, run the Pallas kernels in
# interpret mode, or execute the notebooks (together most of the suite's time on 2 cores).
# `make test` runs everything; `make test PYTEST_ARGS=tests/test_pallas_kernels.py` one file.
FAST := -m 'not slow' --ignore=tests/test_notebooks.py --ignore=tests/test_multihost.py \
  --ignore=tests/test_checkpoint.py --ignore=tests/test_tasks.py --ignore=tests/test_sharding.py \
  --ignore=tests/test_scan_sharding.py --ignore=tests/test_pallas_kernels.py \
  --ignore=tests/test_pallas_tpu.py --ignore=tests/test_causal_conv.py

.DEFAULT_GOAL := help
.PHONY: help venv lint test test-fast train clean

help:
	@echo "make venv        create .venv (Python >= 3.12) and install mamba-jax with its test and notebook extras"
	@echo "make train       train configs/tiny.yaml (1.5 minutes on 2 idle CPU cores); ARGS='train.steps=50' adds overrides"
	@echo "make test        lint (ruff) and the whole test suite; both are reported, and either failing fails"
	@echo "make test-fast   lint and the suite without its slowest tests (about 6 minutes on 2 cores)"
	@echo "                 both take PYTEST_ARGS, e.g. make test PYTEST_ARGS='-k scan'"
	@echo "make lint        ruff check and ruff format --check"
	@echo "make clean       remove .venv"
	@echo "After 'make venv', 'source .venv/bin/activate' makes 'python' the venv's Python (see README.md)."

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/find_python.sh
	@set -e; py=$$(bash scripts/find_python.sh); \
	  echo "creating $(VENV) with $$py and installing mamba-jax[test,notebooks] into it (a few minutes, once)"; \
	  [ -x $(PY) ] || $$py -m venv $(VENV); \
	  if ! ( $(PY) -m pip install --upgrade pip && $(PY) -m pip install -e '.[test,notebooks]' ) \
	      > $(VENV)/install.log 2>&1; then \
	    tail -n 30 $(VENV)/install.log; echo "pip failed: the whole log is $(VENV)/install.log" >&2; exit 1; \
	  fi; \
	  touch $(STAMP); echo "done: run 'source $(VENV)/bin/activate' to use it in this shell"

# Both checks run, whatever the first one says; the status is theirs.
lint: venv
	@rc=0; $(VENV)/bin/ruff check . || rc=1; $(VENV)/bin/ruff format --check . || rc=1; exit $$rc

# Lint and tests both run and are both reported; the exit status is non-zero if either failed.
# pytest's status 5 (no tests collected, e.g. a -k that matches nothing) counts as a failure.
define lint_and_test
	@lint=0; tests=0; \
	  $(MAKE) --no-print-directory lint || lint=$$?; \
	  $(PYTEST) $(1) $(PYTEST_ARGS) || tests=$$?; \
	  echo; \
	  if [ $$lint -eq 0 ]; then echo "lint:  passed"; else echo "lint:  FAILED (ruff's report is above)"; fi; \
	  if [ $$tests -eq 0 ]; then echo "tests: passed"; \
	  elif [ $$tests -eq 5 ]; then echo "tests: FAILED (no tests collected)"; \
	  else echo "tests: FAILED (pytest exit status $$tests)"; fi; \
	  [ $$lint -eq 0 ] && [ $$tests -eq 0 ]
endef

test: venv
	$(call lint_and_test,)

test-fast: venv
	$(call lint_and_test,$(FAST))

train: venv
	$(PY) train.py --config configs/tiny.yaml $(ARGS)

clean:
	rm -rf $(VENV)
