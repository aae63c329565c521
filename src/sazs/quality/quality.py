"""Do the priors segment real objects? Metrics of eigenvectors against human masks.

Public API (what ``sazs-eval priors`` and ``bench/priors_quality.py`` call)::

    score_image(eigvecs, mask, *, n_best=4, image=None, refine=None, label_map=False) -> dict[str, float]
    summarise(rows) -> dict[str, float]        # mean of every key over the rows that have it

``eigvecs`` (K, h, w) are one image's eigenvectors on its patch grid, cropped to the grid
(``PriorStore.get(id).eigvecs`` already is; the store pads to the largest grid). ``mask``
(H, W) is the dataset's mask at the image's pixels. Every vector is upsampled bilinearly to
(H, W) first (:func:`sazs.segments.refine.upsample_eigvecs`); ``refine="guided"`` then refines the
upsampled vectors with the image (``image`` (H, W, 3) uint8 is required; :mod:`eval.refine`).

Single object (``label_map=False``; DAVIS, salient-object sets): ``mask`` holds 0 = background,
any other value = object, 255 = not evaluated (VOC's outline band; DAVIS has none). Keys:

- ``fiedler_iou``, ``fiedler_accuracy``: the Deep Spectral Methods protocol. The Fiedler
  segment is {v1 > 0} at pixel resolution. Which side is the object is decided WITHOUT the
  mask: the store's sign convention (``pipeline.spectral.fix_signs``) makes the positive part
  of every vector the minority of patches, and the minority side is taken as the object.
- ``fiedler_max_fbeta``: max over 256 thresholds of F_beta (beta^2 = 0.3) of the soft v1,
  min-max normalised over the image (the salient-object convention, as pysodmetrics'
  dynamic F-measure); the per-image maximum, averaged over images by :func:`summarise`.
- ``best_of_n_iou_upper_bound`` (and ``best_of_n_index``, 1-based): the best IoU among the
  eigen-segments {v_k > 0}, k = 1..n_best. It picks with the mask: an upper bound, not a method.
- ``span_iou``: span-K capture. The 0/1 mask projected on span(v0..v_{K-1}) at pixel
  resolution (the orthogonal projector of :func:`sazs.core.linalg.orthonormal_basis`), thresholded
  at 0.5, IoU with the mask: how much of the object the K vectors can express at all, what
  the spectral loss and the ``project`` fusion rely on.

The vectors are the store's u (orthonormal eigenvectors of I - D^-1/2 W D^-1/2); the
generalised vectors of Deep Spectral Methods are v = D^-1/2 u, with the same signs, so every
segment {v_k > 0} is the same; only the soft F_beta thresholds and the span see the D^-1/2.

Object masks (:func:`score_object`, scored by :mod:`sazs.quality.scoring` for the single-object
sets): ``object_iou``, ``object_accuracy`` and ``object_max_fbeta`` of a GT-free binary object mask
(:func:`sazs.segments.objects.object_mask` for a store; TokenCut's recipe for ``--baseline
tokencut``) at the mask's pixels. For a binary map the max over thresholds of F_beta is the
F_beta of the mask itself (or of "everything", if higher), as TokenCut reports it.

Images whose mask has no object pixel get NaN for the IoU/F keys (undefined; left out of the
means, counted by ``fiedler_iou`` being NaN).

Label maps (``label_map=True``; CamVid, VOC): ``mask`` holds class indices, 255 = ignore.
Ground-truth segment = the pixels of one class. Eigen-segments = the cells of the sign
partition of v1..v_n (:func:`sazs.stores.preview.segment_labels`: label = sum_k [v_k > 0]·2^(k-1), up
to 2^n cells), so they partition the image. Keys:

- ``class_best_iou/<c>``: for class c present in the image, the best IoU of its pixels with
  any one eigen-segment (its covering IoU); ``covering``: those IoUs weighted by the classes'
  pixel counts (Arbelaez et al.'s segmentation covering); ``mean_best_iou``: their plain mean.
- ``boundary_recall`` / ``boundary_precision``: ground-truth class edges with an eigen-segment
  edge within the tolerance band, and vice versa (band: :func:`sazs.core.metrics.boundary_tolerance_px`,
  0.8 % of the diagonal by default; edges touching ignored pixels are not counted).
- ``span_miou``: the classes' one-hot maps projected on span(v0..v_{K-1}), argmax per pixel,
  mean IoU over the present classes (the ``project`` fusion given a perfect prediction).

Why not pysodmetrics for F_beta: its releases pin numpy < 2.3.5 and scikit-image < 0.26 and
pull OpenCV, none of which the pinned stack can take; the one F_beta needed here is 20 lines
and tested on hand-computed cases (tests/test_prior_quality.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from scipy import ndimage

from sazs.core.labels import IGNORE_INDEX
from sazs.core.metrics import boundary_tolerance_px
from sazs.segments.refine import RefineConfig, check_refine, refine_eigvecs, upsample_eigvecs
from sazs.stores.preview import segment_labels

BETA2 = 0.3
NUM_LEVELS = 256

SINGLE_KEYS = ("fiedler_iou", "fiedler_accuracy", "fiedler_max_fbeta", "best_of_n_iou_upper_bound", "span_iou")


# ----------------------------------------------------------------------------- binary pieces


def iou(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    """IoU of two boolean masks over ``valid`` pixels; NaN when the truth has no pixel."""
    if valid is not None:
        pred, truth = pred & valid, truth & valid
    if not truth.any():
        return math.nan
    return float((pred & truth).sum() / (pred | truth).sum())


def accuracy(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Share of ``valid`` pixels where the two boolean masks agree."""
    agree = pred == truth
    if valid is None:
        return float(agree.mean())
    return float(agree[valid].mean()) if valid.any() else math.nan


def max_fbeta(
    soft: np.ndarray,
    truth: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    beta2: float = BETA2,
    levels: int = NUM_LEVELS,
) -> float:
    """max over thresholds t of F_beta(soft >= t, truth); soft min-max normalised to ``levels`` bins.

    F_beta = (1 + beta^2) P R / (beta^2 P + R). A threshold predicting nothing has P = 0 and
    F = 0. NaN when the truth has no pixel.
    """
    soft = np.asarray(soft, np.float64)
    if valid is not None:
        soft, truth = soft[valid], truth[valid]
    soft, truth = soft.ravel(), truth.ravel()
    positives = int(truth.sum())
    if positives == 0:
        return math.nan
    lo, hi = float(soft.min()), float(soft.max())
    scaled = (soft - lo) / (hi - lo) if hi > lo else np.zeros_like(soft)
    bins = np.minimum((scaled * levels).astype(np.int64), levels - 1)
    fg = np.bincount(bins[truth], minlength=levels)
    all_ = np.bincount(bins, minlength=levels)
    # threshold at bin j predicts bins >= j: cumulative sums from the top
    tp = np.cumsum(fg[::-1])[::-1].astype(np.float64)
    pp = np.cumsum(all_[::-1])[::-1].astype(np.float64)
    precision = np.where(pp > 0, tp / np.maximum(pp, 1), 0.0)
    recall = tp / positives
    denom = beta2 * precision + recall
    f = np.where(denom > 0, (1 + beta2) * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return float(f.max())


def span_projection(vecs, targets: np.ndarray, rtol: float = 1e-4) -> np.ndarray:
    """(C, H, W) target maps projected on span(vecs (K, H, W)) -> (C, H, W) float32.

    The same orthogonal projector as a QR basis (:func:`sazs.core.linalg.orthonormal_basis`), from
    the K x K Gram matrix in float64: V (VᵀV)⁺ Vᵀ t, directions with singular value below
    ``rtol`` x the largest dropped. A tall QR of 400 k pixels x K costs a second; this, 20 ms.
    """
    v = np.asarray(vecs, np.float64).reshape(len(vecs), -1)  # (K, N)
    t = np.asarray(targets, np.float64).reshape(len(targets), -1)  # (C, N)
    w, u = np.linalg.eigh(v @ v.T)
    keep = w > (rtol**2) * max(float(w.max()), 1e-300)
    basis = (u[:, keep] / np.sqrt(w[keep])).T @ v  # (r, N) orthonormal rows
    return ((basis @ t.T).T @ basis).reshape(targets.shape).astype(np.float32)


def score_object(pred: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """``object_iou``, ``object_accuracy``, ``object_max_fbeta`` of a bool (H, W) object mask against
    the dataset's mask (0 background, 255 not evaluated, else object)."""
    pred, mask = np.asarray(pred, bool), np.asarray(mask)
    if pred.shape != mask.shape:
        raise ValueError(f"object mask {pred.shape} and mask {mask.shape} differ in size")
    valid = mask != IGNORE_INDEX
    truth = (mask != 0) & valid
    return {
        "object_iou": iou(pred, truth, valid),
        "object_accuracy": accuracy(pred, truth, valid),
        "object_max_fbeta": max_fbeta(pred.astype(np.float32), truth, valid),
    }


# ----------------------------------------------------------------------------- label-map pieces


def label_edges(labels: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label (both pixels valid)."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, bool)
    ok = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, bool)
    right = (labels[:, 1:] != labels[:, :-1]) & ok[:, 1:] & ok[:, :-1]
    down = (labels[1:, :] != labels[:-1, :]) & ok[1:, :] & ok[:-1, :]
    edge[:, :-1] |= right
    edge[:-1, :] |= down
    return edge


def boundary_match(pred_edges: np.ndarray, gt_edges: np.ndarray, radius: float) -> tuple[float, float]:
    """(recall, precision): gt edge pixels with a predicted edge within ``radius``, and vice versa.

    NaN recall when there is no ground-truth edge; precision 0 when nothing is predicted.
    """
    if not gt_edges.any():
        recall = math.nan
    elif not pred_edges.any():
        recall = 0.0
    else:
        recall = float((ndimage.distance_transform_edt(~pred_edges)[gt_edges] <= radius).mean())
    if not pred_edges.any():
        precision = 0.0 if gt_edges.any() else math.nan
    elif not gt_edges.any():
        precision = 0.0
    else:
        precision = float((ndimage.distance_transform_edt(~gt_edges)[pred_edges] <= radius).mean())
    return recall, precision


def covering_scores(segments: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict[int, tuple[float, int]]:
    """For every class c in ``gt`` (valid pixels): (best IoU with one segment, pixel count)."""
    seg = segments[valid].astype(np.int64)
    cls = gt[valid].astype(np.int64)
    if not cls.size:
        return {}
    n_seg = int(seg.max()) + 1
    classes = np.unique(cls)
    joint = np.zeros((len(classes), n_seg), np.int64)
    index = np.searchsorted(classes, cls)
    np.add.at(joint, (index, seg), 1)
    class_px = joint.sum(1)
    seg_px = np.bincount(seg, minlength=n_seg)
    union = class_px[:, None] + seg_px[None, :] - joint
    best = (joint / np.maximum(union, 1)).max(1)
    return {int(c): (float(b), int(n)) for c, b, n in zip(classes, best, class_px)}


# ----------------------------------------------------------------------------- per image


def _vectors_at_pixels(eigvecs: np.ndarray, size: tuple[int, int], image, refine, refine_cfg) -> torch.Tensor:
    vecs = upsample_eigvecs(np.asarray(eigvecs, np.float32), size)
    if check_refine(refine) not in (None, "guided"):  # the others refine masks and label maps
        raise ValueError(f"unknown refinement {refine!r} of eigenvectors; only 'guided' (linear) refines them")
    if refine == "guided":
        if image is None:
            raise ValueError("refine='guided' needs the image (H, W, 3) uint8")
        if tuple(image.shape[:2]) != tuple(size):
            raise ValueError(f"image {image.shape[:2]} and mask {tuple(size)} differ in size")
        refined = refine_eigvecs(vecs.numpy(), image, refine_cfg, grid=tuple(eigvecs.shape[-2:]))
        vecs = torch.from_numpy(refined)
    return vecs


def score_image(
    eigvecs: np.ndarray,
    mask: np.ndarray,
    *,
    n_best: int = 4,
    image: np.ndarray | None = None,
    refine: str | None = None,
    label_map: bool = False,
    boundary_tolerance: float = 0.008,
    refine_cfg: RefineConfig | None = None,
) -> dict[str, float]:
    """Scores of one image's eigenvectors (K, h, w) against its mask (H, W); see the module doc."""
    eigvecs = np.asarray(eigvecs)
    mask = np.asarray(mask)
    if eigvecs.ndim != 3 or eigvecs.shape[0] < 2:
        raise ValueError(f"eigvecs must be (K >= 2, h, w), got shape {eigvecs.shape}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if n_best < 1:
        raise ValueError(f"n_best must be >= 1, got {n_best}")
    n = min(n_best, eigvecs.shape[0] - 1)
    vecs = _vectors_at_pixels(eigvecs, mask.shape, image, refine, refine_cfg or RefineConfig())
    v = vecs.numpy()
    valid = mask != IGNORE_INDEX
    if not label_map:
        truth = (mask != 0) & valid
        fiedler = v[1] > 0
        ious = [iou(v[k] > 0, truth, valid) for k in range(1, 1 + n)]
        best = int(np.nanargmax(ious)) if not all(math.isnan(x) for x in ious) else 0
        projected = span_projection(vecs, truth[None].astype(np.float32))[0]
        return {
            "fiedler_iou": iou(fiedler, truth, valid),
            "fiedler_accuracy": accuracy(fiedler, truth, valid),
            "fiedler_max_fbeta": max_fbeta(v[1], truth, valid),
            "best_of_n_iou_upper_bound": ious[best],
            "best_of_n_index": float(best + 1),
            "span_iou": iou(projected > 0.5, truth, valid),
        }
    segments = segment_labels(v, n)
    cover = covering_scores(segments, mask, valid)
    row: dict[str, float] = {}
    if cover:
        total = sum(px for _, px in cover.values())
        row["covering"] = sum(b * px for b, px in cover.values()) / total
        row["mean_best_iou"] = float(np.mean([b for b, _ in cover.values()]))
    else:
        row["covering"] = row["mean_best_iou"] = math.nan
    radius = boundary_tolerance_px(boundary_tolerance, mask.shape)
    recall, precision = boundary_match(label_edges(segments, valid), label_edges(mask, valid), radius)
    row["boundary_recall"], row["boundary_precision"] = recall, precision
    classes = sorted(cover)
    if classes:
        onehot = np.stack([(mask == c) & valid for c in classes]).astype(np.float32)
        labels = np.asarray(classes)[span_projection(vecs, onehot).argmax(0)]
        row["span_miou"] = float(np.nanmean([iou(labels == c, mask == c, valid) for c in classes]))
    else:
        row["span_miou"] = math.nan
    for c, (b, _) in cover.items():
        row[f"class_best_iou/{c}"] = b
    return row


def summarise(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of every key over the rows where it is present and not NaN; ``num_images`` = rows given.

    ``best_of_n_index`` is a choice, not a score, and is left out.
    """
    rows = list(rows)
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "best_of_n_index"))
    out: dict[str, float] = {"num_images": float(len(rows))}
    for k in keys:
        vals = [r[k] for r in rows if k in r and not math.isnan(r[k])]
        out[k] = float(np.mean(vals)) if vals else math.nan
    return out
