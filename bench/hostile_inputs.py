"""Peak memory and time of the CLIs on hostile input files (issue 21: at most 1.5 GB and 60 s).

Builds, in ``--work``, the reproductions of the issue's torch-file and numeric-flag items: a
2.2 MB checkpoint (a real 2-step sazs-tiny one) carrying a 2 GiB deflated tensor for
``sazs-eval predict``, a 2.1 MB DSM file of 2 GiB deflated for ``sazs-store import-dsm``, a
COCO annotation file nested 100,000 deep for ``sazs-priors run``, ``--lr nan`` with one step
and ``--global-weight 1e300``. Each command runs in a child process with
``PYTHONPATH=<src>`` (so an extract of an older commit is measured the same way) and its peak
RSS is read with ``getrusage(RUSAGE_CHILDREN)`` in a fresh parent per command.

    python bench/hostile_inputs.py --work /tmp/hostile                          # this checkout
    git archive a474d8a | tar -x -C /tmp/before
    python bench/hostile_inputs.py --work /tmp/hostile --src /tmp/before/src    # before the fix
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

BIN = Path(sys.executable).parent
_SEED = 123457  # numel of the small tensor saved, patched in its pickle to the bomb's size


def torch_bomb(nbytes: int, extra: dict, key: str) -> bytes:
    """``extra`` plus a float32 tensor ``key`` of ``nbytes`` deflated zeros, written 1 MiB at a time."""
    import torch

    buf = io.BytesIO()
    torch.save({**extra, key: torch.zeros(_SEED)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    record = next(i.filename for i in src.infolist() if i.file_size == 4 * _SEED)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            if info.filename != record:
                data = src.read(info)
                if info.filename.endswith("data.pkl"):
                    data = data.replace(b"J" + struct.pack("<i", _SEED), b"J" + struct.pack("<i", nbytes // 4))
                z.writestr(info, data)
        entry = zipfile.ZipInfo(record)
        entry.compress_type = zipfile.ZIP_DEFLATED
        with z.open(entry, "w", force_zip64=True) as f:
            for _ in range(nbytes >> 20):
                f.write(bytes(1 << 20))
    return out.getvalue()


def build(work: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from sazs.datasets.synthetic import make_voc
    from sazs.train import cli as train_cli

    voc = make_voc(work / "voc", num_train=4, num_val=2, size=(56, 72), seed=3)
    train = ["run", "--dataset", "voc", "--data", str(voc), "--fold", "0", "--arch", "sazs-tiny", "--head-dim", "32"]
    train += ["--templates", "single", "--crop-size", "64", "--batch-size", "2", "--workers", "0", "--no-progress"]
    train += ["--spectral-weight", "0"]
    if not (work / "run" / "checkpoint.pt").is_file():
        assert train_cli.main([*train, "--steps", "2", "--out", str(work / "run")]) == 0
    good = torch.load(work / "run" / "checkpoint.pt", weights_only=True)
    (work / "bomb-ckpt.pt").write_bytes(torch_bomb(2 << 30, good, "bomb"))
    (work / "imgs").mkdir(exist_ok=True)
    (work / "eigs").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(work / "imgs" / "a.png")
    (work / "eigs" / "a.pth").write_bytes(torch_bomb(2 << 30, {"eigenvalues": torch.zeros(3)}, "eigenvectors"))
    (work / "coco" / "val2017").mkdir(parents=True, exist_ok=True)
    (work / "coco" / "annotations").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(work / "coco" / "val2017" / "000000000007.jpg")
    (work / "coco" / "annotations" / "instances_val2017.json").write_text("[" * 100_000 + "]" * 100_000)
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    image = voc / "JPEGImages" / f"{val}.jpg"
    return {
        "predict, checkpoint + 2 GiB deflated tensor": [
            "sazs-eval", "predict", str(image), "--classes", "cat", "--ckpt", str(work / "bomb-ckpt.pt"),
            "--out", str(work / "pred"), "--device", "cpu",
        ],
        "import-dsm, .pth of 2 GiB deflated": [
            "sazs-store", "import-dsm", str(work / "eigs"), "--dataset", "folder", "--data", str(work / "imgs"),
            "--out", str(work / "imp.zarr"), "--overwrite", "--no-progress",
        ],
        "priors, COCO JSON 100,000 deep": [
            "sazs-priors", "run", "--dataset", "coco", "--data", str(work / "coco"), "--extractor", "color",
            "--out", str(work / "coco.zarr"), "--overwrite", "--no-progress", "--preview", "0",
        ],
        "train --lr nan, 1 step": ["sazs-train", *train, "--steps", "1", "--lr", "nan", "--out", str(work / "lr")],
        "priors --global-weight 1e300": [
            "sazs-priors", "run", "--dataset", "sample", "--extractor", "color", "--global-weight", "1e300",
            "--limit", "2", "--out", str(work / "gw.zarr"), "--overwrite", "--no-progress", "--preview", "0",
        ],
    }  # fmt: skip


MEASURE = """
import resource, subprocess, sys, time
t = time.time(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
lines = [l for l in p.stderr.splitlines() if "error" in l.lower() or l.startswith(("Traceback", "scipy", "Recursion"))]
print(f"{p.returncode}\\t{peak:.0f}\\t{time.time() - t:.1f}\\t{(lines[-1] if lines else '')[:150]}")
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="scratch folder for the inputs and outputs")
    ap.add_argument("--src", default=None, help="the src/ folder to measure (default: this checkout's)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    commands = build(work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    print("| command | exit | peak RSS MB | s | last error line |\n|---|---|---|---|---|")
    for name, cmd in commands.items():
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(BIN / cmd[0]), *cmd[1:]], env=env, capture_output=True, text=True
        )
        rc, peak, wall, line = (out.stdout.strip().split("\t") + ["", "", "", ""])[:4]
        print(f"| {name} | {rc} | {peak} | {wall} | {line.replace('|', '/')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
