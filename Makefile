# Everything runs from .venv, made from the machine's python3 on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
FLEET  ?= cpu

.PHONY: install run demo-data feed test lint bench bench-offload bench-dask measure \
	measure-reload hosting clean

# `make install`: .venv with prefork installed (editable), with the cpu extra that the
# bundled cpu fleet needs and the metrics extra (`--metrics`), and .venv/bin/prefork on hand.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[cpu,metrics]'
	touch $@

# One pip run for everything the tests need (a second run for the test extra cost a
# fresh clone ~4 s more); it makes `install`'s stamp too.
$(VENV)/.installed-test: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[cpu,metrics,test]'
	touch $(VENV)/.installed $@

# The cpu fleet's database ($$PREFORK_DB, else ~/.local/share/prefork/cpu.sqlite3) is
# filled with a generated data set on first use.
run: install $(if $(filter cpu,$(FLEET)),demo-data)
	$(BIN)/prefork run --fleet $(FLEET)

demo-data: install
	$(BIN)/python -m prefork_workers.cpu generate --if-empty

# New observations while the fleet runs (in a second terminal), so the workers react.
feed: install
	$(BIN)/python -m prefork_workers.cpu feed

lint: $(VENV)/.installed-test
	$(BIN)/ruff check prefork workers tests measurements systemd

# Bytecode first: where PYTHONDONTWRITEBYTECODE is set (as on our machines), every
# interpreter a test starts compiled prefork's modules again, ~55 ms a start.
test: lint
	$(BIN)/python -m compileall -q prefork workers tests > /dev/null
	$(BIN)/python -m pytest

# The metrics cases (measurements/metrics-bench.md) run the exporter: `install` has
# prometheus-client (the metrics extra).
bench: install
	$(BIN)/python measurements/bench_master.py
	$(BIN)/python measurements/bench_kernels.py

# What a run_kernel call costs inline, in the kernel pool and on Dask (a scheduler and a
# worker on 127.0.0.1); needs the dask extra. About a minute. Writes
# measurements/offload-bench.md and offload-bench.json.
bench-offload: $(VENV)/.installed-test
	$(BIN)/python measurements/bench_offload.py

# Memory of the cpu fleet (8 workers) under prefork, against a baseline of fresh
# interpreters and gunicorn --preload, on each of Python 3.11-3.13 that pyenv has (venvs in
# .venv-measure/); about 16 minutes. RUNS=n repeats everything (n times as long), medians.
# Writes measurements/memory.md, memory.json and memory.png; then measure-reload.
measure: install
	$(BIN)/python measurements/measure.py $(if $(RUNS),--runs $(RUNS))
	$(BIN)/python measurements/reload.py $(if $(RUNS),--runs $(RUNS))

# Fleet PSS of the cpu fleet before, during (trial, exec, rolling) and after two code
# reloads (`prefork reload`), and whether anything of the old generation is left. About
# 3 minutes; RUNS=n runs it n times (default 3). Writes measurements/reload.md and reload.json.
measure-reload: install
	$(BIN)/python measurements/reload.py $(if $(RUNS),--runs $(RUNS))

# The cpu fleet hosted three ways on the same generated data (one process per worker, a
# group with a kernel pool, one process with a forkserver pool): memory, catch-up time,
# CPU against wall time. About 3 minutes; RUNS=n runs each n times (default 3).
# Writes measurements/hosting.md and hosting.json.
hosting: install
	$(BIN)/python measurements/hosting.py $(if $(RUNS),--runs $(RUNS))

# Dask workers forked by `prefork dask-worker` against Dask's own `dask worker` (a nanny
# that spawns each worker), on the cpu fleet's floor: private memory per worker and time
# until N workers are connected, against a scheduler on 127.0.0.1. About a minute; RUNS=n
# runs each n times (default 3). Writes measurements/dask-bench.md and dask-bench.json.
bench-dask: $(VENV)/.installed-test
	$(BIN)/python measurements/bench_dask.py $(if $(RUNS),--runs $(RUNS))

clean:
	rm -rf $(VENV) .venv-measure .pytest_cache .ruff_cache *.egg-info
