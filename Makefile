# raykd: the two commands a newcomer types are `make demo` and `make test` (see README.md).
# Both create the virtual environment and install everything first; nothing else is needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned, so pip takes the local CPU wheel instead of several GB of CUDA packages.
# constraints.txt pins every other package to the versions the suite was last run with (no resolver backtracking,
# the same environment in CI); refresh it with `.venv/bin/pip freeze --exclude-editable | grep -v -E "^torch=="`.
# On a GPU machine: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" ...
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: setup demo test bench-test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: setup
	$(BIN)/raykd demo --out $(DEMO_OUT)

test: setup
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench-test: setup
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -ra -m bench $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check raykd jobs tests bench

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
