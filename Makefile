# Everything runs from a local virtualenv that `make install` builds from scratch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check trainer tests demo

clean:
	rm -rf $(VENV) *.egg-info demo_output bench_output

# The whole job offline on an embedded dataset, with a GCS server on loopback (demo/run_demo.py).
demo: install
	$(PY) demo/run_demo.py --output=demo_output
