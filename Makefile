# Two commands do all set-up on a machine with Python 3.10+ and make:
#   make run    # install into .venv, train the main job on local Ray, log to ./mlflow.db
#   make test   # install into .venv, run the test suite
# Both install the tested dependency set (constraints.txt); `make lock` upgrades it.
# `make report` regenerates README.md's results tables and references (benchmarks/report.py).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MNIST in torchvision's raw layout: ../shared/data next to a checkout when it exists. Else
# MTL_DATA_DIR stays unset: `make run` reads ./data/MNIST/raw and fetches what is missing there
# (needs internet), and the tests use the subset committed in tests/fixtures/data.
ifneq ($(wildcard ../shared/data/MNIST/raw),)
MTL_DATA_DIR ?= $(abspath ../shared/data)
endif
ifdef MTL_DATA_DIR
export MTL_DATA_DIR
endif
# Ray on these machines binds to loopback only.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

.PHONY: install run test lint bench report lock

# constraints.txt holds the exact versions CI tested; a change to it reinstalls.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/mtl train configs/multimnist.yaml

test: install
	$(BIN)/python -m pytest -q --durations=30 $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check mtl kernels jobs tests benchmarks
	$(BIN)/ruff format --check mtl kernels jobs tests benchmarks

bench: install
	$(BIN)/python benchmarks/throughput.py

# README.md's results tables, caveats, configuration and CLI references, regenerated from the
# committed raw files (benchmarks/results/, baselines/), mtl/config.py and `mtl --help`.
# `benchmarks/report.py --check` (run by tests/test_readme.py) names any block out of sync.
report: install
	$(BIN)/python benchmarks/report.py

# Upgrade the tested set in one place: the newest releases pyproject.toml allows, resolved in a
# fresh venv without constraints, become the new pins (the header above "-- pins --" is kept).
# Then `make test`: tests/test_private_apis.py names any private API the upgrade changed.
LOCK_VENV := $(VENV)-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q -e '.[dev]'
	{ sed '/^# -- pins --$$/q' constraints.txt; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)
