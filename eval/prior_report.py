"""Scoring prior stores against a dataset's masks: the table, report.md / report.json, the picture grid.

:func:`score_store` runs :func:`eval.prior_quality.score_image` on every image that has both
priors and a mask (plain bilinear upsampling, and with ``refine`` also the refined vectors,
timed per image); an image without priors, with an unreadable mask or with a mask of
another size than the one the priors were computed for is recorded with its reason, never
raised. :func:`build_report` puts one or more stores side by side (means, per group or
per class); :func:`write_report` writes report.json and report.md; :func:`draw_grid`
draws the best, median and worst images of a store.

Callers bring an open :class:`stores.reader.PriorStore` and a dataset (``ids``,
``load_image``, ``load_mask``, optional ``group(id)``, ``class_names``). An edge module like
``cli.py``: it reads stores and datasets (and catches their errors), importing the pipeline
inside functions only; the metrics themselves are in the pure :mod:`eval.prior_quality`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from sazs.stores.writer import StoreError

from .prior_quality import score_image, sign_partition, span_projection, summarise

log = logging.getLogger(__name__)

HEADLINE = {False: "fiedler_iou", True: "covering"}
COLUMNS = {
    False: [
        ("fiedler_iou", "Fiedler IoU"),
        ("fiedler_accuracy", "Fiedler acc"),
        ("fiedler_max_fbeta", "Fiedler max Fβ"),
        ("best_of_n_iou_upper_bound", "best of {n} IoU (upper bound)"),
        ("span_iou", "span-K capture IoU"),
    ],
    True: [
        ("covering", "covering"),
        ("mean_best_iou", "mean best IoU"),
        ("boundary_recall", "boundary recall"),
        ("boundary_precision", "boundary precision"),
        ("span_miou", "span-K mIoU"),
    ],
}


def score_store(
    store,
    dataset,
    *,
    label_map: bool,
    n_best: int = 4,
    refine: str | None = None,
    boundary_tolerance: float = 0.008,
    ids: list[str] | None = None,
    progress: bool = False,
) -> dict:
    """Per-image scores of one store on ``dataset`` (``ids``: default every dataset id).

    Returns {"rows": {variant: [{"id", "group", **scores}]}, "failures": {id: reason},
    "refine_ms": [...]}; variants: "bilinear", and "guided" when ``refine`` is given.
    """
    from sazs.datasets.images import ImageError  # an edge: the pipeline only inside functions

    ids = list(dataset.ids if ids is None else ids)
    in_store = set(store.ids)
    group = getattr(dataset, "group", None)
    variants = ["bilinear"] + ([refine] if refine else [])
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    failures: dict[str, str] = {}
    refine_ms: list[float] = []
    it = ids
    if progress:
        from tqdm import tqdm

        it = tqdm(ids, desc=f"scoring {Path(store.url).name}", unit="img")
    for id_ in it:
        if id_ not in in_store:
            failures[id_] = f"not in store {store.url}"
            continue
        try:
            prior = store.get(id_)
            mask = dataset.load_mask(id_)
            if mask is None:
                raise ImageError(f"no mask for {id_}")
            if tuple(mask.shape) != tuple(prior.image_size):
                raise ImageError(
                    f"mask of {id_} is {mask.shape[0]}x{mask.shape[1]} but the priors were computed for "
                    f"a {prior.image_size[0]}x{prior.image_size[1]} image (another dataset version?)"
                )
            image = dataset.load_image(id_) if refine else None
        except (StoreError, ImageError) as exc:
            failures[id_] = str(exc)
            continue
        meta = {"id": id_, "group": group(id_) if group else None}
        t0 = time.perf_counter()
        scores = score_image(
            prior.eigvecs, mask, n_best=n_best, label_map=label_map, boundary_tolerance=boundary_tolerance
        )
        t1 = time.perf_counter()
        rows["bilinear"].append({**meta, **scores})
        if refine:
            scores = score_image(
                prior.eigvecs,
                mask,
                n_best=n_best,
                label_map=label_map,
                image=image,
                refine=refine,
                boundary_tolerance=boundary_tolerance,
            )
            # the refinement's own cost: the refined scoring minus the plain one (same metrics)
            refine_ms.append(max(0.0, 1000 * ((time.perf_counter() - t1) - (t1 - t0))))
            rows[refine].append({**meta, **scores})
    if failures:
        log.warning("%s: %d image(s) not scored (first: %s)", store.url, len(failures), next(iter(failures.items())))
    return {"rows": rows, "failures": failures, "refine_ms": refine_ms}


def _scores_only(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k not in ("id", "group")}


def _grouped(rows: list[dict]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("group") is not None:
            groups.setdefault(r["group"], []).append(_scores_only(r))
    return {g: summarise(rs) for g, rs in groups.items()}


def _per_class(summary: dict[str, float], class_names: list[str]) -> dict[str, float]:
    out = {}
    for key, value in summary.items():
        if key.startswith("class_best_iou/"):
            c = int(key.split("/", 1)[1])
            out[class_names[c] if c < len(class_names) else str(c)] = value
    return out


def build_report(
    results: dict[str, dict],
    *,
    dataset: dict,
    label_map: bool,
    class_names: list[str],
    n_best: int,
    timing: dict[str, float | None] | None = None,
    refine: str | None = None,
    score_ms: dict[str, float] | None = None,
) -> dict:
    """JSON-able report of several stores (``results``: name -> :func:`score_store` output)."""
    stores = {}
    for name, res in results.items():
        variants = {}
        for variant, rows in res["rows"].items():
            summary = summarise(_scores_only(r) for r in rows)
            variants[variant] = {
                "mean": {k: v for k, v in summary.items() if not k.startswith("class_best_iou/")},
                "per_group": _grouped(rows),
                "per_class": _per_class(summary, class_names) if label_map else {},
                "images": rows,
            }
        refine_ms = res.get("refine_ms") or []
        stores[name] = {
            "url": res.get("url"),
            "fingerprint": res.get("fingerprint"),
            "ms_per_image": (timing or {}).get(name),
            "scoring_ms_per_image": (score_ms or {}).get(name),
            "refine_ms_per_image": float(np.mean(refine_ms)) if refine_ms else None,
            "variants": variants,
            "failures": res["failures"],
        }
    return {
        "dataset": dataset,
        "label_map": label_map,
        "n_best": n_best,
        "refine": refine,
        "headline": HEADLINE[label_map],
        "stores": stores,
    }


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def format_markdown(report: dict) -> str:
    label_map = report["label_map"]
    cols = [(k, t.format(n=report["n_best"])) for k, t in COLUMNS[label_map]]
    ds = report["dataset"]
    lines = [f"# Prior quality on {ds.get('name')}/{ds.get('split')} ({ds.get('num_images')} images)", ""]
    if label_map:
        lines += [
            "Label maps: per ground-truth class the best IoU with one eigen-segment (cells of the sign "
            f"pattern of v1..v{report['n_best']}); covering weights them by area; boundary recall within the "
            "tolerance band; span-K mIoU: class maps projected on span(v0..v_{K-1}), argmax.",
            "",
        ]
    else:
        lines += [
            "Fiedler segment: v1 > 0 (the minority side, chosen without the mask), bilinear to the mask's "
            f"pixels. Best of {report['n_best']}: the best v_k > 0 by IoU WITH the mask, an upper bound. "
            "Span-K capture: the mask projected on span(v0..v_{K-1}), > 0.5.",
            "",
        ]
    head = ["store", "upsampling"] + [t for _, t in cols] + ["scored", "failed", "priors ms/img", "refine ms/img"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in report["stores"].items():
        for variant, v in s["variants"].items():
            m = v["mean"]
            ms = s["ms_per_image"] if variant == "bilinear" else None
            rms = s["refine_ms_per_image"] if variant != "bilinear" else None
            lines.append(
                "| "
                + " | ".join(
                    [name, variant]
                    + [_fmt(m.get(k)) for k, _ in cols]
                    + [
                        str(int(m.get("num_images", 0))),
                        str(len(s["failures"])),
                        "–" if ms is None else f"{ms:.0f}",
                        "–" if rms is None else f"{rms:.0f}",
                    ]
                )
                + " |"
            )
    lines += [
        "",
        "priors ms/img: the whole `sazs-priors run` (decode, features, graph, solve) per computed image, "
        "from the store's summary JSON (– when it has none); refine ms/img: the refinement of the K "
        "upsampled vectors per image (the refined scoring's time minus the plain one's).",
        "",
    ]
    headline = report["headline"]
    for name, s in report["stores"].items():
        for variant, v in s["variants"].items():
            if v["per_group"]:
                lines += [
                    f"## {name} ({variant}): per sequence",
                    "",
                    "| sequence | images | " + " | ".join(t for _, t in cols) + " |",
                    "|" + "---|" * (len(cols) + 2),
                ]
                for g, m in sorted(v["per_group"].items(), key=lambda x: x[0]):
                    lines.append(
                        f"| {g} | {int(m['num_images'])} | " + " | ".join(_fmt(m.get(k)) for k, _ in cols) + " |"
                    )
                lines.append("")
            if v["per_class"]:
                lines += [f"## {name} ({variant}): best IoU per class", "", "| class | best IoU |", "|---|---|"]
                lines += [f"| {c} | {_fmt(x)} |" for c, x in v["per_class"].items()]
                lines.append("")
        if s["failures"]:
            lines += [f"## {name}: {len(s['failures'])} image(s) not scored", ""]
            lines += [f"- {i}: {r}" for i, r in list(s["failures"].items())[:20]]
            lines.append("")
    pics = report.get("pictures") or []
    if pics:
        lines += ["## Pictures", "", f"Best, median and worst images by {headline}:", ""]
        lines += [f"![{Path(p).name}]({Path(p).name})" for p in pics]
        lines.append("")
    return "\n".join(lines)


def _json_safe(x):
    """NaN (an undefined score) as null, so report.json is strict JSON."""
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    js.write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False) + "\n")
    md.write_text(format_markdown(report) + "\n")
    return js, md


def pick_images(rows: list[dict], key: str, per_end: int = 2) -> list[tuple[str, dict]]:
    """(label, row) of the ``per_end`` best, median and worst rows by ``key`` (NaN rows left out)."""
    ranked = sorted((r for r in rows if not math.isnan(r.get(key, math.nan))), key=lambda r: -r[key])
    if not ranked:
        return []
    mid = len(ranked) // 2 - per_end // 2
    picks = [("best", r) for r in ranked[:per_end]]
    picks += [("median", r) for r in ranked[max(mid, 0) : max(mid, 0) + per_end]]
    picks += [("worst", r) for r in ranked[-per_end:]]
    seen, out = set(), []
    for label, r in picks:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append((label, r))
    return out


def draw_grid(
    store,
    dataset,
    rows: list[dict],
    out_png: str | Path,
    *,
    label_map: bool,
    n_best: int = 4,
    refine: str | None = None,
    title: str = "",
) -> Path | None:
    """One row per picked image: image, mask, eigen-segments, Fiedler segment (refined), projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fusion import upsample_eigvecs
    from .refine import refine_eigvecs

    key = HEADLINE[label_map]
    picks = pick_images(rows, key)
    if not picks:
        return None
    cols = ["image", "mask", f"eigen-segments (signs v1..v{n_best})", "Fiedler v1 > 0 (bilinear)"]
    cols += [f"Fiedler v1 > 0 ({refine})"] if refine else []
    cols += ["mask projected on span(v0..v_{K-1})"]
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(2.8 * len(cols), 2.1 * len(picks)), squeeze=False)
    for r, (label, row) in enumerate(picks):
        id_ = row["id"]
        prior = store.get(id_)
        image, mask = dataset.load_image(id_), dataset.load_mask(id_)
        vecs = upsample_eigvecs(prior.eigvecs, mask.shape)
        v = vecs.numpy()
        valid = mask != 255
        ax = axes[r]
        ax[0].imshow(image)
        ax[0].set_ylabel(f"{label}\n{id_}\n{key} {row[key]:.2f}", fontsize=7)
        if label_map:
            ax[1].imshow(np.ma.masked_equal(mask, 255), cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        else:
            ax[1].imshow(np.where(valid, mask != 0, 0.5), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax[2].imshow(sign_partition(v, min(n_best, v.shape[0] - 1)), cmap="tab20", interpolation="nearest")
        c = 3
        fiedlers = [v[1]]
        if refine:
            fiedlers.append(refine_eigvecs(v, image, grid=prior.grid)[1])
        for vec in fiedlers:
            ax[c].imshow(image)
            ax[c].imshow(
                np.ma.masked_equal((vec > 0).astype(float), 0), cmap="autumn", alpha=0.55, interpolation="nearest"
            )
            c += 1
        if label_map:
            classes = [int(x) for x in np.unique(mask[valid])]
            onehot = np.stack([(mask == k) & valid for k in classes]).astype(np.float32)
            proj = np.asarray(classes)[span_projection(vecs, onehot).argmax(0)]
            ax[c].imshow(proj, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        else:
            proj = span_projection(vecs, ((mask != 0) & valid)[None].astype(np.float32))[0]
            ax[c].imshow(proj, cmap="magma", vmin=0, vmax=1)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    for a, t in zip(axes[0], cols):
        a.set_title(t, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=70)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------- command line (sazs-eval priors)

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
        choices=["none", "guided"],
        help="also score eigenvectors refined to pixel resolution with the image (guided filter)",
    )
    p.add_argument(
        "--boundary-tolerance",
        type=float,
        default=0.008,
        help="boundary band: >= 1 pixels, < 1 fraction of the diagonal (0.008)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        choices=sorted(BASELINES),
        help="also compute (or resume) OUT/baseline-dsm.zarr, the original formulation on the same "
        "dataset, extractor and K as the first STORE, and score it beside them",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="report directory (report.md, report.json, PNGs)")
    p.add_argument("--no-pictures", action="store_true", help="skip the picture grids")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_priors)


def _build_dataset(args):
    from sazs.datasets.base import DatasetConfig
    from sazs.datasets.folders import MasksDataset
    from sazs.datasets.registry import build_dataset

    cfg = DatasetConfig(name=args.dataset, root=args.data, split=args.split, limit=args.limit)
    if args.dataset == "masks":
        return MasksDataset(cfg, images_dir=args.images_dir, masks_dir=args.masks_dir)
    if args.images_dir or args.masks_dir:
        raise ValueError(f"--images-dir/--masks-dir are for --dataset masks, not {args.dataset}")
    return build_dataset(cfg)


def store_ms_per_image(url: str) -> float | None:
    """Milliseconds per computed image of the `sazs-priors run` that wrote a local store (its summary JSON)."""
    from sazs.pipeline.job import side_paths

    path = side_paths(url)[1]
    try:
        s = json.loads(path.read_text())
        return 1000.0 * float(s["seconds"]) / int(s["computed"]) if int(s.get("computed", 0)) > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


BASELINES = {
    "dsm": "the original Deep Spectral Methods formulation: dense affinity max(f·fᵀ, 0), generalised "
    "shift-invert eigsh(D − W, M = D)"
}


def compute_baseline(kind: str, like, dataset, out_dir: str | Path, *, progress: bool) -> Path:
    """Compute (or resume) the baseline store ``out_dir/baseline-<kind>.zarr`` of ``dataset`` with the
    extractor and K of the store ``like``, through the pipeline's own run function."""
    from dataclasses import fields

    from sazs.pipeline.extractors import FACETS, ExtractorConfig, build_extractor
    from sazs.pipeline.graph import GraphConfig
    from sazs.pipeline.job import JobConfig, run_local
    from sazs.pipeline.spectral import SpectralConfig, list_solvers

    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose from {sorted(BASELINES)}")
    if "kind" not in {f.name for f in fields(GraphConfig)} or "generalized" not in list_solvers():
        raise ValueError(
            "--baseline dsm needs the pipeline's dense graph and generalized solver, which this sazs "
            "lacks; compute the baseline store with sazs-priors and pass it as another STORE"
        )
    ex = like.manifest.get("extractor", {})
    policy = ex.get("input_size_policy", {})
    weights = ex.get("weights")
    extractor = ExtractorConfig(
        name=ex.get("name", "imgfocus-vits14"),
        weights=weights if weights and Path(weights).is_file() else None,
        facet=ex["facet"] if ex.get("facet") in FACETS else "key",  # color: no facet
        short_side=policy.get("short_side"),
        max_long_side=policy.get("max_long_side"),
    )
    path = Path(out_dir) / f"baseline-{kind}.zarr"
    log.info("baseline %s: %s, extractor %s, K=%d -> %s", kind, BASELINES[kind], extractor.name, like.num_eigs, path)
    summary = run_local(
        dataset,
        build_extractor(extractor),
        GraphConfig(kind="dense"),
        SpectralConfig(num_eigs=like.num_eigs, solver="generalized"),
        JobConfig(out=str(path), progress=progress, preview=0),
    )
    log.info("baseline %s: %d done, %d failed", kind, summary.done, summary.failed)
    return path


def cmd_priors(args) -> int:
    from sazs.stores.reader import open_store

    from .refine import check_refine

    refine = check_refine(None if args.refine == "none" else args.refine)
    if args.n_best < 1:
        raise ValueError(f"--n-best must be >= 1, got {args.n_best}")
    names = [n.strip() for n in args.names.split(",")] if args.names else [Path(s).name for s in args.stores]
    if len(names) != len(args.stores) or len(set(names)) != len(names):
        raise ValueError(f"--names must give {len(args.stores)} distinct names, one per store; got {names}")
    dataset = _build_dataset(args)
    label_map = args.dataset not in BINARY_DATASETS
    stores = {n: open_store(s) for n, s in zip(names, args.stores)}
    if args.baseline:
        path = compute_baseline(
            args.baseline, next(iter(stores.values())), dataset, args.out, progress=not args.no_progress
        )
        stores[f"{args.baseline} (original)"] = open_store(path)
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
                refine=refine,
                title=f"{name} on {dataset.name}/{dataset.split}: best, median, worst by {HEADLINE[label_map]}",
            )
            if png:
                pictures.append(str(png))
    report["pictures"] = pictures
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
