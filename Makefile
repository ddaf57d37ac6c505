# Two commands need no prior set-up: `make demo` and `make test`. Both first run
# tools/setup_env.py, which builds .venv/ on the first call and is a no-op afterwards.
PYTHON ?= python3
VENV_PY := .venv/bin/python

.PHONY: setup demo test lint

setup:
	@$(PYTHON) tools/setup_env.py

demo: setup
	$(VENV_PY) tools/run_pipeline.py --output output/pipeline

test: setup
	$(VENV_PY) -m pytest

lint: setup
	$(VENV_PY) -m ruff check .
