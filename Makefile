# Everything installs from nothing on a machine with Python 3.11 and pip.
# torch==2.13.0 first, so pip takes the CPU wheel instead of downloading a CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-bench test demo bench-hadamard

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"

install-bench: install
	$(PIP) install -q -e ".[dev,bench]"

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) -m quarot_fx.cli demo

bench-hadamard: install
	$(PYTHON) benchmarks/hadamard.py
