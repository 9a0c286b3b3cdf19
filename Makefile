# vllm-v2drop developer entry points. `make demo` runs it, `make test` checks it.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Where vLLM's CPU wheel lies (a user's own build or a GPU install works too: set VLLM_SPEC="vllm==0.32.0").
V2DROP_WHEELS ?= ../shared/wheels
VLLM_SPEC ?= vllm==0.32.0+cpu.backport1
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: setup demo test test-fast models clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile tools/patch_torchvision.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import vllm, sys; sys.exit(0 if vllm.__version__.startswith('0.32.0') else 1)" 2>/dev/null; then \
	  if [ -d "$(V2DROP_WHEELS)" ] || [ -n "$$PIP_FIND_LINKS" ]; then \
	    echo "installing $(VLLM_SPEC) from $(V2DROP_WHEELS)"; \
	    $(PY) -m pip install -q --find-links "$(V2DROP_WHEELS)" "$(VLLM_SPEC)" || { \
	      echo "error: could not install $(VLLM_SPEC). vLLM publishes no CPU wheel on PyPI:"; \
	      echo "  build one (VLLM_TARGET_DEVICE=cpu pip wheel vllm==0.32.0) and point V2DROP_WHEELS at its folder,"; \
	      echo "  or on a GPU machine run: make setup VLLM_SPEC=vllm==0.32.0"; exit 1; }; \
	  else \
	    echo "error: wheel folder $(V2DROP_WHEELS) not found. Set V2DROP_WHEELS=DIR holding a vLLM 0.32.0 wheel,"; \
	    echo "  or VLLM_SPEC=vllm==0.32.0 to install vLLM's CUDA build from PyPI on a GPU machine."; exit 1; \
	  fi; \
	fi
	@$(PY) -m pip install -q -e '.[test,bench]'
	@$(PY) tools/patch_torchvision.py
	@$(PY) -c "import vllm, torchvision, transformers, vllm_v2drop; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| torchvision', torchvision.__version__)"
	@touch $@

demo: setup
	$(PY) -m vllm_v2drop.tools.demo $(MODEL)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache
