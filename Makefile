# Two entry points: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint data

$(STAMP): pyproject.toml requirements/constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(BIN)/python scripts/make_synthetic.py

demo: $(STAMP)
	$(BIN)/python scripts/make_synthetic.py
	WANDB_MODE=offline $(BIN)/python scripts/train.py experiment=synthetic_tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
