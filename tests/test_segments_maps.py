"""Segment maps from eigenvectors: known partitions recovered, small pieces merged, pixels placed."""

import numpy as np
import pytest

from sazs.quality.quality import covering_scores
from sazs.quality.report import format_markdown
from sazs.quality.scoring import build_report, score_store
from sazs.quality.segment_scores import SEGMENT_KEYS, score_segments
from sazs.segments.maps import (
    SegmentConfig,
    eigengap_k,
    kmeans,
    labels_to_pixels,
    merge_small,
    segment_grid,
    segment_map,
    segment_pixels,
)
from sazs.stores.preview import segment_labels


def _regions(h=12, w=18):
    """Three regions: the left third, the top and the bottom of the right two thirds."""
    truth = np.zeros((h, w), np.int64)
    truth[: h // 2, w // 3 :] = 1
    truth[h // 2 :, w // 3 :] = 2
    return truth


def _spectrum(truth, noise=0.02, seed=0, k=8):
    """Eigenvectors whose span holds the regions' indicators: u0 ~ constant, v1..v_{r-1} the
    indicators' orthonormal contrasts (Gram-Schmidt against u0) for r regions, then small noise
    vectors; eigenvalues small up to r - 1, then a wide gap."""
    rng = np.random.default_rng(seed)
    n, r = truth.size, int(truth.max()) + 1
    cols = [np.ones(n)] + [(truth.ravel() == c).astype(float) for c in range(1, r)]
    cols += [rng.standard_normal(n) for _ in range(k - r)]
    q, _ = np.linalg.qr(np.stack(cols, 1))
    vecs = q.T * np.sign(q[0, :])[:, None]
    vecs[1:r] += noise * rng.standard_normal((r - 1, n))
    vecs[r:] *= 0.05  # the higher vectors: small, carry no region
    vals = np.concatenate([0.01 * np.arange(r), 0.6 + 0.05 * np.arange(k - r)])
    return vecs.reshape(k, *truth.shape).astype(np.float32), vals


def _same_partition(a, b):
    """One-to-one label correspondence between two label maps."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("scale", ["none", "degree", "normalise"])
def test_three_regions_are_recovered_with_k_fixed(scale):
    truth = _regions()
    vecs, vals = _spectrum(truth)
    labels = segment_grid(vecs, vals, SegmentConfig(num_vectors=2, num_segments=3, scale=scale))
    assert _same_partition(labels, truth)


def test_the_eigengap_chooses_three_and_recovers_the_regions():
    truth = _regions()
    vecs, vals = _spectrum(truth)
    assert eigengap_k(vals, 7) == 3
    labels = segment_grid(vecs, vals, SegmentConfig(num_vectors=2, num_segments=None))
    assert _same_partition(labels, truth)
    with pytest.raises(ValueError, match="eigengap"):
        segment_grid(vecs, None, SegmentConfig(num_segments=None))


def test_a_region_split_in_two_pieces_becomes_two_segments():
    # one cluster (label 0) in two separate pieces: connected components make two segments
    truth = np.zeros((10, 20), np.int64)
    truth[:, 7:13] = 1
    vecs, vals = _spectrum(np.where(truth == 1, 1, 0), noise=0.0)
    labels = segment_grid(vecs, vals, SegmentConfig(num_vectors=1, num_segments=2, min_size=0.0))
    assert len(np.unique(labels)) == 3
    assert labels[0, 0] != labels[0, -1]


def test_merge_small_folds_a_stray_cell_into_its_surroundings():
    labels = np.zeros((8, 8), np.int64)
    labels[:, 4:] = 1
    labels[2, 1] = 1  # a one-cell island inside region 0
    merged = merge_small(labels, min_cells=2)
    assert len(np.unique(merged)) == 2
    assert merged[2, 1] == merged[0, 0]
    assert _same_partition(merged[:, 4:], np.zeros((8, 4)))


def test_kmeans_is_deterministic_and_separates_blobs():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(c, 0.05, (30, 2)) for c in ((0, 0), (1, 0), (0, 1))])
    a, b = kmeans(x, 3, seed=1), kmeans(x, 3, seed=1)
    np.testing.assert_array_equal(a, b)
    assert _same_partition(a, np.repeat(np.arange(3), 30))


def test_k_means_beats_the_sign_cells_when_the_background_hovers_around_zero():
    # the object's vector is large on the object and ~0 with random signs elsewhere: its sign
    # cuts the background in pieces, k-means on the rows keeps it whole
    truth = np.zeros((12, 16), np.int64)
    truth[3:9, 4:10] = 1
    vecs, vals = _spectrum(truth, noise=0.0)
    rng = np.random.default_rng(5)
    for k in (2, 3, 4):  # vectors 2..4: noise around 0
        vecs[k] = 0.02 * rng.standard_normal(truth.shape)
    valid = np.ones(truth.shape, bool)

    def covering(seg):
        cover = covering_scores(seg, truth, valid)
        return sum(b * n for b, n in cover.values()) / truth.size

    ours = segment_grid(vecs, vals, SegmentConfig(num_vectors=4, num_segments=2))
    assert covering(ours) > 0.99
    assert covering(segment_labels(vecs, 4)) < 0.5


def test_labels_to_pixels_places_borders_between_patch_centres():
    labels = np.array([[0, 0, 1, 1]])
    up = labels_to_pixels(labels, (4, 16))  # 4 px patches
    assert up.shape == (4, 16)
    np.testing.assert_array_equal(up[0], [0] * 8 + [1] * 8)


def test_segment_pixels_and_segment_map_from_a_store_like_object():
    truth = _regions()
    vecs, vals = _spectrum(truth)
    cfg = SegmentConfig(num_vectors=2, num_segments=3)
    pix = segment_pixels(vecs, vals, (24, 36), cfg)
    assert pix.shape == (24, 36)
    assert _same_partition(pix, np.kron(truth, np.ones((2, 2), np.int64)))

    class Prior:
        eigvecs, eigvals, image_size, grid = vecs, vals, (24, 36), truth.shape

    class Store:
        def get(self, id_):
            assert id_ == "a/b"
            return Prior()

    np.testing.assert_array_equal(segment_map(Store(), "a/b", cfg), pix)


def test_segment_pixels_refined_with_the_image_snaps_to_its_edge():
    # regions split at column 14 of a 3 x 6 grid of 7 px patches (columns 0..41): the grid puts
    # the border at a patch boundary (column 14 -> between patch centres 10.5 and 17.5), the
    # image's edge is at column 17: refinement moves the border onto it
    vecs, vals = _spectrum(np.repeat(np.array([[0, 0, 1, 1, 1, 1]]), 3, 0), noise=0.0)
    image = np.full((21, 42, 3), 30, np.uint8)
    image[:, 17:] = 220
    cfg = SegmentConfig(num_vectors=1, num_segments=2)
    plain = segment_pixels(vecs, vals, (21, 42), cfg)
    refined = segment_pixels(vecs, vals, (21, 42), cfg, image=image, refine="guided")
    edge = lambda lab: int(np.argmax(lab[10] != lab[10, 0]))  # noqa: E731
    assert abs(edge(plain) - 17) >= 3
    assert abs(edge(refined) - 17) <= 1


def test_config_errors_name_the_choices():
    with pytest.raises(ValueError, match="normalise"):
        SegmentConfig(scale="cosine")
    with pytest.raises(ValueError, match="num_vectors"):
        SegmentConfig(num_vectors=0)


def test_score_segments_covers_known_regions():
    truth = _regions()
    vecs, vals = _spectrum(truth)
    mask = np.kron(truth, np.ones((2, 2), np.int64)).astype(np.uint8)
    mask[0, 0] = 255  # ignored
    row = score_segments(vecs, vals, mask, cfg=SegmentConfig(num_vectors=2, num_segments=3))
    assert row["segments_covering"] == pytest.approx(1.0)
    assert row["segments_mean_best_iou"] == pytest.approx(1.0)
    assert row["segments_boundary_recall"] == pytest.approx(1.0)
    assert row["segments_count"] == 3.0


def test_sazs_eval_priors_scores_the_segment_maps_beside_the_sign_cells():
    truth = np.repeat(np.repeat(np.arange(5), 4)[None], 10, 0)  # five stripes: the default k
    vecs, vals = _spectrum(truth)
    mask = np.kron(truth, np.ones((2, 2), np.int64)).astype(np.uint8)

    class Prior:
        eigvecs, eigvals, image_size, grid = vecs, vals, mask.shape, truth.shape

    class Store:
        ids, url = ["x"], "mem://s"

        def get(self, id_):
            return Prior()

    class Dataset:
        ids = ["x"]

        def load_mask(self, id_):
            return mask

    out = score_store(Store(), Dataset(), label_map=True)
    row = out["rows"]["bilinear"][0]
    assert {"covering", *SEGMENT_KEYS} <= set(row)
    assert row["segments_covering"] == pytest.approx(1.0)
    report = build_report({"s": out}, dataset={}, label_map=True, class_names=list("abcde"), n_best=4)
    assert "segments covering" in format_markdown(report)
