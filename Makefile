# actcache: `make test` and `make extract` set everything up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The local torch CPU wheel (torch==2.13.0+cpu, which the lock pins and PyPI does not serve) lives here.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
PIP := $(PY) -m pip install --quiet --disable-pip-version-check $(FIND_LINKS)
# Every package of the environment at the version the suite is green with; pyproject.toml keeps the ranges.
LOCK := requirements.lock
UV := $(VENV)/bin/uv
UV_VERSION = $(shell sed -n 's/^uv==//p' $(LOCK))
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

MODEL ?= minilm-l6
DATA ?= sample
ARGS ?=
OUT ?= metrics-out
METRICS_ARGS ?=

.PHONY: install lock test unit integration check fmt extract metrics chaos bench clean

install: $(STAMP)

# uv installs the lock exactly (and removes anything else); torch==2.13.0+cpu comes from the local wheel.
# Bytecode is compiled at install (as pip does): imports then take 3 s, not 8, where PYTHONDONTWRITEBYTECODE is set.
$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) "uv==$(UV_VERSION)"
	$(UV) pip sync --quiet --compile-bytecode --python $(PY) $(FIND_LINKS) $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps --no-build-isolation -e .
	@if $(PY) -m pip list 2>/dev/null | grep -iE '^(nvidia-|triton)'; then \
		echo "error: CUDA packages ended up in $(VENV) (see above); torch must stay the CPU build" >&2; exit 1; fi
	touch $(STAMP)

# Resolve pyproject.toml's ranges afresh (torch pinned first, CPU build), then write every version to the lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) -c constraints.txt torch==2.13.0
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) -c constraints.txt \
		uv 'setuptools>=68' -e '.[test]'
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv
	@echo "$(LOCK) refreshed; run make test, then commit it"

test: install
	$(OFFLINE) $(PY) -m pytest -q $(PYTEST_ARGS)

unit: install
	$(OFFLINE) $(PY) -m pytest -q -m unit $(PYTEST_ARGS)

integration: install
	$(OFFLINE) $(PY) -m pytest -q -m integration $(PYTEST_ARGS)

check: install
	$(VENV)/bin/ruff format --check schemas cache pipeline metrics tests bench
	$(VENV)/bin/ruff check schemas cache pipeline metrics tests bench
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff format schemas cache pipeline metrics tests bench
	$(VENV)/bin/ruff check --fix schemas cache pipeline metrics tests bench

extract: install
	$(OFFLINE) $(VENV)/bin/actcache extract --model $(MODEL) --data $(DATA) $(ARGS)

# The metrics of the store `make extract` makes (extracting it first if it is not cached): OUT/report.html.
metrics: extract
	$(OFFLINE) $(VENV)/bin/actcache metrics --model $(MODEL) --data $(DATA) --out $(OUT) $(METRICS_ARGS)

bench: install
	$(OFFLINE) $(PY) bench/run.py $(ARGS)
	$(OFFLINE) $(PY) -m bench.scale --budget-s 1800 $(if $(findstring --quick,$(ARGS)),--quick,)
	$(OFFLINE) $(PY) -m bench.gpu $(if $(findstring --quick,$(ARGS)),--quick,)

chaos: install
	$(OFFLINE) $(PY) -m tests.chaos $(ARGS)

clean:
	rm -rf $(VENV) .lock-venv .pytest_cache .ruff_cache .mypy_cache
