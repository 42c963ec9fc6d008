# Set-up is part of every target: a fresh machine needs only python3 (3.11+) and these commands.
# torch is constrained to the local CPU build (constraints.txt); pyproject.toml keeps an honest range.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flgraph-installed

.PHONY: demo test lint docs bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flgraph demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy flgraph stages transports recipes

test: lint
	$(PY) -m pytest -q

# The documentation site (docs/), strict: any warning (a broken reference, a docstring that does not
# render) fails, and the pages' code cells run as the site is built.
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

bench: $(STAMP)
	$(PY) bench/compare_w1.py
	$(PY) bench/paired_w1.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache docs/_build docs/jupyter_execute
