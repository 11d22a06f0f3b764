# Two set-up commands, both from a fresh clone:
#   make demo   install, then run the whole pipeline on the embedded demo
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch goes in first and pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo lint test bench clean

# DeepSpeed compiles its CPU communication op (shm_comm) the first time an engine starts, and again for
# every new environment path: 36 s of the first demo's train stage on 2 cores. Built here, at install,
# as DeepSpeed documents for pre-built ops (DS_BUILD_<OP>=1, torch already installed); same version
# range as pyproject.toml. Without a C++ compiler that build fails: DeepSpeed is then installed as usual.
# The rest goes through uv, which downloads in parallel: 19 s against ~3 min for pip with a cold cache (torch and
# DeepSpeed already in, which it keeps). Its resolution may differ from pip's where both are valid (here:
# python-dateutil 4 with pytablewriter 0.38 for lm-eval, where pip picks 2.9 with 1.2); CI tests uv's.
# --compile-bytecode: uv leaves .pyc to the first import (pip compiles them at install), and with PYTHONDONTWRITEBYTECODE
# set (as on our CI machines) no import ever writes them: every Ray worker then compiled pandas, ray.data and
# transformers from source (import ray.data 5.4 s against 1.6 s) and the suite took 2,149 s instead of ~800.
$(BIN)/tclora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) ninja setuptools uv  # setuptools: python -m venv on 3.12+ has none
	DS_BUILD_SHM_COMM=1 DS_ENABLE_NINJA=1 $(BIN)/pip install -q --no-build-isolation --no-cache-dir "deepspeed>=0.16" \
	  || { echo "pre-building DeepSpeed's shm_comm op failed: installing DeepSpeed without it"; \
	       $(BIN)/pip install -q "deepspeed>=0.16"; }
	$(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -e ".[dev]" \
	  || { echo "uv could not install the rest (uv reads UV_INDEX_URL, not pip's config): using pip"; \
	       $(BIN)/pip install -q -e ".[dev]"; }
	touch $@

install: $(BIN)/tclora

demo: install
	$(BIN)/tclora run --config configs/demo.yaml $(ARGS)

# Layering (import-linter contracts in pyproject.toml), ruff, and issue 15's 60-line cap on pipelines/ functions.
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python .ci/function_lengths.py pipelines --max 60

# Two pytest workers (pytest-xdist), each with its own local Ray, one unit of work per worker at a time: a test
# file, or the two files that start Ray clusters of their own (tests/conftest.py), so a module's fixtures stay in
# one process. Ray files are queued first and --no-loadscope-reorder keeps that order (xdist would otherwise
# start with the files holding the most tests). Serial, the suite kept 2 cores ~75% busy: the Ray tests wait
# on process start-ups, polls and sleeps, which the other worker fills.
# TEST_WORKERS=0 runs it in one process, as plain pytest. (Two two-worker runs hung on 2026-12-02 in Ray's
# Train-to-Tune report forwarding, a race that load makes likelier and users could hit too: pipelines/train.py,
# _reports_to_tune.)
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

bench: install
	$(BIN)/python -m benchmarks.run_all $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
