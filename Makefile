# refseg: `make demo` and `make test` each build .venv from nothing, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.refseg-installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup browser demo test test-slow lint format bench clean

# Python only: no root, no system packages, no browser (`make demo` needs nothing else).
setup: $(STAMP)

# Headless Chromium renders the HTML report in one test (tests/test_report.py). Installed
# from Debian where that works (root and apt-get); elsewhere this says how and that test
# is skipped, unless REFSEG_REQUIRE_BROWSER=1 (set by .ci/run): then a missing browser fails.
CHROMIUM_HINT := install it (Debian/Ubuntu: sudo apt-get install chromium; macOS: brew \
  install --cask chromium) or set REFSEG_CHROMIUM to a Chromium or Chrome binary
browser:
	@if [ -n "$$REFSEG_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 \
	  || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the report rendering test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	  || { echo "apt-get could not install chromium: $(CHROMIUM_HINT)" >&2; \
	       [ "$$REFSEG_REQUIRE_BROWSER" != 1 ]; }; \
	elif [ "$$REFSEG_REQUIRE_BROWSER" = 1 ]; then \
	  echo "error: REFSEG_REQUIRE_BROWSER=1 but there is no Chromium and no root apt-get to" \
	    "install it: $(CHROMIUM_HINT)" >&2; exit 1; \
	else \
	  echo "note: no Chromium found, so the report's rendering test will be skipped; to run" \
	    "it, $(CHROMIUM_HINT)"; \
	fi

# The install steps live in deploy/install.sh, which the Dockerfile runs too (one order:
# torch/torchvision first, from this machine's disk where present; sam2 without build
# isolation; then refseg and its pinned dependencies).
$(STAMP): pyproject.toml constraints.txt deploy/install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	sh deploy/install.sh $(PIP) --dev --editable
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup browser lint
	$(PY) -m pytest -q -m "not slow" --durations=15

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/refseg demo --out demo_out

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
