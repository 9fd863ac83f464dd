# Every target sets itself up: a fresh machine needs only python3 (3.10+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: setup chromium test test-all demo lint format bench clean

setup: $(STAMP)

# torch first, pinned: a CPU build lies on disk; any other version would download gigabytes.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,all]'
	touch $(STAMP)

# Debian's chromium for the web-page test (Playwright drives /usr/bin/chromium; no browser download).
chromium:
	@test -x /usr/bin/chromium || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: setup chromium
	$(PY) -m pytest -q

test-all: setup chromium
	$(PY) -m pytest -q -m ''

demo: setup
	$(VENV)/bin/blip demo --out runs/demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks configs
	$(VENV)/bin/ruff format --check src tests benchmarks configs

format: setup
	$(VENV)/bin/ruff format src tests benchmarks configs

bench: setup
	$(PY) benchmarks/vs_transformers.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
