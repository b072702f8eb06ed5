# Sourcebeam: one-command setup, main job and test suite.
#   make run    set up (idempotent) and run the main job on the embedded default runner
#   make test   set up (idempotent, including the local services' binaries) and run every test
#   make test-fast   only the fast unit tests (no Kafka, Flink or other service processes)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast tools clean

setup: $(STAMP)

# The pinned dependencies, then Sourcebeam itself (editable: the `sourcebeam` command runs this
# checkout's code; --no-deps: everything it needs is pinned above).
$(STAMP): requirements.txt constraints.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Binaries the runners and services need (Prism, Beam/Flink/Kafka jars); idempotent.
tools: setup
	@if [ -x scripts/install_tools.sh ]; then scripts/install_tools.sh; fi

run: setup
	$(PY) run.py $(ARGS)

test: setup tools
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
