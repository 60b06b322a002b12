# Two entry points (see README): `make demo` and `make test`.
# Each creates the virtual environment on first use, installs the CPU wheel of
# torch (an unpinned torch would pull a multi-GB CUDA build) and the project.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,pyhessian
STAMP := $(VENV)/.landscape-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/landscape demo --out demo-out

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pytest tests/benchmarks -q -s -p no:xdist

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
