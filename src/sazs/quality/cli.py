"""`sazs-eval priors`: score prior stores against a dataset's masks (report + pictures).

Example::

    sazs-eval priors /tmp/davis.zarr --dataset davis --data ../shared/data/davis2016-dev \\
        --out runs/priors-davis --refine guided

:func:`add_priors_parser` adds the subcommand to sazs-eval; :func:`cmd_priors` opens the
stores (computing a baseline store first with ``--baseline``), scores them
(:mod:`sazs.quality.scoring`) and writes the report and the pictures
(:mod:`sazs.quality.report`).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from sazs.core.argtypes import number
from sazs.datasets.base import DatasetConfig
from sazs.datasets.folders import MasksDataset
from sazs.datasets.registry import build_dataset
from sazs.pipeline.job import side_paths
from sazs.segments.objects import object_mask_grid, to_pixels
from sazs.segments.refine import check_refine, list_refiners, refine_mask
from sazs.segments.tokencut import TokenCutConfig
from sazs.stores.reader import open_store

from .baseline import BASELINES, compute_baseline, compute_tokencut, parse_baselines
from .report import draw_grid, draw_object_grid, format_markdown, write_report
from .scoring import HEADLINE, build_report, nearest_to_pixels, score_masks, score_store

BINARY_DATASETS = ("davis", "masks")  # single-object protocol; the others are label maps
PRIORS_DATASETS = ("davis", "masks", "camvid", "voc", "coco")
PRIORS_EXAMPLE = (
    "sazs-eval priors /tmp/davis.zarr --dataset davis --data ../shared/data/davis2016-dev "
    "--out runs/priors-davis --refine guided"
)


def add_priors_parser(sub) -> None:
    """The `priors` subcommand of sazs-eval."""
    p = sub.add_parser(
        "priors",
        help="score prior stores against a dataset's masks (report + pictures)",
        description=f"Example: {PRIORS_EXAMPLE}",
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="prior store(s) of the dataset, side by side")
    p.add_argument(
        "--dataset",
        required=True,
        choices=PRIORS_DATASETS,
        help="davis / masks: single-object protocol; camvid / voc / coco: label maps",
    )
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset root (Makefile: DATA=)")
    p.add_argument("--split", default=None, help="split (default: the dataset's)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images")
    p.add_argument("--images-dir", default=None, help="masks dataset: the image folder (default: auto-detected)")
    p.add_argument("--masks-dir", default=None, help="masks dataset: the mask folder (default: auto-detected)")
    p.add_argument(
        "--names", default=None, help="comma-separated names of the stores in the table (default: their file names)"
    )
    p.add_argument("--n-best", type=int, default=4, help="eigen-segments v1..vN for best-of-N and the label maps (4)")
    p.add_argument(
        "--refine",
        default="none",
        choices=["none", *list_refiners()],
        help="also score refined to pixel resolution with the image: the object masks (any refiner) and, "
        "with guided, the eigenvectors",
    )
    p.add_argument(
        "--boundary-tolerance",
        type=number(0, 100, lo_open=True),
        default=0.008,
        help="boundary band in (0, 100]: >= 1 pixels, < 1 fraction of the diagonal (0.008)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="NAMES",
        help=f"comma-separated, of {sorted(BASELINES)}: dsm computes (or resumes) OUT/baseline-dsm.zarr, the "
        "original formulation on the same dataset, extractor and K as the first STORE; tokencut runs "
        "TokenCut's object-mask recipe on the first STORE's features (single-object sets); each is "
        "scored beside the stores",
    )
    p.add_argument(
        "--tokencut-tau",
        type=number(-1, 1, hi_open=True),
        default=TokenCutConfig.tau,
        help="--baseline tokencut: the cosine threshold of its binary graph (default %(default)s, as published)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="report directory (report.md, report.json, PNGs)")
    p.add_argument("--no-pictures", action="store_true", help="skip the picture grids")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_priors)


def _build_dataset(args):
    cfg = DatasetConfig(name=args.dataset, root=args.data, split=args.split, limit=args.limit)
    if args.dataset == "masks":
        return MasksDataset(cfg, images_dir=args.images_dir, masks_dir=args.masks_dir)
    if args.images_dir or args.masks_dir:
        raise ValueError(f"--images-dir/--masks-dir are for --dataset masks, not {args.dataset}")
    return build_dataset(cfg)


def store_ms_per_image(url: str) -> float | None:
    """Milliseconds per computed image of the `sazs-priors run` that wrote a local store (its summary JSON)."""
    path = side_paths(url)[1]
    try:
        s = json.loads(path.read_text())
        return 1000.0 * float(s["seconds"]) / int(s["computed"]) if int(s.get("computed", 0)) > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _object_grid(name, slug, dataset, result, refine, out, *, store=None, masks=None) -> str | None:
    """The best, median and worst images by object IoU with the object masks of a store or a baseline."""

    def grid_mask(id_):
        return object_mask_grid(store.get(id_).eigvecs) if store is not None else masks[id_]

    def plain(id_, image, size):
        return to_pixels(grid_mask(id_), size) if store is not None else nearest_to_pixels(masks[id_], size)

    columns = {"object mask": plain}
    if refine:
        columns[f"object mask ({refine})"] = lambda id_, image, size: refine_mask(grid_mask(id_), image, refine)
    png = draw_object_grid(
        dataset,
        result["rows"]["bilinear"],
        columns,
        Path(out) / f"objects-{slug}.png",
        title=f"{name} on {dataset.name}/{dataset.split}: object masks, best, median, worst by object_iou",
    )
    return str(png) if png else None


def cmd_priors(args) -> int:
    refine = check_refine(None if args.refine == "none" else args.refine)
    if args.n_best < 1:
        raise ValueError(f"--n-best must be >= 1, got {args.n_best}")
    names = [n.strip() for n in args.names.split(",")] if args.names else [Path(s).name for s in args.stores]
    if len(names) != len(args.stores) or len(set(names)) != len(names):
        raise ValueError(f"--names must give {len(args.stores)} distinct names, one per store; got {names}")
    dataset = _build_dataset(args)
    label_map = args.dataset not in BINARY_DATASETS
    stores = {n: open_store(s) for n, s in zip(names, args.stores)}
    baselines = parse_baselines(args.baseline)
    if "tokencut" in baselines and label_map:
        raise ValueError("--baseline tokencut gives object masks: for the single-object sets (davis, masks)")
    first = next(iter(stores.values()))
    if "dsm" in baselines:
        path = compute_baseline("dsm", first, dataset, args.out, progress=not args.no_progress)
        stores["dsm (original)"] = open_store(path)
    results, timing, score_ms = {}, {}, {}
    for name, store in stores.items():
        t0 = time.perf_counter()
        res = score_store(
            store,
            dataset,
            label_map=label_map,
            n_best=args.n_best,
            refine=refine,
            boundary_tolerance=args.boundary_tolerance,
            progress=not args.no_progress,
        )
        scored = len(res["rows"]["bilinear"])
        score_ms[name] = 1000 * (time.perf_counter() - t0) / scored if scored else None
        res.update(url=store.url, fingerprint=store.fingerprint)
        results[name] = res
        timing[name] = store_ms_per_image(store.url)
    tokencut = None
    if "tokencut" in baselines:
        tokencut = compute_tokencut(
            first, dataset, args.out, cfg=TokenCutConfig(tau=args.tokencut_tau), progress=not args.no_progress
        )
        name = f"tokencut (tau {args.tokencut_tau:g})"
        res = score_masks(tokencut.masks, dataset, refine=refine, progress=not args.no_progress, desc="tokencut")
        res["failures"].update(tokencut.failures)
        res["object_ms"]["bilinear"] = [tokencut.mask_ms] if tokencut.mask_ms is not None else []
        res.update(url=str(tokencut.path), fingerprint=None)
        results[name] = res
        timing[name] = None
    report = build_report(
        results,
        dataset=dataset.describe(),
        label_map=label_map,
        class_names=dataset.class_names,
        n_best=args.n_best,
        timing=timing,
        refine=refine,
        score_ms=score_ms,
    )
    pictures = []
    if not args.no_pictures:
        for name, store in stores.items():
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "store"
            png = draw_grid(
                store,
                dataset,
                results[name]["rows"]["bilinear"],
                Path(args.out) / f"grid-{slug}.png",
                label_map=label_map,
                n_best=args.n_best,
                refine=refine if refine == "guided" else None,
                title=f"{name} on {dataset.name}/{dataset.split}: best, median, worst by {HEADLINE[label_map]}",
            )
            if png:
                pictures.append(str(png))
            if not label_map:
                pictures.append(_object_grid(name, slug, dataset, results[name], refine, args.out, store=store))
        if tokencut is not None:
            name = next(n for n in results if n.startswith("tokencut"))
            pictures.append(
                _object_grid(name, "tokencut", dataset, results[name], refine, args.out, masks=tokencut.masks)
            )
    report["pictures"] = [p for p in pictures if p]
    js, md = write_report(report, args.out)
    text = format_markdown(report)
    print(text.split("\n## ")[0].rstrip())
    print(f"report    {md}\njson      {js}")
    for p in pictures:
        print(f"picture   {p}")
    if not any(r["rows"]["bilinear"] for r in results.values()):
        print("sazs-eval: error: no image could be scored (see the failures in the report)", file=sys.stderr)
        return 1
    return 0
