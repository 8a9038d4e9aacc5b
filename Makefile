# Two entry points that work on a fresh machine: `make bench` and `make test`.
# The virtual environment sees the system site-packages, so an existing torch (a user's
# CUDA build, say) is kept; torch==2.13.0 (the CPU build) is installed only if no
# torch >= 2.11 is importable.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmgen-installed
BENCH_ARGS ?=
TEST_ARGS ?=

.PHONY: bench test lint clean venv

venv: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 11) else 1)" 2>/dev/null \
		|| $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench,lint]'
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m benchmarks.harness $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadscope tests $(TEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check torch_mmgen_opt passes tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
