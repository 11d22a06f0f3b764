# Two set-up commands, both from a fresh clone:
#   make demo   install, then run the whole pipeline on the embedded demo
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch goes in first and pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo lint test bench clean

$(BIN)/tclora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/tclora

demo: install
	$(BIN)/tclora run --config configs/demo.yaml $(ARGS)

# Layering (import-linter contracts in pyproject.toml), ruff, and issue 15's 60-line cap on pipelines/ functions.
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python .ci/function_lengths.py pipelines --max 60

test: install
	$(BIN)/python -m pytest $(ARGS)

bench: install
	$(BIN)/python -m benchmarks.run_all $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
