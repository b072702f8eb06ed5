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
# The fast and cli tiers run on every core (pytest-xdist; an idle worker takes tests from a
# busy one, so a module's fixtures may be built once per worker: measured, still the fastest).
# `make test-fast XDIST=` runs them in one process.
XDIST ?= -n auto --dist worksteal

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

# Two sessions: the fast and cli tiers on every core, then the integration tier in one process
# (its tests share the session's Kafka and Flink; two at once on two cores doubled each one's
# time). Both always run; the target fails if either fails (5: nothing selected, not a failure).
test: setup tools
	status=0; \
	$(PY) -m pytest -m "not integration" $(XDIST) $(DURATIONS) $(PYTEST_ARGS) || [ $$? = 5 ] || status=1; \
	$(PY) -m pytest -m integration $(DURATIONS) $(PYTEST_ARGS) || [ $$? = 5 ] || status=1; \
	exit $$status

test-fast: setup
	$(PY) -m pytest -m "not integration and not cli" $(XDIST) $(PYTEST_ARGS)

test-cli: setup
	$(PY) -m pytest -m cli $(XDIST) $(PYTEST_ARGS)

test-local: setup
	$(PY) -m pytest -m "not integration" $(XDIST) $(PYTEST_ARGS)

test-integration: setup tools
	$(PY) -m pytest -m integration $(DURATIONS) $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
