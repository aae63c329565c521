"""Boundary F-score, weighted episode accumulation and the harmonic mean, checked by hand (eval/metrics.py)."""

import math

import numpy as np
import pytest
import torch

from sazs.core.metrics import (
    BoundaryMeter,
    EpisodeMeter,
    SegMeter,
    boundary_counts,
    boundary_tolerance_px,
    harmonic_mean,
    mask_boundary,
)


def square(h=8, w=10, top=2, left=2, size=4):
    m = np.zeros((h, w), np.int64)
    m[top : top + size, left : left + size] = 1
    return m


def test_mask_boundary_is_the_inner_ring_and_ignores_the_frame():
    ring = mask_boundary(square())
    assert ring.sum() == 12  # 4x4 square minus its 2x2 inside
    assert not ring[3:5, 3:5].any() and ring[2, 2:6].all() and ring[5, 2:6].all()
    assert not mask_boundary(np.ones((5, 6))).any()  # the image border is not an edge
    left = np.zeros((5, 6), bool)
    left[:, :2] = True
    assert mask_boundary(left).sum() == 5 and mask_boundary(left)[:, 1].all()  # only the side facing the image


def test_boundary_counts_by_hand():
    # ground truth: 4x4 square at columns 2..5; prediction: the same square two columns to the right.
    # Within 1 px: predicted ring row 2 -> cols 4, 5 (on the truth), 6 (1 px away) match, col 7 (2 px) does not;
    # same on row 5; rows 3-4 -> col 4 matches (1 px from col 5), col 7 does not: 3 + 3 + 1 + 1 = 8 of 12.
    # The truth's ring matches the prediction symmetrically: 8 of 12.
    target, pred = square(), square(left=4)
    assert boundary_counts(pred, target, tolerance=1).tolist() == [8, 12, 8, 12]
    assert boundary_counts(pred, target, tolerance=2).tolist() == [12, 12, 12, 12]
    assert boundary_counts(target, target, tolerance=1).tolist() == [12, 12, 12, 12]
    # Ignored pixels: predicted boundary pixels on them are not counted (column 7 holds the 4 unmatched ones)
    ignored = target.copy()
    ignored[:, 7] = 255
    assert boundary_counts(pred, ignored, tolerance=1).tolist() == [8, 8, 8, 12]
    # ...but they still match ground-truth edges: a prediction whose edge lies inside an ignore band
    band = target.copy()
    band[1, 2:6] = 255  # a VOC-like band above the square
    grown = target.copy()
    grown[1, 2:6] = 1  # prediction reaches into the band
    pm, pt, gm, gt = boundary_counts(grown, band, tolerance=1)
    assert gt == 12 and gm == 12 and pt == 10 and pm == 10  # row 1 (in the band) is not counted as prediction
    # nothing predicted, something there: F = 0; nothing anywhere: no boundary at all
    assert boundary_counts(np.zeros_like(target), target, tolerance=1).tolist() == [0, 0, 0, 12]
    assert boundary_counts(np.zeros_like(target), np.zeros_like(target), tolerance=1).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="shape"):
        boundary_counts(np.zeros((2, 2)), np.zeros((2, 3)))


def test_tolerance_pixels_or_fraction_of_the_diagonal():
    assert boundary_tolerance_px(3, (10, 10)) == 3
    assert boundary_tolerance_px(0.008, (300, 400)) == 4  # ceil(0.008 * 500)
    assert boundary_tolerance_px(0.001, (30, 40)) == 1  # rounded up to a pixel
    with pytest.raises(ValueError, match="> 0"):
        boundary_tolerance_px(0, (3, 3))


def test_boundary_meter_sums_counts_per_class():
    m = BoundaryMeter(3, tolerance=1)
    m.update(square(left=4), square(), 0)  # [8, 12, 8, 12]
    m.add(0, [12, 12, 0, 12])  # second episode of class 0: precise but misses everything
    m.update(square(), square(), 2)
    f = m.f_score()
    p, r = 20 / 24, 8 / 24
    assert f[0] == pytest.approx(2 * p * r / (p + r)) and math.isnan(f[1]) and f[2] == 1.0
    assert m.mean_f([0, 2]) == pytest.approx((f[0] + 1) / 2)
    assert m.mean_f([1]) != m.mean_f([1])  # NaN: class without boundaries
    prec, rec = m.precision_recall()
    assert prec[0] == pytest.approx(p) and rec[0] == pytest.approx(r)
    m.add(1, [0, 0, 0, 5])  # only the truth has edges: F = 0
    assert m.f_score()[1] == 0.0
    with pytest.raises(ValueError, match="class ids"):
        m.add(3, [0, 0, 0, 0])


def test_boundary_meter_semantic_maps():
    target = np.zeros((8, 10), np.int64)
    target[2:6, 2:6] = 1
    target[0, :] = 255
    pred = target.copy()
    pred[0, :] = 0
    m = BoundaryMeter(3, tolerance=1)
    m.update_semantic(pred, target)
    f = m.f_score()
    assert f[1] == 1.0 and math.isnan(f[2])  # class 2 neither predicted nor present
    assert not math.isnan(f[0])  # background edges are scored too (the outline of the square)


def test_weighted_add_equals_repeated_updates():
    t = torch.tensor([[1, 1, 0, 255]])
    p = torch.tensor([[1, 0, 1, 1]])
    a, b = EpisodeMeter(2), EpisodeMeter(2)
    for _ in range(3):
        a.update(p, t, [1])
    from sazs.core.metrics import intersection_union

    inter, union = intersection_union(p, t, 2)
    b.add(1, inter, union, 3)
    assert torch.equal(a.intersection, b.intersection) and torch.equal(a.union, b.union)
    assert a.episodes.tolist() == b.episodes.tolist() == [0, 3]
    with pytest.raises(ValueError, match="class ids"):
        b.add(2, inter, union)


def test_harmonic_mean():
    assert harmonic_mean(0.5, 0.25) == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(float("nan"), 0.3))


def test_generalised_seen_unseen_by_hand():
    # classes 0 (bg), 1 (seen), 2 (unseen); seen mIoU counts background
    m = SegMeter(3)
    m.update(np.array([0, 0, 1, 1, 2, 1]), np.array([0, 0, 1, 1, 2, 2]))
    iou = m.iou()
    assert iou.tolist() == [1.0, pytest.approx(2 / 3), 0.5]
    seen, unseen = m.miou([0, 1]), m.miou([2])
    assert seen == pytest.approx(5 / 6) and unseen == 0.5
    assert harmonic_mean(seen, unseen) == pytest.approx(2 * (5 / 6) * 0.5 / (5 / 6 + 0.5))
