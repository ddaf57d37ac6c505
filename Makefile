# Two commands need no prior set-up: `make demo` and `make test`. Both first run
# tools/setup_env.py, which builds .venv/ on the first call and is a no-op afterwards.
PYTHON ?= python3
VENV_PY := .venv/bin/python
# OpenMP threads that sleep instead of spinning while waiting: on a shared 2-core machine the
# default spinning made training 5-12x slower whenever another process was running
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY

.PHONY: setup demo test test-fast test-upstream lint

setup:
	@$(PYTHON) tools/setup_env.py

demo: setup
	$(VENV_PY) tools/run_pipeline.py --output output/pipeline

# Test files run side by side, one per core (pytest-xdist; a file's tests stay together, so a
# module's fixtures, e.g. its SLURM cluster, are built once): TEST_WORKERS=0 runs them in-process.
# Files come in conftest.py's order (end-to-end ones first), not by their number of tests.
TEST_WORKERS ?= auto
TEST_PAR := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: setup
	$(VENV_PY) -m pytest $(TEST_PAR)

# The unit and contract tests alone (no end-to-end runs): the loop while developing
test-fast: setup
	$(VENV_PY) -m pytest -m "not slow" $(TEST_PAR)

# The suite on a second detectron2, built from source with its compiled ops (as GPU users
# install it), in its own venv: make test-upstream D2_SRC=<detectron2 source folder or archive>.
# Not part of `make test`: a fresh machine has no detectron2 source.
UPSTREAM_VENV ?= .venv-upstream
test-upstream:
	@test -n "$(D2_SRC)" || { echo "usage: make test-upstream D2_SRC=<detectron2 source folder or .tar.gz/.zip>"; exit 2; }
	$(PYTHON) tools/setup_upstream_env.py "$(D2_SRC)" --venv $(UPSTREAM_VENV)
	$(UPSTREAM_VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV_PY) -m ruff check .
