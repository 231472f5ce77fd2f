# flytrain — one command to set up and run the default job, one to set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test test-all bench lint clean

setup: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU wheel; an open range alone would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev]"
	touch $@

# the Flyte workflow on the embedded default job, run locally (cached tasks are reused: --overwrite-cache retrains);
# `python -m workflows run --workdir outputs` is the plain entry point (the DVC stages use it)
run: setup
	$(VENV)/bin/pyflyte run workflows/training.py training_workflow

test: setup
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check trainer_lib callbacks workflows tests bench

clean:
	rm -rf outputs .pytest_cache
