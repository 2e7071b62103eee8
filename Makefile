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

.PHONY: venv dev test demo bench-cli bench-preprocess docs lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[dev,transformers,quant]'
	! $(PY) -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torchvision") is None)' || \
		(echo "torchvision must not be installed next to CPU torch" >&2; exit 1)
	touch $@

venv dev: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/internvl launch --model-name internvl-tiny --dry-run

bench-cli: $(VENV)/.installed
	$(PY) benchmarks/bench_cli.py

docs: $(VENV)/.installed
	$(PY) -m internvl_launch.cli.docs > docs/cli.md

lint: $(VENV)/.installed
	$(PY) -m ruff check internvl_launch tests benchmarks
	$(PY) -m ruff format --check internvl_launch tests benchmarks

clean:
	rm -rf $(VENV) dist build .pytest_cache

bench-preprocess: $(VENV)/.installed
	$(PY) benchmarks/bench_preprocess.py
