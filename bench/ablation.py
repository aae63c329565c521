"""The shape-loss ablation on CamVid-11: CE, CE + edge, CE + spectral, CE + spectral + segment.

Each variant is trained on CamVid train for every fold and seed through ``sazs-train run``
(frozen pretrained backbone, feature cache: the views are shared by every run) and scored
through ``sazs-eval run --cache-features`` (each val image's tokens computed once for all
runs) in the generalised setting on CamVid val, with the GT-free fusion
modes (none, project). Loss weights: with ``--tune``, each variant's weight is chosen on val
(fold 0, seed 0, hIoU of fusion none) from ``--grid``; otherwise the given weights are used.
There is no test split here: the numbers are val numbers, and they are what the weights were
tuned on when ``--tune`` is given (say so when quoting them). A head trained with CE over the
seen classes' text embeddings predicts no unseen class at all (unseen mIoU 0 on CamVid fold 0),
so the evaluation calibrates (``--calibration``: SPNet-C's calibrated stacking, the seen classes
lose that much cosine similarity); ``--tune-calibration GRID`` chooses it on val with the CE run
(first fold and seed) before anything else.

Prints and writes ``<out>/ablation.json`` and ``<out>/ablation.md``: per fold and variant,
seen mIoU, unseen mIoU, hIoU and boundary F of the unseen classes, mean ± std over seeds.

    make ablation DATA=../shared/data/camvid                     # the full table (3 folds x 3 seeds)
    python bench/ablation.py --data ../shared/data/camvid --folds 0 --seeds 0 --limit 60 --val-limit 30
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from sazs.eval import cli as eval_cli
from sazs.train import cli as train_cli

VARIANTS = {  # name -> flags; {w} is the variant's loss weight
    "ce": ["--spectral-weight", "0"],
    "ce+edge": ["--spectral-weight", "0", "--edge-weight", "{w}"],
    "ce+spectral": ["--spectral-weight", "{w}"],
    "ce+spectral+segment": ["--spectral-weight", "{w}", "--segment-weight", "{w2}"],
}
METRICS = (
    ("seen_miou", "seen mIoU"),
    ("unseen_miou", "unseen mIoU"),
    ("harmonic_miou", "hIoU"),
    ("boundary_f_unseen", "BF unseen"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CamVid root (SegNet layout)")
    p.add_argument("--train-priors", default="priors/camvid-train-imgfocus-vits14.zarr")
    p.add_argument("--val-priors", default="priors/camvid-val-imgfocus-vits14.zarr")
    p.add_argument("--folds", default="0,1,2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--edge-weight", type=float, default=0.3, help="edge baseline weight (SAZS code: 0.3)")
    p.add_argument("--spectral-weight", type=float, default=1.0)
    p.add_argument("--segment-weight", type=float, default=0.3)
    p.add_argument("--tune", action="store_true", help="choose each variant's weight on val from --grid")
    p.add_argument("--grid", default="0.1,0.3,1.0")
    p.add_argument(
        "--calibration",
        type=float,
        default=0.0,
        help="sazs-eval --calibration: cosine similarity taken from the seen classes at evaluation",
    )
    p.add_argument(
        "--tune-calibration",
        default=None,
        metavar="GRID",
        help="choose --calibration on val (CE only, first fold and seed, hIoU of fusion none) from GRID",
    )
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--limit", type=int, default=None, help="first N training images")
    p.add_argument("--val-limit", type=int, default=None, help="first N val images")
    p.add_argument("--crop-size", type=int, default=None)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--out", default="runs/ablation-camvid")
    p.add_argument("--device", default="auto")
    p.add_argument("--train-args", default="", help="extra sazs-train flags (one string)")
    return p.parse_args(argv)


def _flags(variant: str, w: float, w2: float) -> list[str]:
    return [f.format(w=w, w2=w2) for f in VARIANTS[variant]]


def train_and_eval(args, variant: str, fold: int, seed: int, w: float, w2: float, cal: float) -> dict:
    run = Path(args.out) / f"{variant}-w{w:g}-fold{fold}-seed{seed}"
    report = run / f"eval-c{cal:g}" / "report.json"
    if not (run / "checkpoint.pt").is_file():
        argv = [
            "run",
            "--dataset",
            "camvid",
            "--data",
            args.data,
            "--fold",
            str(fold),
            "--seed",
            str(seed),
            "--priors",
            args.train_priors,
            "--epochs",
            str(args.epochs),
            "--optimizer",
            "adamw",
            "--lr",
            "1e-3",
            "--batch-size",
            "8",
            "--workers",
            "2",
            "--cache-features",
            "--views",
            str(args.views),
            "--templates",
            "seg",
            "--device",
            args.device,
            "--no-progress",
            "--overwrite",
            "--out",
            str(run),
            *(["--limit", str(args.limit)] if args.limit else []),
            *(["--crop-size", str(args.crop_size)] if args.crop_size else []),
            *_flags(variant, w, w2),
            *args.train_args.split(),
        ]
        if train_cli.main(argv) != 0:
            raise RuntimeError(f"training failed: sazs-train {' '.join(argv)}")
    if not report.is_file():
        argv = [
            "run",
            "--dataset",
            "camvid",
            "--data",
            args.data,
            "--folds",
            str(fold),
            "--ckpt",
            str(run / "checkpoint.pt"),
            "--priors",
            args.val_priors,
            "--fusion",
            "none,project",
            "--headline",
            "project",
            "--out",
            str(report.parent),
            "--device",
            args.device,
            "--no-progress",
            "--draw",
            "0",
            "--cache-features",
            "--calibration",
            str(cal),
            *(["--limit", str(args.val_limit)] if args.val_limit else []),
        ]
        if eval_cli.main(argv) != 0:
            raise RuntimeError(f"evaluation failed: sazs-eval {' '.join(argv)}")
    gen = json.loads(report.read_text())["generalised"]["camvid-11"]["fusion"]
    return {mode: entry["mean"] for mode, entry in gen.items()}


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, (sum((v - m) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5


def main(argv=None) -> int:
    args = parse_args(argv)
    folds = [int(f) for f in args.folds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    weights = {
        "ce": args.spectral_weight,
        "ce+edge": args.edge_weight,
        "ce+spectral": args.spectral_weight,
        "ce+spectral+segment": args.spectral_weight,
    }
    t0 = time.perf_counter()
    cal = args.calibration
    if args.tune_calibration:  # one CE checkpoint, evaluated at each calibration (val)
        w = weights["ce"]
        scores = {
            c: train_and_eval(args, "ce", folds[0], seeds[0], w, args.segment_weight, c)["none"]["harmonic_miou"]
            for c in (float(g) for g in args.tune_calibration.split(","))
        }
        cal = max(scores, key=lambda c: scores[c])
        print(f"tuned calibration: {cal:g} (val hIoU of CE {scores})", flush=True)
    if args.tune:  # on val, fold 0, seed 0, fusion none
        for v in variants:
            if v == "ce":
                continue
            scores = {
                w: train_and_eval(args, v, folds[0], seeds[0], w, args.segment_weight, cal)["none"]["harmonic_miou"]
                for w in (float(g) for g in args.grid.split(","))
            }
            weights[v] = max(scores, key=lambda w: scores[w])
            print(f"tuned {v}: weight {weights[v]:g} (val hIoU {scores})", flush=True)
    rows = {}
    for fold in folds:
        for v in variants:
            per_seed = [train_and_eval(args, v, fold, s, weights[v], args.segment_weight, cal) for s in seeds]
            for mode in per_seed[0]:
                rows[(fold, v, mode)] = {k: _mean_std([r[mode][k] for r in per_seed]) for k, _ in METRICS}
    lines = [
        "| fold | variant | weight | fusion | " + " | ".join(t for _, t in METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    for (fold, v, mode), res in rows.items():
        cells = " | ".join(f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in res.values())
        lines.append(f"| {fold} | {v} | {weights[v]:g} | {mode} | {cells} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(
        f"`{' '.join(sys.argv)}`\n\nseeds {seeds}, calibration {cal:g}, "
        f"{time.perf_counter() - t0:.0f}s\n\n" + table + "\n"
    )
    (out / "ablation.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "weights": weights,
                "calibration": cal,
                "seeds": seeds,
                "rows": [
                    {"fold": f, "variant": v, "fusion": m, **{k: {"mean": a, "std": b} for k, (a, b) in r.items()}}
                    for (f, v, m), r in rows.items()
                ],
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
