"""Intersection / union accumulation, per-class IoU, mIoU and FB-IoU (eval/metrics.py)."""

import math

import numpy as np
import pytest
import torch

from sazs.core.metrics import EpisodeMeter, SegMeter, confusion_matrix, intersection_union


def test_confusion_and_iou_by_hand():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]  # the 255 pixel is dropped
    inter, union = intersection_union(torch.as_tensor(pred), torch.as_tensor(target), 3)
    assert inter.tolist() == [1, 3, 1] and union.tolist() == [3, 4, 2]
    m = SegMeter(3, class_names=["bg", "a", "b"])
    m.update(pred, target)
    np.testing.assert_allclose(m.iou(), [1 / 3, 3 / 4, 1 / 2])
    assert m.miou() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert m.miou([1, 2]) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m.pixel_accuracy() == pytest.approx(5 / 7)
    # FB-IoU, background vs {a, b}: bg inter 1, union 3; fg inter 3 + 1 (a->b counts as fg) = 4, union 6
    assert m.fb_iou() == pytest.approx((1 / 3 + 4 / 6) / 2)
    s = m.summary([1, 2])
    assert set(s["iou"]) == {"a", "b"}


def test_accumulates_sums_not_means_of_images():
    m = SegMeter(2)
    m.update(torch.tensor([1, 1]), torch.tensor([1, 1]))  # IoU 1 on image 1
    m.update(torch.tensor([0, 0, 0, 0, 0, 0]), torch.tensor([1, 1, 1, 1, 1, 1]))  # IoU 0 on image 2
    assert m.iou()[1] == pytest.approx(2 / 8)  # not (1 + 0) / 2


def test_absent_classes_are_nan_and_skipped():
    m = SegMeter(4)
    m.update(np.array([0, 1, 1]), np.array([0, 1, 1]))
    iou = m.iou()
    assert iou[0] == 1 and iou[1] == 1 and math.isnan(iou[2]) and math.isnan(iou[3])
    assert m.miou() == 1.0
    m.update(np.array([3]), np.array([0]))  # predicted but never present -> IoU 0
    assert m.iou()[3] == 0.0


def test_input_checks():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="predictions must lie in 0..1"):
        confusion_matrix(np.array([2]), np.array([0]), 2)
    with pytest.raises(ValueError, match="targets must lie"):
        confusion_matrix(np.array([0]), np.array([7]), 2)
    # an out-of-range prediction on an ignored pixel is fine
    assert confusion_matrix(np.array([9, 0]), np.array([255, 0]), 2).sum() == 1


def test_episode_meter_matches_hsnet_definition():
    m = EpisodeMeter(3)
    # episode 1 (class 0): 4 fg pixels, 2 predicted right, 1 false positive
    t1 = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 255]])
    p1 = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]])
    # episode 2 (class 2): perfect
    t2 = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])
    m.update(torch.stack([p1, t2]), torch.stack([t1, t2]), [0, 2])
    iou = m.iou()
    assert iou[0] == pytest.approx(2 / 5) and math.isnan(iou[1]) and iou[2] == 1.0
    assert m.miou([0, 2]) == pytest.approx((0.4 + 1) / 2)
    # FB-IoU of the summed counts: bg inter 2+6=8, union 5+6=11; fg inter 2+2=4, union 5+2=7
    assert m.fb_iou([0, 2]) == pytest.approx((8 / 11 + 4 / 7) / 2)
    assert m.episodes.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="class ids"):
        m.update(p1[None], t1[None], [5])
