# Two commands: `make demo` and `make test`. Each creates or refreshes the local
# virtualenv (.venv) from pyproject.toml, then runs. Nothing installed by hand is assumed.
# Versions are pinned by constraints.txt (reproducible installs); `make lock` refreshes it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
WORKDIR ?= runs/demo

.PHONY: venv demo test clean lock

CONSTRAINTS := constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e .
	touch $(STAMP)

# Test extras: pytest (+ xdist: two workers; tests/conftest.py groups and orders the tests),
# nbclient for the notebook test, and torch + x-transformers for the parity tests.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[test,parity]"
	touch $(TEST_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m dim_jax.demo --workdir $(WORKDIR)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=25 tests

# Re-resolve every dependency (newest allowed by pyproject.toml) in a scratch venv and pin it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e ".[test,parity]"
	{ sed -n '/^#/p' $(CONSTRAINTS); .venv-lock/bin/python -m pip freeze --all --exclude-editable; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) runs
