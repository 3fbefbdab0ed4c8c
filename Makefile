# Two entry points: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install demo test lint data

# The demo needs the package only; the tests also need the dev extras (pytest, ruff, OpenCV for a baseline).
$(STAMP): pyproject.toml requirements/constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements/constraints.txt -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[dev]"
	touch $(DEV_STAMP)

install: $(DEV_STAMP)

data: $(STAMP)
	$(BIN)/python scripts/make_synthetic.py

demo: $(STAMP)
	$(BIN)/python scripts/make_synthetic.py
	WANDB_MODE=offline $(BIN)/python scripts/train.py experiment=synthetic_tiny

# One pytest worker per core, at most 4 (each holds its own torch); loadgroup keeps tests that share a folder
# of the checkout (the wheel build) on one worker.
test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

lint: $(DEV_STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
