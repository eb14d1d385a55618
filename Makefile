# Every target sets itself up: a virtualenv in .venv with the project and its dev tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed


.PHONY: all setup test test-fast test-lab test-reliability lint demo bench bench-failover clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# All tests. Lab tests (marker `lab`) need root, keepalived, conntrackd and nftables; they skip
# with a message otherwise. `make test-fast` leaves them out.
test: $(STAMP)
	$(BIN)/pytest -q tests

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not lab" tests

test-lab: $(STAMP)
	$(BIN)/pytest -q -m lab tests

test-reliability: $(STAMP)
	$(BIN)/pytest -q tests/test_crash_load.py tests/test_concurrency.py tests/test_hostile.py \
		tests/test_secrets.py tests/test_network_faults.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

# The nodes go to ./demo-nodes of the directory make was started from (also with `make -C`), or DIR=path.
demo: $(STAMP)
	cd "$(or $(PWD),$(CURDIR))" && "$(abspath $(BIN))/python" -m hasync.demo $(if $(DIR),--dir "$(DIR)")

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-failover: $(STAMP)
	$(BIN)/python bench/failover.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
