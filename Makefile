# Two commands on a fresh machine: `make rehearse` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: rehearse test env clean sandbox lab

# The environment is (re)built when missing or when the dependencies change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required" if sys.version_info < (3, 11) else 0)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

env: $(VENV)/.installed

rehearse: $(VENV)/.installed
	$(BIN)/runbook rehearse

# Practice by hand: `make sandbox` in one terminal (stays up until Ctrl-C), `make lab` in another.
sandbox: $(VENV)/.installed
	$(BIN)/runbook sandbox

lab: $(VENV)/.installed
	$(BIN)/runbook lab

test: $(VENV)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) records .pytest_cache
