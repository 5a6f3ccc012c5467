# Everything runs from .venv, made from the machine's python3 on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
FLEET  ?= demo

.PHONY: install run test lint bench clean

# `make install`: .venv with prefork installed (editable) and .venv/bin/prefork on hand.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

run: install
	$(BIN)/prefork run --fleet $(FLEET)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check prefork workers tests measurements

test: lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python measurements/bench_master.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
