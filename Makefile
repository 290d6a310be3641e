# Two commands on a fresh machine: `make rehearse` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Processes the suite runs on (pytest-xdist): each has its own servers; 1 runs it in this process.
TEST_WORKERS ?= 2

.PHONY: rehearse test env clean sandbox lab

# The environment is (re)built when missing or when the dependencies change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required" if sys.version_info < (3, 11) else 0)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# What only the tests need on top: the fleet extra (Dagster), so tests/test_fleet.py runs too.
$(VENV)/.installed-tests: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[fleet]'
	touch $@

env: $(VENV)/.installed

rehearse: $(VENV)/.installed
	$(BIN)/runbook rehearse

# Practice by hand: `make sandbox` in one terminal (stays up until Ctrl-C), `make lab` in another.
sandbox: $(VENV)/.installed
	$(BIN)/runbook sandbox

lab: $(VENV)/.installed
	$(BIN)/runbook lab

# Modules stay whole on one worker (--dist loadscope): module fixtures and ordered chains keep working.
test: $(VENV)/.installed-tests
	$(BIN)/python -m pytest $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope)

clean:
	rm -rf $(VENV) records .pytest_cache
