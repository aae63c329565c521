"""The prior-quality report: report.md / report.json and the picture grid of a store.

:func:`write_report` writes the report of :func:`sazs.quality.scoring.build_report`
as report.json (strict JSON: an undefined score is null) and report.md (:func:`format_markdown`);
:func:`draw_grid` draws the best, median and worst images of a store.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sazs.segments.refine import refine_eigvecs, upsample_eigvecs
from sazs.stores.preview import segment_labels

from .quality import span_projection
from .scoring import HEADLINE

COLUMNS = {
    False: [
        ("fiedler_iou", "Fiedler IoU"),
        ("fiedler_accuracy", "Fiedler acc"),
        ("fiedler_max_fbeta", "Fiedler max Fβ"),
        ("best_of_n_iou_upper_bound", "best of {n} IoU (upper bound)"),
        ("span_iou", "span-K capture IoU"),
        ("object_iou", "object IoU"),
        ("object_accuracy", "object acc"),
        ("object_max_fbeta", "object max Fβ"),
    ],
    True: [
        ("covering", "covering"),
        ("mean_best_iou", "mean best IoU"),
        ("boundary_recall", "boundary recall"),
        ("boundary_precision", "boundary precision"),
        ("span_miou", "span-K mIoU"),
        ("segments_covering", "segments covering"),
        ("segments_mean_best_iou", "segments mean best IoU"),
        ("segments_boundary_recall", "segments boundary recall"),
        ("segments_boundary_precision", "segments boundary precision"),
        ("segments_count", "segments per image"),
    ],
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
            "tolerance band; span-K mIoU: class maps projected on span(v0..v_{K-1}), argmax. "
            "segments *: the same scores of the GT-free segment maps (k-means of the eigenvector rows, "
            "sazs.segments.maps), what `sazs-store export --format segments` writes.",
            "",
        ]
    else:
        lines += [
            "Fiedler segment: v1 > 0 (the minority side, chosen without the mask), bilinear to the mask's "
            f"pixels. Best of {report['n_best']}: the best v_k > 0 by IoU WITH the mask, an upper bound. "
            "Span-K capture: the mask projected on span(v0..v_{K-1}), > 0.5. Object: the GT-free object "
            "mask (sazs.segments.objects: k-means of the rows of v1..v4, clusters that avoid the border); "
            "for tokencut, TokenCut's recipe on the same features (nearest upsampling, as published).",
            "",
        ]
    head = ["store", "upsampling"] + [t for _, t in cols] + ["scored", "failed", "priors ms/img", "refine ms/img"]
    head += [] if label_map else ["object ms/img"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in report["stores"].items():
        for variant, v in s["variants"].items():
            m = v["mean"]
            ms = s["ms_per_image"] if variant == "bilinear" else None
            rms = s["refine_ms_per_image"] if variant != "bilinear" else None
            oms = (s.get("object_ms_per_image") or {}).get(variant)
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
                    + ([] if label_map else ["–" if oms is None else f"{oms:.1f}"])
                )
                + " |"
            )
    lines += [
        "",
        "priors ms/img: the whole `sazs-priors run` (decode, features, graph, solve) per computed image, "
        "from the store's summary JSON (– when it has none); refine ms/img: the refinement of the K "
        "upsampled vectors per image (the refined scoring's time minus the plain one's)."
        + (
            ""
            if label_map
            else " object ms/img: the object mask per image (on the grid, then to the pixels; refined: with "
            "the refinement; tokencut: its graph, eigenvector and mask, features excluded)."
        ),
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
        ax[2].imshow(segment_labels(v, min(n_best, v.shape[0] - 1)), cmap="tab20", interpolation="nearest")
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
    return _save_grid(fig, axes, cols, title, out_png)


def draw_object_grid(dataset, rows: list[dict], columns: dict, out_png: str | Path, *, title: str = "") -> Path | None:
    """Best, median and worst rows by ``object_iou``: image, mask, then one overlay per entry of
    ``columns`` (title -> fn(id, image, (H, W)) -> bool mask)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = pick_images(rows, "object_iou")
    if not picks:
        return None
    titles = ["image", "mask", *columns]
    fig, axes = plt.subplots(len(picks), len(titles), figsize=(2.8 * len(titles), 2.1 * len(picks)), squeeze=False)
    for r, (label, row) in enumerate(picks):
        id_ = row["id"]
        image, mask = dataset.load_image(id_), dataset.load_mask(id_)
        ax = axes[r]
        ax[0].imshow(image)
        ax[0].set_ylabel(f"{label}\n{id_}\nobject IoU {row['object_iou']:.2f}", fontsize=7)
        ax[1].imshow(np.where(mask != 255, mask != 0, 0.5), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for c, fn in enumerate(columns.values(), start=2):
            pred = fn(id_, image, mask.shape)
            ax[c].imshow(image)
            ax[c].imshow(np.ma.masked_equal(pred.astype(float), 0), cmap="autumn", alpha=0.55, interpolation="nearest")
    return _save_grid(fig, axes, titles, title, out_png)


def _save_grid(fig, axes, column_titles, title: str, out_png: str | Path) -> Path:
    """A picture grid's common ending: no ticks, column titles, the title, saved as PNG."""
    import matplotlib.pyplot as plt

    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    for a, t in zip(axes[0], column_titles):
        a.set_title(t, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=70)
    plt.close(fig)
    return out_png
