# Two entry points (see README): `make demo` and `make test`.
# Each creates the virtual environment on first use, installs the CPU wheel of
# torch (an unpinned torch would pull a multi-GB CUDA build) and the project.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,pyhessian,lightning,transformers,peft,safetensors,tensorboard,wandb,mlflow
STAMP := $(VENV)/.landscape-installed

.PHONY: demo test browser lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/landscape demo --out demo-out

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 -q

# tests/test_report.py opens the HTML report in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pytest tests/benchmarks -q -s -p no:xdist

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
