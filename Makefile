# Every target sets itself up: a fresh machine needs only python3 (3.10+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo lint format bench clean

setup: $(STAMP)

# torch first, pinned: a CPU build lies on disk; any other version would download gigabytes.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,eval]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

demo: setup
	$(VENV)/bin/blip demo --out runs/demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks

bench: setup
	$(PY) benchmarks/vs_transformers.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
