# `make demo` trains the digits model; `make test` lints and runs the whole suite.
# Torch is installed first so a CPU wheel can be chosen: override with e.g. TORCH="torch==2.13.0".
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install browser demo test lint format space clean

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

# The Space's browser test drives Debian's chromium. As root with apt-get (CI, containers) it is installed here;
# otherwise make stops at once with the command to run, rather than after minutes of tests.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing chromium (apt-get) for tests/test_space_browser.py"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "make test needs Chromium for tests/test_space_browser.py. Install it, then rerun make test:"; \
	    echo "    sudo apt-get install chromium    (Debian/Ubuntu; other systems: put a chromium on PATH)"; \
	    exit 1; \
	  fi; }

test: browser lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile -q tests

demo: install
	$(PY) -m hf_ddpm.demo

space: install
	$(PY) spaces/hf-ddpm/app.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
