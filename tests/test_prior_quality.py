"""Metrics of priors against masks, each on a case small enough to compute by hand."""

import math

import numpy as np
import pytest
import torch

from sazs.eval import prior_quality as pq


def test_iou_and_accuracy_by_hand():
    pred = np.array([[1, 1, 0, 0]], bool)
    truth = np.array([[1, 0, 0, 0]], bool)
    assert pq.iou(pred, truth) == 0.5
    assert pq.accuracy(pred, truth) == 0.75
    valid = np.array([[1, 0, 1, 1]], bool)  # the disagreeing pixel is not evaluated
    assert pq.iou(pred, truth, valid) == 1.0
    assert pq.accuracy(pred, truth, valid) == 1.0
    assert math.isnan(pq.iou(pred, np.zeros_like(truth)))  # no object: undefined, not 0


def test_max_fbeta_by_hand():
    soft = np.array([0.9, 0.8, 0.1, 0.0])
    truth = np.array([1, 0, 1, 0], bool)
    # top 1: P=1, R=1/2 -> 1.3*.5/(.3+.5) = 0.8125; top 2: 0.5; top 3: P=2/3, R=1 -> 0.7222; all: 0.5652
    assert pq.max_fbeta(soft, truth) == pytest.approx(0.8125)
    assert pq.max_fbeta(soft, truth, beta2=1.0) == pytest.approx(0.8)  # F1 of the top 3: 2*(2/3)/(5/3)
    assert pq.max_fbeta(-soft, truth) == pytest.approx(1.3 * 0.5 / (0.3 * 0.5 + 1))  # all four predicted
    assert pq.max_fbeta(soft, truth, np.array([1, 0, 1, 1], bool)) == pytest.approx(1.0)  # 0.8 ignored
    assert math.isnan(pq.max_fbeta(soft, np.zeros(4, bool)))


def test_span_projection_by_hand():
    ones = np.ones((1, 4), np.float32)
    a = np.array([[1, 1, 1, -1]], np.float32)
    vecs = torch.from_numpy(np.stack([ones, a]))  # (2, 1, 4)
    inside = np.array([[[1, 1, 1, 0]]], np.float32)  # in the span: reproduced exactly
    np.testing.assert_allclose(pq.span_projection(vecs, inside), inside, atol=1e-6)
    # e0 on span{1, a}: 1/4 + (0.5/3)(.5, .5, .5, -1.5) = (1/3, 1/3, 1/3, 0)
    outside = np.array([[[1, 0, 0, 0]]], np.float32)
    np.testing.assert_allclose(pq.span_projection(vecs, outside)[0, 0], [1 / 3, 1 / 3, 1 / 3, 0], atol=1e-6)


def _two_by_four():
    v0 = np.ones((2, 4))
    v1 = np.array([[1, 1, -1, -1], [1, 1, -1, -1]], float)  # minority-positive: left half
    v2 = np.array([[1, -1, -1, -1], [-1, -1, -1, -1]], float)
    return np.stack([v0, v1, v2]).astype(np.float32)


def test_score_image_single_object():
    mask = np.array([[255, 255, 0, 0], [255, 255, 0, 0]], np.uint8)  # any non-zero is the object ...
    mask[0, 0] = 1  # ... except 255, which is not evaluated
    vecs = _two_by_four()
    row = pq.score_image(vecs, np.where(mask == 255, 7, mask).astype(np.uint8))
    assert row["fiedler_iou"] == 1.0 and row["fiedler_accuracy"] == 1.0 and row["fiedler_max_fbeta"] == 1.0
    assert row["best_of_n_iou_upper_bound"] == 1.0 and row["best_of_n_index"] == 1
    assert row["span_iou"] == 1.0
    # 255 pixels are ignored: only (0,0) counts as object; v2 > 0 is exactly that pixel
    row = pq.score_image(vecs, mask)
    assert row["fiedler_iou"] == 1.0  # {v1 > 0} & valid = {(0,0)}
    assert row["fiedler_accuracy"] == 1.0
    # a mask on the right half: v1 > 0 misses it entirely (the sign convention, not the mask, picks the side)
    right = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.uint8)
    row = pq.score_image(vecs, right, n_best=2)
    assert row["fiedler_iou"] == 0.0 and row["fiedler_accuracy"] == 0.0
    assert row["best_of_n_iou_upper_bound"] == pytest.approx(0.0)
    assert row["span_iou"] == 1.0  # the span still holds it (1 - left half)


def test_score_image_upsamples_the_grid():
    grid = np.stack([np.ones((2, 2)), np.array([[1, -1], [1, -1]])]).astype(np.float32)
    mask = np.zeros((4, 4), np.uint8)
    mask[:, :2] = 1  # bilinear: columns 1, .5, -.5, -1 -> left half positive
    row = pq.score_image(grid, mask)
    assert row["fiedler_iou"] == 1.0 and row["span_iou"] == 1.0
    with pytest.raises(ValueError, match="needs the image"):
        pq.score_image(grid, mask, refine="guided")
    with pytest.raises(ValueError, match="unknown refinement"):
        pq.score_image(grid, mask, refine="crf")


def test_covering_by_hand():
    segments = np.array([[1, 1, 0, 0]])
    gt = np.array([[0, 0, 0, 1]])
    cover = pq.covering_scores(segments, gt, np.ones_like(gt, bool))
    # class 0 {0,1,2}: best with segment 1 {0,1}: 2/3; class 1 {3}: with segment 0 {2,3}: 1/2
    assert cover == {0: (pytest.approx(2 / 3), 3), 1: (pytest.approx(0.5), 1)}
    vecs = np.stack([np.ones((1, 4)), np.array([[1, 1, -1, -1]])]).astype(np.float32)
    row = pq.score_image(vecs, gt.astype(np.uint8), label_map=True, n_best=1)
    assert row["covering"] == pytest.approx((3 * 2 / 3 + 0.5) / 4)
    assert row["mean_best_iou"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert row["class_best_iou/0"] == pytest.approx(2 / 3) and row["class_best_iou/1"] == pytest.approx(0.5)


def test_sign_partition_matches_preview():
    from sazs.stores.preview import eigen_segments

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, 6, 7))
    np.testing.assert_array_equal(pq.sign_partition(vecs, 3), eigen_segments(vecs, 3))


def test_boundary_recall_by_hand():
    gt = np.zeros((6, 6), np.uint8)
    gt[:, 3:] = 1  # edge pixels: column 2
    pred = np.zeros((6, 6), np.int64)
    pred[:, 1:] = 1  # edge pixels: column 0, two pixels away
    edges_gt, edges_pred = pq.label_edges(gt), pq.label_edges(pred)
    assert edges_gt[:, 2].all() and edges_gt.sum() == 6
    assert pq.boundary_match(edges_pred, edges_gt, 1.0) == (0.0, 0.0)
    assert pq.boundary_match(edges_pred, edges_gt, 2.0) == (1.0, 1.0)
    both = pred.copy()
    both[:, 3:] = 2  # edges at columns 0 and 2: all gt found, half the predicted edges right
    assert pq.boundary_match(pq.label_edges(both), edges_gt, 1.0) == (1.0, 0.5)
    # ignored pixels: an edge next to an ignored pixel does not count
    ignored = gt.copy()
    ignored[:, 3] = 255
    assert not pq.label_edges(ignored, ignored != 255).any()


def test_score_image_label_map_boundaries_and_span():
    gt = np.zeros((6, 6), np.uint8)
    gt[:, 3:] = 1
    gt[0, 0] = 255
    v1 = np.where(np.arange(6) < 3, 1.0, -1.0)[None].repeat(6, 0)
    vecs = np.stack([np.ones((6, 6)), v1]).astype(np.float32)
    row = pq.score_image(vecs, gt, label_map=True, n_best=1, boundary_tolerance=1)
    assert row["boundary_recall"] == 1.0 and row["boundary_precision"] == 1.0
    assert row["covering"] == 1.0 and row["span_miou"] == 1.0


def test_summarise_skips_missing_and_nan():
    rows = [{"a": 1.0, "best_of_n_index": 3.0}, {"a": 3.0, "b": math.nan}, {"b": 2.0}]
    assert pq.summarise(rows) == {"num_images": 3.0, "a": 2.0, "b": 2.0}
