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
from sazs.segments.objects import object_mask
from sazs.segments.refine import refine_mask
from sazs.stores.format import StoreError

from .quality import score_image, score_object, summarise
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
    "refine_ms": [...], "object_ms": [...]}; variants: "bilinear", and ``refine`` when given. The
    single-object sets also get the GT-free object mask's scores (:func:`score_object`), timed per
    image (``object_ms``: extraction on the grid and upsampling; refined: with the refinement). Only
    ``guided`` refines eigenvectors; with another refiner the refined rows hold the object keys
    (single object) or the segment-map keys (label maps) only.
    """
    ids = list(dataset.ids if ids is None else ids)
    in_store = set(store.ids)
    group = getattr(dataset, "group", None)
    variants = ["bilinear"] + ([refine] if refine else [])
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    failures: dict[str, str] = {}
    refine_ms: list[float] = []
    object_ms: dict[str, list[float]] = {v: [] for v in variants}
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
        if not label_map:
            scores.update(score_object(_timed(object_ms["bilinear"], object_mask, prior.eigvecs, mask.shape), mask))
        rows["bilinear"].append({**meta, **scores})
        if refine:
            t2 = time.perf_counter()
            scores = {}
            if refine == "guided":  # the one refiner of eigenvectors
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
            refine_ms.append(max(0.0, 1000 * ((time.perf_counter() - t2) - (t1 - t0))))
            if not label_map:
                pred = _timed(object_ms[refine], object_mask, prior.eigvecs, mask.shape, image=image, refine=refine)
                scores.update(score_object(pred, mask))
            rows[refine].append({**meta, **scores})
    if failures:
        log.warning("%s: %d image(s) not scored (first: %s)", store.url, len(failures), next(iter(failures.items())))
    return {"rows": rows, "failures": failures, "refine_ms": refine_ms, "object_ms": object_ms}


def _timed(times: list[float], fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    times.append(1000 * (time.perf_counter() - t0))
    return out


def nearest_to_pixels(grid_mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A grid mask (h, w) -> (H, W) by nearest neighbour, as TokenCut upsamples its masks."""
    h, w = grid_mask.shape
    rows = np.minimum((np.arange(size[0]) * h) // size[0], h - 1)
    cols = np.minimum((np.arange(size[1]) * w) // size[1], w - 1)
    return np.asarray(grid_mask, bool)[rows[:, None], cols[None, :]]


def score_masks(
    masks: dict[str, np.ndarray], dataset, *, refine: str | None = None, progress: bool = False, desc: str = "masks"
) -> dict:
    """Per-image object scores of grid masks (``masks``: id -> (h, w) bool; a baseline's), in the
    shape of :func:`score_store`'s result: "bilinear" rows upsample by nearest neighbour (as
    TokenCut does), ``refine`` rows refine the mask with the image."""
    variants = ["bilinear"] + ([refine] if refine else [])
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    object_ms: dict[str, list[float]] = {v: [] for v in variants}
    failures: dict[str, str] = {}
    group = getattr(dataset, "group", None)
    for id_ in tqdm(list(dataset.ids), desc=f"scoring {desc}", unit="img", disable=not progress):
        if id_ not in masks:
            failures[id_] = f"no {desc} mask"
            continue
        try:
            mask = dataset.load_mask(id_)
            if mask is None:
                raise ImageError(f"no mask for {id_}")
            image = dataset.load_image(id_) if refine else None
        except ImageError as exc:
            failures[id_] = str(exc)
            continue
        meta = {"id": id_, "group": group(id_) if group else None}
        pred = _timed(object_ms["bilinear"], nearest_to_pixels, masks[id_], mask.shape)
        rows["bilinear"].append({**meta, **score_object(pred, mask)})
        if refine:
            pred = _timed(object_ms[refine], refine_mask, masks[id_], image, refine, grid=masks[id_].shape)
            rows[refine].append({**meta, **score_object(pred, mask)})
    return {"rows": rows, "failures": failures, "refine_ms": [], "object_ms": object_ms}


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
            "object_ms_per_image": {v: float(np.mean(t)) for v, t in (res.get("object_ms") or {}).items() if t},
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
