# `make demo` trains the digits model; `make test` lints and runs the whole suite.
# Torch is installed first so a CPU wheel can be chosen: override with e.g. TORCH="torch==2.13.0".
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint format space clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[train,space,test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile -q tests

demo: install
	$(PY) -m hf_ddpm.demo

space: install
	$(PY) spaces/hf-ddpm/app.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
