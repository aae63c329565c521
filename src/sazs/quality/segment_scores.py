"""Scores of the segment maps (:mod:`sazs.segments.maps`) against a label map, beside the sign cells.

``score_segments(eigvecs, eigvals, mask)`` partitions the image with
:func:`sazs.segments.maps.segment_pixels` (spectral clustering of the eigenvector rows, no
ground truth) and scores it as :func:`sazs.quality.quality.score_image` scores the sign cells
of v1..vn: keys ``segments_covering``, ``segments_mean_best_iou``,
``segments_boundary_recall``, ``segments_boundary_precision`` and ``segments_count`` (the
number of segments; a partition into single pixels would cover nothing, one segment would
have no boundary: read the count beside the scores).
"""

from __future__ import annotations

import math

import numpy as np

from sazs.core.labels import IGNORE_INDEX
from sazs.core.metrics import boundary_tolerance_px
from sazs.segments.maps import SegmentConfig, segment_pixels

from .quality import boundary_match, covering_scores, label_edges

SEGMENT_KEYS = (
    "segments_covering",
    "segments_mean_best_iou",
    "segments_boundary_recall",
    "segments_boundary_precision",
    "segments_count",
)


def score_labels(segments: np.ndarray, mask: np.ndarray, *, boundary_tolerance: float = 0.008) -> dict[str, float]:
    """Covering, mean best IoU and boundary recall / precision of a partition (H, W) against the
    class map ``mask`` (H, W) (255 ignored); keys without the ``segments_`` prefix."""
    valid = mask != IGNORE_INDEX
    cover = covering_scores(segments, mask, valid)
    row: dict[str, float] = {"covering": math.nan, "mean_best_iou": math.nan}
    if cover:
        total = sum(px for _, px in cover.values())
        row["covering"] = sum(b * px for b, px in cover.values()) / total
        row["mean_best_iou"] = float(np.mean([b for b, _ in cover.values()]))
    radius = boundary_tolerance_px(boundary_tolerance, mask.shape)
    row["boundary_recall"], row["boundary_precision"] = boundary_match(
        label_edges(segments, valid), label_edges(mask, valid), radius
    )
    return row


def score_segments(
    eigvecs: np.ndarray,
    eigvals: np.ndarray | None,
    mask: np.ndarray,
    *,
    cfg: SegmentConfig | None = None,
    image: np.ndarray | None = None,
    refine: str | None = None,
    boundary_tolerance: float = 0.008,
) -> dict[str, float]:
    """The ``segments_*`` scores of one image's segment map; see the module docstring."""
    mask = np.asarray(mask)
    segments = segment_pixels(eigvecs, eigvals, mask.shape, cfg or SegmentConfig(), image=image, refine=refine)
    row = score_labels(segments, mask, boundary_tolerance=boundary_tolerance)
    out = {f"segments_{k}": v for k, v in row.items()}
    out["segments_count"] = float(segments.max() + 1)
    return out
