# actcache: `make test` and `make extract` set everything up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The local torch CPU wheel lives here on our machines; harmless where the folder is absent.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
PIP := $(PY) -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) -c constraints.txt
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

MODEL ?= minilm-l6
DATA ?= sample
ARGS ?=

.PHONY: install test unit integration check fmt extract chaos bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	@if $(PY) -m pip list 2>/dev/null | grep -iE '^(nvidia-|triton)'; then \
		echo "error: CUDA packages ended up in $(VENV) (see above); torch must stay the CPU build" >&2; exit 1; fi
	touch $(STAMP)

test: install
	$(OFFLINE) $(PY) -m pytest -q $(PYTEST_ARGS)

unit: install
	$(OFFLINE) $(PY) -m pytest -q -m unit $(PYTEST_ARGS)

integration: install
	$(OFFLINE) $(PY) -m pytest -q -m integration $(PYTEST_ARGS)

check: install
	$(VENV)/bin/ruff format --check schemas cache pipeline tests bench
	$(VENV)/bin/ruff check schemas cache pipeline tests bench
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff format schemas cache pipeline tests bench
	$(VENV)/bin/ruff check --fix schemas cache pipeline tests bench

extract: install
	$(OFFLINE) $(VENV)/bin/actcache extract --model $(MODEL) --data $(DATA) $(ARGS)

bench: install
	$(OFFLINE) $(PY) bench/run.py $(ARGS)

chaos: install
	$(OFFLINE) $(PY) -m tests.chaos $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
