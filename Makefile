# Two commands need no prior set-up: `make demo` and `make test`. Both first run
# tools/setup_env.py, which builds .venv/ on the first call and is a no-op afterwards.
PYTHON ?= python3
VENV_PY := .venv/bin/python
# OpenMP threads that sleep instead of spinning while waiting: on a shared 2-core machine the
# default spinning made training 5-12x slower whenever another process was running
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY

.PHONY: setup demo test lint

setup:
	@$(PYTHON) tools/setup_env.py

demo: setup
	$(VENV_PY) tools/run_pipeline.py --output output/pipeline

test: setup
	$(VENV_PY) -m pytest

lint: setup
	$(VENV_PY) -m ruff check .
