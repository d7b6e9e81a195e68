# crdtmerge: `make test` and `make demo` work on a fresh machine with only Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test lint format demo bench clean

venv: $(STAMP)

# torch first, from the pinned version only (a CPU wheel is on the machine's disk);
# then the package and its test extras under the constraints file, so pip never pulls another torch.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 -c constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider

demo: venv
	$(PY) -m node.demo

bench: venv
	$(PY) bench/hash_bench.py
	$(PY) bench/crdt_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
