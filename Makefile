# Two commands need no prior set-up: `make demo` and `make test`. Both first run
# tools/setup_env.py, which builds .venv/ on the first call and is a no-op afterwards.
PYTHON ?= python3
VENV_PY := .venv/bin/python

.PHONY: setup demo test lint

setup:
	@$(PYTHON) tools/setup_env.py

demo: setup
	$(VENV_PY) tools/train_net.py --config-file configs/quick_schedules/faster_rcnn_R_18_FPN_toy.yaml

test: setup
	$(VENV_PY) -m pytest

lint: setup
	$(VENV_PY) -m ruff check .
