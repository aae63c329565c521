"""The shape-loss ablation: CE, CE + edge, CE + spectral (+ segment), on CamVid-11 or PASCAL-5i (VOC).

Each variant is trained for every fold and seed through ``sazs-train run`` (frozen pretrained
backbone, feature cache: the views are shared by every run) and scored through ``sazs-eval
run --cache-features`` (each val image's tokens computed once for all runs), with the fusion
modes of ``--fusion`` (the oracle, when asked for, is an upper bound and printed apart):

- ``--dataset camvid``: the generalised setting on CamVid val (CamVid has no background, so no
  episodes); columns seen mIoU, unseen mIoU, hIoU, boundary F of the unseen classes.
- ``--dataset voc``: PASCAL-5i on the VOC val split: the 1-way binary episodes (lists generated
  from the annotations; per-fold mIoU over the fold's 5 unseen classes, FB-IoU, boundary F)
  and the generalised setting (all 20 classes: seen mIoU, unseen mIoU, hIoU). The chance
  level of the episodes (every pixel marked foreground) is printed beside the table.

Loss weights: with ``--tune``, each variant's weight is chosen on val (first fold and seed,
``--tune-metric`` of fusion none) from ``--grid``; otherwise the given weights are used. There
is no test split here: the numbers are val numbers, and they are what the weights were tuned
on when ``--tune`` is given (say so when quoting them). A head trained with CE over the seen
classes' text embeddings predicts almost no unseen class, so the evaluation calibrates
(``--calibration``: SPNet-C's calibrated stacking, the seen classes lose that much cosine
similarity); ``--tune-calibration GRID`` chooses it on val with the CE run (first fold and
seed) before anything else.

Prints and writes ``<out>/ablation.json`` and ``<out>/ablation.md``: per fold and variant and
fusion mode, the metrics' mean ± std over seeds, then the mean over folds (each seed's fold
mean first, so the ± is the spread over seeds of the fold-averaged number).

    make ablation DATA=../shared/data/camvid                     # CamVid (3 folds x 3 seeds)
    make ablation DATASET=voc DATA=path/to/VOC2007                # PASCAL-5i (4 folds x 3 seeds)
    python bench/ablation.py --dataset voc --data path/to/VOC2007 --folds 0 --seeds 0 --limit 40
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from sazs.eval import cli as eval_cli
from sazs.eval.fusion import UPPER_BOUNDS, fusion_key
from sazs.train import cli as train_cli

VARIANTS = {  # name -> flags; {w} is the variant's loss weight
    "ce": ["--spectral-weight", "0"],
    "ce+edge": ["--spectral-weight", "0", "--edge-weight", "{w}"],
    "ce+spectral": ["--spectral-weight", "{w}"],
    "ce+spectral+segment": ["--spectral-weight", "{w}", "--segment-weight", "{w2}"],
}
# (section of report.json, metric key, column title)
EPISODE_METRICS = (
    ("episodes", "miou", "mIoU"),
    ("episodes", "fb_iou", "FB-IoU"),
    ("episodes", "boundary_f", "BF"),
)
GENERALISED_METRICS = (
    ("generalised", "seen_miou", "seen mIoU"),
    ("generalised", "unseen_miou", "unseen mIoU"),
    ("generalised", "harmonic_miou", "hIoU"),
    ("generalised", "boundary_f_unseen", "BF unseen"),
)
DATASETS = {  # dataset -> (benchmark, folds, default fusion, metrics, tuning metric, default variants)
    "camvid": ("camvid-11", "0,1,2", "none,project", GENERALISED_METRICS, "harmonic_miou", ",".join(VARIANTS)),
    "voc": (
        "pascal-5i",
        "0,1,2,3",
        "none,project,select,segments,oracle",
        EPISODE_METRICS,  # the generalised setting stays in each run's report.json (sazs-eval run)
        "miou",
        "ce,ce+edge,ce+spectral",
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="camvid", choices=list(DATASETS))
    p.add_argument("--data", required=True, help="dataset root (CamVid: SegNet layout; voc: a VOC2007/VOC2012 folder)")
    p.add_argument("--train-priors", default=None, help="default priors/<dataset>-train-imgfocus-vits14.zarr")
    p.add_argument("--val-priors", default=None, help="default priors/<dataset>-val-imgfocus-vits14.zarr")
    p.add_argument("--folds", default=None, help="default: every fold of the benchmark")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=None, help="default: camvid all four, voc ce,ce+edge,ce+spectral")
    p.add_argument("--fusion", default=None, help="sazs-eval --fusion (default camvid none,project; voc all)")
    p.add_argument("--eval-args", default="", help="extra sazs-eval flags (one string)")
    p.add_argument("--edge-weight", type=float, default=0.3, help="edge baseline weight (SAZS code: 0.3)")
    p.add_argument("--spectral-weight", type=float, default=1.0)
    p.add_argument("--segment-weight", type=float, default=0.3)
    p.add_argument("--tune", action="store_true", help="choose each variant's weight on val from --grid")
    p.add_argument("--grid", default="0.1,0.3,1.0")
    p.add_argument(
        "--tune-metric",
        default=None,
        help="what --tune and --tune-calibration maximise, fusion none (camvid: harmonic_miou; voc: miou, "
        "the episodes' unseen mIoU)",
    )
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
        help="choose --calibration on val (CE only, first fold and seed, --tune-metric of fusion none) from GRID",
    )
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--limit", type=int, default=None, help="first N training images")
    p.add_argument("--val-limit", type=int, default=None, help="first N val images")
    p.add_argument("--crop-size", type=int, default=None)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--out", default=None, help="default runs/ablation-<dataset>")
    p.add_argument("--device", default="auto")
    p.add_argument("--train-args", default="", help="extra sazs-train flags (one string)")
    p.add_argument("--train-only", action="store_true", help="train the runs, evaluate nothing")
    p.add_argument("--eval-only", action="store_true", help="evaluate the runs already trained, train nothing")
    p.add_argument(
        "--existing",
        action="store_true",
        help="train and evaluate nothing new: the table of the runs already evaluated (the seeds that "
        "have every fold and variant)",
    )
    args = p.parse_args(argv)
    bench, folds, fusion, _, metric, variants = DATASETS[args.dataset]
    args.folds = args.folds or folds
    args.fusion = args.fusion or fusion
    args.tune_metric = args.tune_metric or metric
    args.variants = args.variants or variants
    args.out = args.out or f"runs/ablation-{args.dataset}"
    args.train_priors = args.train_priors or f"priors/{args.dataset}-train-imgfocus-vits14.zarr"
    args.val_priors = args.val_priors or f"priors/{args.dataset}-val-imgfocus-vits14.zarr"
    return args


def _flags(variant: str, w: float, w2: float) -> list[str]:
    return [f.format(w=w, w2=w2) for f in VARIANTS[variant]]


def _run_dir(args, variant: str, fold: int, seed: int, w: float) -> Path:
    return Path(args.out) / f"{variant}-w{w:g}-fold{fold}-seed{seed}"


def _done(args, variant: str, fold: int, seed: int, w: float, cal: float) -> bool:
    return (_run_dir(args, variant, fold, seed, w) / f"eval-c{cal:g}" / "report.json").is_file()


def train_and_eval(args, variant: str, fold: int, seed: int, w: float, w2: float, cal: float) -> dict:
    """{fusion key: {metric: value}} of one trained run (trained and evaluated once; reused after)."""
    run = _run_dir(args, variant, fold, seed, w)
    report = run / f"eval-c{cal:g}" / "report.json"
    if not (run / "checkpoint.pt").is_file():
        argv = [
            "run",
            "--dataset",
            args.dataset,
            "--data",
            args.data,
            "--fold",
            str(fold),
            "--seed",
            str(seed),
            *(["--priors", args.train_priors] if "spectral" in variant else []),  # the others read none
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
    if args.train_only:
        return {}
    if not report.is_file():
        argv = [
            "run",
            "--dataset",
            args.dataset,
            "--data",
            args.data,
            "--folds",
            str(fold),
            "--ckpt",
            str(run / "checkpoint.pt"),
            "--priors",
            args.val_priors,
            "--fusion",
            args.fusion,
            "--headline",
            "none",
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
            *args.eval_args.split(),
        ]
        if eval_cli.main(argv) != 0:
            raise RuntimeError(f"evaluation failed: sazs-eval {' '.join(argv)}")
    return read_scores(json.loads(report.read_text()), DATASETS[args.dataset][0])


def read_scores(report: dict, bench: str) -> dict:
    """{fusion key: {metric: value}} from a sazs-eval report: the episodes' and the generalised means
    (a mode scored in one setting only has the other's metrics missing)."""
    out: dict[str, dict] = {}
    for section, key in (("episodes", "protocols"), ("generalised", "generalised")):
        for mode, entry in report.get(key, {}).get(bench, {}).get("fusion", {}).items():
            for metric, value in entry["mean"].items():
                out.setdefault(mode, {})[f"{section}.{metric}"] = value
        if section == "episodes":
            chance = report.get(key, {}).get(bench, {}).get("chance")
            if chance:
                out["chance"] = {f"episodes.{m}": v for m, v in chance["mean"].items()}
    return out


def _mean_std(values: list) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, (sum((v - m) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5


def _cells(res: dict, metrics, n: int = 2) -> str:
    """Cells 'mean ± std' in % (one seed: the value alone); a metric the run did not score: —."""
    cells = []
    for sec, k, _ in metrics:
        m, sd = res[f"{sec}.{k}"]
        cells.append("—" if math.isnan(m) else f"{100 * m:.1f}" + (f" ± {100 * sd:.1f}" if n > 1 else ""))
    return " | ".join(cells)


def make_table(runs: dict, folds: list[int], variants: list[str], weights: dict, metrics) -> str:
    """Markdown: per fold, variant and fusion mode the mean ± std over the seeds evaluated (n), then
    the mean over folds (each seed's fold mean first, seeds that have every fold); the oracle's rows
    (an upper bound, uses GT) in a second table."""
    modes = [m for m in next(iter(runs.values())) if m != "chance"]
    keys = [f"{sec}.{k}" for sec, k, _ in metrics]

    def stats(per_seed: list[dict]) -> dict:
        return {k: _mean_std([r.get(k) for r in per_seed]) for k in keys}

    head = ["| fold | variant | weight | seeds | fusion | " + " | ".join(t for *_, t in metrics) + " |"]
    head.append("|---|---|---|---|---|" + "---|" * len(metrics))
    tables = {False: list(head), True: list(head)}
    upper_keys = {fusion_key(m) for m in UPPER_BOUNDS}
    for fold in [*folds, "mean"]:
        for v in variants:
            if fold == "mean":  # seeds with every fold: each seed's mean over the folds, then mean ± std
                seeds = sorted(s for (_, vv, s) in runs if vv == v and all((f, v, s) in runs for f in folds))
                seeds = sorted(set(seeds))
            else:
                seeds = sorted(s for (f, vv, s) in runs if f == fold and vv == v)
            if not seeds:
                continue
            for mode in modes:
                if fold == "mean":
                    per_seed = [
                        {k: _mean_std([runs[(f, v, s)][mode].get(k) for f in folds])[0] for k in keys} for s in seeds
                    ]
                else:
                    per_seed = [runs[(fold, v, s)][mode] for s in seeds]
                w = "—" if v == "ce" else f"{weights[v]:g}"
                cells = _cells(stats(per_seed), metrics, len(seeds))
                row = f"| {fold} | {v} | {w} | {len(seeds)} | {mode} | {cells} |"
                tables[mode in upper_keys].append(row)
    text = "\n".join(tables[False])
    if len(tables[True]) > 2:
        text += "\n\nUpper bound (reads the ground truth; not a method):\n\n" + "\n".join(tables[True])
    chance = {f: r["chance"] for (f, _, _), r in runs.items() if "chance" in r}
    if chance:
        cells = ", ".join(f"fold {f} {100 * c['episodes.miou']:.1f}" for f, c in sorted(chance.items()))
        mean = sum(c["episodes.miou"] for c in chance.values()) / len(chance)
        text += (
            f"\n\nChance (every pixel of every episode marked foreground): episode mIoU {cells}; mean {100 * mean:.1f}"
        )
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    metrics = DATASETS[args.dataset][3]
    folds = [int(f) for f in args.folds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    section = "generalised" if args.tune_metric in {k for _, k, _ in GENERALISED_METRICS} else "episodes"
    tune_key = f"{section}.{args.tune_metric}"
    weights = {
        "ce": args.spectral_weight,
        "ce+edge": args.edge_weight,
        "ce+spectral": args.spectral_weight,
        "ce+spectral+segment": args.spectral_weight,
    }
    t0 = time.perf_counter()
    cal = args.calibration
    # one CE checkpoint, evaluated at each calibration (val)
    if args.tune_calibration and not (args.existing or args.eval_only):
        w = weights["ce"]
        scores = {
            c: train_and_eval(args, "ce", folds[0], seeds[0], w, args.segment_weight, c)["none"][tune_key]
            for c in (float(g) for g in args.tune_calibration.split(","))
        }
        cal = max(scores, key=lambda c: scores[c])
        print(f"tuned calibration: {cal:g} (val {tune_key} of CE {scores})", flush=True)
    if args.tune and not (args.existing or args.eval_only):  # on val, first fold and seed, fusion none
        for v in variants:
            if v == "ce":
                continue
            scores = {
                w: train_and_eval(args, v, folds[0], seeds[0], w, args.segment_weight, cal)["none"][tune_key]
                for w in (float(g) for g in args.grid.split(","))
            }
            weights[v] = max(scores, key=lambda w: scores[w])
            print(f"tuned {v}: weight {weights[v]:g} (val {tune_key} {scores})", flush=True)
    runs = {}
    # seeds outermost: a run cut short still has every fold and variant of its first seeds
    for s in seeds:
        for v in variants:
            for fold in folds:
                if args.existing and not _done(args, v, fold, s, weights[v], cal):
                    continue
                if args.eval_only and not (_run_dir(args, v, fold, s, weights[v]) / "checkpoint.pt").is_file():
                    continue
                runs[(fold, v, s)] = train_and_eval(args, v, fold, s, weights[v], args.segment_weight, cal)
                print(f"done fold {fold} {v} seed {s} ({time.perf_counter() - t0:.0f}s)", flush=True)
    if args.train_only:
        return 0
    if not runs:
        print("no run evaluated yet")
        return 0
    table = make_table(runs, folds, variants, weights, metrics)
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
                "runs": [{"fold": f, "variant": v, "seed": s, "scores": r} for (f, v, s), r in runs.items()],
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
