# `make test` and `make train` bootstrap .venv with a Python >= 3.12 found on this machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test train lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/find_python.sh
	@set -e; py=$$(bash scripts/find_python.sh); echo "using $$py"; \
	  [ -x $(PY) ] || $$py -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip; \
	  $(PY) -m pip install -q -e '.[test,notebooks]'; \
	  touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	@set -o pipefail; $(PY) -m pytest -n 2 --dist loadgroup -q tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

train: venv
	$(PY) train.py --config configs/tiny.yaml $(ARGS)

clean:
	rm -rf $(VENV)
