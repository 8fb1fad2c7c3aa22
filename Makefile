# Two commands: `make demo` and `make test`. Each creates or refreshes the local
# virtualenv (.venv) from pyproject.toml, then runs. Nothing installed by hand is assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
WORKDIR ?= runs/demo

.PHONY: venv demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

# Test extras: pytest (+ xdist: two workers, one test file each), nbclient for the notebook
# test, and torch + x-transformers for the parity tests.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,parity]"
	touch $(TEST_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m dim_jax.demo --workdir $(WORKDIR)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs
