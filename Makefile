# Sourcebeam: one-command setup, main job and test suite.
#   make run    set up (idempotent) and run the main job on the embedded default runner
#   make test   set up (idempotent, including the local services' binaries) and run every test
# The test tiers (markers in pytest.ini, rules in tests/tiers.py):
#   make test-fast          pure logic and transforms (DirectRunner, TestPipeline): no process, no service
#   make test-cli           the command line, run in pytest's process: no process, no service
#   make test-local         both of the above
#   make test-integration   services, other runners, signals, subprocesses (installs the tools)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The slowest tests of every full run are listed at its end (CI's output too).
DURATIONS ?= --durations=30 --durations-min=5

.PHONY: setup run test test-fast test-cli test-local test-integration tools clean

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
	$(PY) -m pytest $(DURATIONS) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not integration and not cli" $(PYTEST_ARGS)

test-cli: setup
	$(PY) -m pytest -m cli $(PYTEST_ARGS)

test-local: setup
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: setup tools
	$(PY) -m pytest -m integration $(DURATIONS) $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
