# `make demo` and `make test` set everything up on a fresh machine: a .venv with torch 2.13.0
# installed first (so no dependency can pull another torch), then this package with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.openspeed-installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-fast lint clean-runs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/openspeed train examples/qwen2_5_vl/shapes_demo.yaml

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest

# The unit tier (no multi-process or end-to-end runs): under two minutes on 2 cores.
test-fast: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check openspeed tests

clean-runs:
	rm -rf runs
