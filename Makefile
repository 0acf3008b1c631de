# One install path for developers, CI and docker: torch pinned to the CPU build that lies on local disk.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: venv dev demo test lint bench clean

$(BIN)/stm-feedback:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[fast]"  # OpenVINO: the fastest CPU backend (docs/performance.md)

venv: $(BIN)/stm-feedback

$(VENV)/.dev: $(BIN)/stm-feedback
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

dev: $(VENV)/.dev

demo: venv
	$(BIN)/stm-feedback demo --out demo-out

test: dev
	$(BIN)/python -m pytest

lint: dev
	$(BIN)/ruff check .

bench: venv
	$(BIN)/stm-feedback bench

clean:
	rm -rf $(VENV) demo-out .pytest_cache
