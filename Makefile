# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment in .venv first (once; again when setup.cfg changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip prints a warning per empty local index folder; hide those lines, keep its exit code.
QUIET := { grep -v "is ignored" || true; }
# torch and torchvision are pinned as a pair: open_clip needs torchvision, and mismatched pairs fail to import.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC) 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q -e '.[test,metrics,scale]' 2>&1 | $(QUIET)
	$(BIN)/python -c "import clipposter, torch, torchvision, open_clip"
	touch $@

demo: setup
	$(BIN)/clipposter demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python scripts/bench/embed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
