# Both targets work on a fresh machine with only python3: they create .venv, install torch first
# (TORCH_SPEC, default torch==2.13.0: the CPU wheel on this machine's disk), then tandem with its extras.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.tandem-installed
PYTEST_ARGS ?=

.PHONY: demo test install bench lint clean-venv

demo: $(STAMP)
	$(BIN)/tandem run

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	touch $(STAMP)

bench: $(STAMP)
	$(BIN)/tandem bench all $(if $(QUICK),--quick,)

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
