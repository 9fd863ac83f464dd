# Every target sets itself up: a fresh machine needs only python3 (3.10+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: setup chromium test test-all demo lint format bench bench-blip2 bench-gpu clean

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

# BLIP-2 rows: blip2-opt-2.7b shapes in bf16, built once under runs/bench/ (7.7 GB); BENCH_BLIP2_ARGS=--layers 4 for
# the reduced-depth variant with the real widths.
bench: setup
	$(PY) benchmarks/vs_transformers.py
	$(PY) benchmarks/blip2_vs_transformers.py $(BENCH_BLIP2_ARGS)

bench-blip2: setup
	$(PY) benchmarks/blip2_vs_transformers.py $(BENCH_BLIP2_ARGS)

# Every GPU row (issues 17 and 18) in one run, under 8 minutes on one H200: one table, runs/bench/gpu.json. Needs only
# PyTorch with CUDA and this checkout (no setup: a GPU machine has its own torch); rows whose package is missing
# (transformers; fastapi, uvicorn, httpx) are reported as skipped. BENCH_GPU_ARGS=--smoke: tiny models on the CPU.
BENCH_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
bench-gpu:
	PYTHONPATH=src $(BENCH_PY) benchmarks/gpu.py $(BENCH_GPU_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
