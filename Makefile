# The README's two commands: `make run` (install + main job) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch===2.13.0 (exact, no local label) is the registry wheel everywhere; see constraints.txt.
STAMP := $(VENV)/.installed
MAIN_CONFIG ?= experiments/moe_s.yaml

.PHONY: install run test lint format

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 $(PY) -m src.cli fit --config $(MAIN_CONFIG)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src evaluation tests benchmarks
	$(PY) -m ruff format --check src evaluation tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format src evaluation tests benchmarks
