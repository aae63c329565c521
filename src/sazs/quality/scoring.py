"""Scoring prior stores against a dataset's masks: per-image scores and their summaries.

:func:`score_store` runs :func:`sazs.quality.quality.score_image` on every image that has
both priors and a mask (plain bilinear upsampling, and with ``refine`` also the refined
vectors, timed per image); an image without priors, with an unreadable mask or with a mask of
another size than the one the priors were computed for is recorded with its reason, never
raised. :func:`build_report` puts one or more stores side by side (means, per group or
per class), the JSON-able report that :mod:`sazs.quality.report` writes and draws.

Callers bring an open :class:`sazs.stores.reader.PriorStore` and a dataset (``ids``,
``load_image``, ``load_mask``, optional ``group(id)``, ``class_names``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sazs.datasets.images import ImageError
from sazs.stores.format import StoreError

from .quality import score_image, summarise
from .segment_scores import score_segments

log = logging.getLogger(__name__)

HEADLINE = {False: "fiedler_iou", True: "covering"}


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
    ids = list(dataset.ids if ids is None else ids)
    in_store = set(store.ids)
    group = getattr(dataset, "group", None)
    variants = ["bilinear"] + ([refine] if refine else [])
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    failures: dict[str, str] = {}
    refine_ms: list[float] = []
    it = ids
    if progress:
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
        if label_map:  # the segment maps (spectral clustering) beside the sign cells
            scores.update(score_segments(prior.eigvecs, prior.eigvals, mask, boundary_tolerance=boundary_tolerance))
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
            if label_map:
                scores.update(
                    score_segments(
                        prior.eigvecs,
                        prior.eigvals,
                        mask,
                        image=image,
                        refine=refine,
                        boundary_tolerance=boundary_tolerance,
                    )
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
