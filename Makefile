# The two commands of the README: `make demo` and `make test` (and `make lint`). All create ./.venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fnl-installed

.PHONY: install demo test lint bench clean gpu-carry gpu-check gpu-check-smoke

install: $(STAMP)

# torch==2.13.0 first (a CPU build on local disk; a bare `torch` would pull a CUDA build).
# fairseq-fixed is installed with --no-deps: its torchaudio requirement cannot load beside torch 2.13
# and breaks `import transformers`; its real dependencies come from our [fairseq] extra.
$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q cython 'numpy>=1.21.3' 'setuptools>=64' wheel
	$(BIN)/python -c "import fairseq" 2>/dev/null || \
	  $(BIN)/pip install -q --no-deps --no-build-isolation fairseq-fixed==0.12.3.1
	$(BIN)/pip install -q -e '.[fairseq,hf,test]'
	touch $(STAMP)

# the IWSLT-14 smoke pipeline: prepare a learnable synthetic corpus, train two variants, evaluate, table + plot
demo: $(STAMP)
	PYTHON=$(CURDIR)/$(BIN)/python bash recipes/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# ruff (rules and formatter settings in pyproject.toml) on the whole tree, mypy on the torch-only layers;
# `.venv/bin/ruff format .` rewrites what `ruff format --check` refuses
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fnl_transformers/core fnl_transformers/optim

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

# GPU check (README, "Training on GPUs / mixed precision"). gpu-carry: here, with network access, fills .gpu-carry/
# with what a GPU machine without fairseq or network needs. gpu-check: there, with the machine's own python3 and
# torch (no venv), installs from .gpu-carry/ into a scratch folder, runs the GPU tests, timings and training,
# writes bench/results-gpu.json. gpu-check-smoke: the same pipeline on this CPU, tiny sizes.
GPU_PYTHON ?= python3
GPU_ARCH   ?= fnl_transformer_small
GPU_CHECK_ARGS ?=

gpu-carry: $(STAMP)
	$(BIN)/python -m bench.gpu_carry --dest .gpu-carry

gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check --arch $(GPU_ARCH) $(GPU_CHECK_ARGS)

gpu-check-smoke: $(STAMP)
	$(BIN)/python -m bench.gpu_check --cpu-smoke $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
