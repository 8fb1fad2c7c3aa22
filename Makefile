# Two commands: `make demo` and `make test`. Each creates or refreshes the local
# virtualenv (.venv) from pyproject.toml, then runs. Nothing installed by hand is assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: venv demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,parity]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m dim_jax.demo --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
