# Two commands do everything on a fresh machine:
#   make demo   creates .venv, installs, starts the server and a demo training run
#   make test   creates .venv, installs, runs lint, type checks and the whole test suite

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The browser tests drive Debian's Chromium through its own chromedriver (versions match).
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck pytest install browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch is pinned to 2.13.0 in the dev extra: that CPU build is what the tests use.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

$(CHROMEDRIVER):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

browser: $(CHROMEDRIVER)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: lint typecheck pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# agent/ server/ dashboard/ migrations/ install as one package, trimtab; mypy sees that layout
# through a tree of symlinks.
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/trimtab
	for f in agent/*; do ln -s ../../../$$f build/typecheck/trimtab/; done
	for d in server dashboard migrations; do ln -s ../../../$$d build/typecheck/trimtab/$$d; done
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p trimtab
	MYPYPATH=build/typecheck $(VENV)/bin/mypy tests benchmarks scripts examples

pytest: $(STAMP) $(CHROMEDRIVER)
	$(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
