# The two commands: `make quickstart` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Installing is a no-op while setup.py is unchanged since the last install.
STAMP := $(VENV)/.install-stamp

.PHONY: install quickstart test lint clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

quickstart: install
	$(PY) -m lmindexer_jax.train --gin_file=gin/quickstart.gin

lint: install
	$(VENV)/bin/ruff check .

# Two pytest workers, each taking whole test files (module fixtures then run once): many tests
# wait on subprocesses or compile on one core.
test: install lint
	$(VENV)/bin/pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf runs .pytest_cache .ruff_cache
