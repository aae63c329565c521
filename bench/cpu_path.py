"""The CPU path before and after a change: `sazs-priors run` of two code versions, side by side.

Example (is the CPU path of the working tree as fast as, and bitwise equal to, a base revision's?):
    python bench/cpu_path.py --base 2d21ea2
    make bench-cpu-path ARGS="--base 2d21ea2 --images 32 --repeats 3"
    make bench-cpu-path ARGS="--base a92460c --head HEAD"   # two commits, whatever the working tree holds

The base revision is checked out into a temporary git worktree and imported through a
PYTHONPATH shim (`<tmp>/shim-base/sazs -> worktree/src/sazs`, or the worktree itself for a
revision before the src layout); the head is this working tree, or `--head REV` checked
out the same way (to leave out uncommitted work in a shared checkout). Both run
the same command (the `make priors` defaults on this machine: `--solver` and
`--graph-backend` left at their defaults) in fresh processes on one synthetic COCO
layout, alternating which goes first, per extractor. The table gives median images/s of
the job itself (the summary's `seconds`, so process start-up and model loading are left
out), their ratio, and whether the two stores hold bitwise identical arrays and the same fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARRAYS = ("eigvecs", "eigvals", "residual", "grid", "image_size", "status")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("CPU path: base revision vs working tree", add_help=add_help)
    p.add_argument("--base", required=True, help="git revision to compare against (e.g. the commit before a change)")
    p.add_argument(
        "--head",
        default=None,
        help="git revision to compare (default: this working tree, uncommitted changes included)",
    )
    p.add_argument("--images", type=int, default=16, help="synthetic COCO val images")
    p.add_argument("--extractors", default="color,imgfocus-vits14", help="comma-separated extractors")
    p.add_argument("--short-side", type=int, default=224, help="short side of the ViT input (px)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--out", default="bench/results/cpu_path.json")
    return p


def _run_job(tree: str, env: dict, data: Path, extractor: str, args, out: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "sazs.pipeline",
        "run",
        "--dataset",
        "coco",
        "--data",
        str(data),
        "--split",
        "val2017",
        "--extractor",
        extractor,
        "--short-side",
        str(args.short_side),
        "--out",
        str(out),
        "--shard-size",
        str(args.shard_size),
        "--no-progress",
        "--preview",
        "0",
        "--overwrite",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    return summary["computed"] / summary["seconds"]


def _arrays(path: Path) -> dict:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][:]) for name in ARRAYS}


def _fingerprint(path: Path) -> str:
    import zarr

    return zarr.open_group(str(path), mode="r").attrs["manifest"]["fingerprint"]


def _checkout(rev: str, tmp: Path, label: str) -> tuple[Path, Path]:
    """(worktree, PYTHONPATH shim) of revision `rev`: the shim's `sazs` is that revision's package."""
    worktree = tmp / label
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree), rev], cwd=ROOT, check=True)
    shim = tmp / f"shim-{label}"
    shim.mkdir()
    # src/sazs in the src layout, the worktree's root before it
    package = worktree / "src" / "sazs" if (worktree / "src" / "sazs").is_dir() else worktree
    (shim / "sazs").symlink_to(package)
    return worktree, shim


def _short(rev: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from sazs.datasets.synthetic import make_coco

    with tempfile.TemporaryDirectory(prefix="sazs-bench-cpu-") as tmp:
        tmp = Path(tmp)
        worktrees = []
        try:
            worktree, shim = _checkout(args.base, tmp, "base")
            worktrees.append(worktree)
            envs = {
                "base": {**os.environ, "PYTHONPATH": str(shim), "HF_HUB_OFFLINE": "1"},
                "head": {**os.environ, "HF_HUB_OFFLINE": "1"},
            }
            envs["head"].pop("PYTHONPATH", None)  # this working tree (the editable install)
            if args.head:
                worktree, shim = _checkout(args.head, tmp, "head")
                worktrees.append(worktree)
                envs["head"]["PYTHONPATH"] = str(shim)
            base_rev = _short(args.base)
            head_rev = _short(args.head) if args.head else f"{_short('HEAD')} + working tree"
            data = make_coco(tmp / "coco", num_train=1, num_val=args.images)
            rows = []
            for extractor in args.extractors.split(","):
                rates: dict[str, list[float]] = {"base": [], "head": []}
                for r in range(args.repeats + 1):  # the first round warms caches (model conversion, page cache)
                    order = ("base", "head") if r % 2 == 0 else ("head", "base")
                    for label in order:
                        rate = _run_job(label, envs[label], data, extractor, args, tmp / f"{label}.zarr")
                        if r > 0:
                            rates[label].append(rate)
                same = all(
                    np.array_equal(a, b)
                    for a, b in zip(_arrays(tmp / "base.zarr").values(), _arrays(tmp / "head.zarr").values())
                )
                same_fingerprint = _fingerprint(tmp / "base.zarr") == _fingerprint(tmp / "head.zarr")
                base, head = statistics.median(rates["base"]), statistics.median(rates["head"])
                rows.append(
                    {
                        "extractor": extractor,
                        "base_img_s": base,
                        "head_img_s": head,
                        "ratio": head / base,
                        "identical_arrays": same,
                        "same_fingerprint": same_fingerprint,
                        "base_runs": rates["base"],
                        "head_runs": rates["head"],
                    }
                )
        finally:
            for worktree in worktrees:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)

    print(
        f"\nCPU path, {args.images} synthetic COCO images, short side {args.short_side}, "
        f"{os.cpu_count()} CPUs; base {base_rev} vs head {head_rev}"
    )
    print(
        f"{'extractor':18s} {'base img/s':>11s} {'head img/s':>11s} {'head/base':>10s}  "
        "identical arrays  same fingerprint"
    )
    for r in rows:
        print(
            f"{r['extractor']:18s} {r['base_img_s']:11.2f} {r['head_img_s']:11.2f} {r['ratio']:10.2f}  "
            f"{'yes' if r['identical_arrays'] else 'NO':16s}  {'yes' if r['same_fingerprint'] else 'NO'}"
        )
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"base": base_rev, "head": head_rev, "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
