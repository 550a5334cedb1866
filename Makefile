# refseg: `make demo` and `make test` each build .venv from nothing, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.refseg-installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup system-deps demo test test-slow lint format bench clean

setup: $(STAMP) system-deps

# Headless Chromium renders the HTML report in a test (Debian package; CI runs as root).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the report rendering test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# torch/torchvision first (from this machine's disk where present), then sam2 without
# build isolation (its setup imports torch), then refseg and its pinned dependencies.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch torchvision
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation -c constraints.txt sam2
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# Meta's DINOv2 reference code, test-only (a re-upload pinned to torch 2.0: no deps)
	$(PIP) install -q --no-deps dinov2==0.0.1.dev2
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	$(PY) -m pytest -q -m "not slow" --durations=15

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/refseg demo --out demo_out

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
