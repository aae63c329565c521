"""The guided filter: exact on known cases, and it moves a coarse segment onto the image's edge."""

import numpy as np
import pytest

from sazs.quality.quality import iou, score_image
from sazs.segments.bilateral import bilateral_solve
from sazs.segments.pamr import PamrConfig, pamr
from sazs.segments.refine import (
    REFINERS,
    RefineConfig,
    box_mean,
    check_refine,
    guided_filter,
    list_refiners,
    refine_eigvecs,
    refine_labels,
    refine_mask,
    refine_probs,
    upsample_eigvecs,
)


def test_box_mean_matches_a_direct_window_mean():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 7, 9))
    r = 2
    want = np.empty_like(a)
    for i in range(7):
        for j in range(9):
            want[:, i, j] = a[:, max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1].mean((1, 2))
    np.testing.assert_allclose(box_mean(a, r), want, atol=1e-12)


@pytest.mark.parametrize("colour", [False, True])
def test_guided_filter_keeps_affine_functions_of_the_guide_and_is_linear(colour):
    rng = np.random.default_rng(1)
    guide = rng.random((12, 10, 3)) if colour else rng.random((12, 10))
    gray = guide.mean(-1) if colour else guide
    src = 2.0 * gray - 0.5  # an affine function of the guide: a ~ 2 wherever eps << variance
    out = guided_filter(guide, src, 2, 1e-9)
    np.testing.assert_allclose(out, src, atol=1e-5)
    p, q = rng.standard_normal((2, 12, 10))
    both = guided_filter(guide, np.stack([p, q, 3 * p - q]), 2, 1e-2)
    np.testing.assert_allclose(both[2], 3 * both[0] - both[1], atol=1e-10)


def _step_image(h=42, w=84, edge=38):
    image = np.full((h, w, 3), 40, np.uint8)
    image[:, edge:] = 210
    return image


@pytest.mark.parametrize("cfg", [RefineConfig(), RefineConfig(subsample=1), RefineConfig(color=False)])
def test_guided_refinement_follows_a_step_edge_better_than_bilinear(cfg):
    h, w, edge, patch = 42, 84, 38, 14
    image = _step_image(h, w, edge)
    # the object (bright, right of column 38) on a 3 x 6 grid of 14 px patches: patch 2 (columns
    # 28..41) is mostly dark, so the grid says "background" there and bilinear puts the zero
    # crossing half way between patch centres 34.5 and 48.5, 3.5 px off the edge.
    cols = np.array([-1, -1, -1, 1, 1, 1], np.float32)
    grid = np.stack([np.ones((3, 6), np.float32), np.repeat(cols[None], 3, 0)])
    truth = np.zeros((h, w), bool)
    truth[:, edge:] = True
    up = upsample_eigvecs(grid, (h, w)).numpy()
    refined = refine_eigvecs(up, image, cfg, grid=(3, 6))
    err = lambda v: np.abs(np.argmax(v[1][h // 2] > 0) - edge)  # noqa: E731
    assert err(up) >= 3
    assert err(refined) <= 1
    assert iou(refined[1] > 0, truth) > iou(up[1] > 0, truth)
    # through the benchmark's entry point: the refined Fiedler segment scores higher
    mask = truth.astype(np.uint8)
    plain = score_image(grid, mask)["fiedler_iou"]
    guided = score_image(grid, mask, image=image, refine="guided")["fiedler_iou"]
    assert guided > plain
    assert RefineConfig().radius is None and patch == w // 6


def test_refine_checks_its_inputs():
    image = _step_image()
    with pytest.raises(ValueError, match="upsample them first"):
        refine_eigvecs(np.zeros((2, 3, 6), np.float32), image)
    with pytest.raises(ValueError, match="uint8"):
        refine_eigvecs(np.zeros((2, 42, 84), np.float32), image.astype(np.float32))
    with pytest.raises(ValueError, match="radius"):
        RefineConfig(radius=0)


def test_fusion_upsampling_can_refine_with_the_image():
    image = _step_image()
    grid = np.stack([np.ones((3, 6)), np.repeat(np.array([[-1, -1, -1, 1, 1, 1]], float), 3, 0)]).astype(np.float32)
    plain = upsample_eigvecs(grid, (42, 84)).numpy()
    refined = upsample_eigvecs(grid, (42, 84), image=image, refine="guided").numpy()
    np.testing.assert_allclose(refined, refine_eigvecs(plain, image, grid=(3, 6)), atol=1e-6)
    assert not np.allclose(refined, plain)
    with pytest.raises(ValueError, match="needs the image"):
        upsample_eigvecs(grid, (42, 84), refine="guided")


# -- the registry of mask / label-map refiners ------------------------------------------------


def _object_scene(h=60, w=120, edge=50, seed=0):
    """A dark background, a bright object right of column ``edge``, mild noise; the grid's coarse
    mask (4 x 8 cells of 15 px) puts the object from column 45: 5 px off the edge."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 50.0)
    image[:, edge:] = (200, 160, 120)
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    coarse = np.zeros((4, 8), bool)
    coarse[:, 3:] = True
    truth = np.zeros((h, w), bool)
    truth[:, edge:] = True
    return image, coarse, truth


@pytest.mark.parametrize("name", ["guided", "bilateral", "pamr", "crf"])
def test_refine_mask_snaps_a_coarse_edge_onto_the_image_edge(name):
    if name == "crf":
        pytest.importorskip("pydensecrf.densecrf", reason="refinement 'crf' needs pydensecrf2")
    image, coarse, truth = _object_scene()
    plain = upsample_eigvecs(coarse[None].astype(np.float32), truth.shape).numpy()[0] > 0.5
    refined = refine_mask(coarse, image, name)
    assert refined.dtype == bool and refined.shape == truth.shape
    first = lambda m: int(np.argmax(m[30]))  # noqa: E731
    assert abs(first(plain) - 50) >= 4
    assert abs(first(refined) - 50) <= 1
    assert iou(refined, truth) > iou(plain, truth) + 0.03
    # a soft mask at the image's size is taken as it is
    soft = upsample_eigvecs(coarse[None].astype(np.float32), truth.shape).numpy()[0]
    np.testing.assert_array_equal(refine_mask(soft, image, name, grid=(4, 8)), refined)


def test_refine_labels_moves_every_border_onto_the_image():
    image, _, _ = _object_scene()
    image[30:, :50] = 120  # a third region: bottom left, grey
    coarse = np.zeros((4, 8), np.int64)
    coarse[:, 3:] = 1
    coarse[2:, :3] = 2
    truth = np.zeros((60, 120), np.int64)
    truth[:, 50:] = 1
    truth[30:, :50] = 2
    out = refine_labels(coarse, image, "guided")
    assert out.shape == (60, 120)
    assert (out == truth).mean() > 0.97
    plain = refine_labels(coarse, image, "bilateral")
    assert (plain == truth).mean() > 0.97


def test_the_registry_lists_its_refiners_and_names_them_in_errors():
    assert list_refiners() == REFINERS.names() == ["guided", "bilateral", "crf", "pamr"]
    assert all(REFINERS.entry(name).help for name in REFINERS)
    assert check_refine(None) is None and check_refine("pamr") == "pamr"
    with pytest.raises(ValueError, match=r"unknown refinement 'cfr'.*'guided', 'bilateral', 'crf', 'pamr'"):
        check_refine("cfr")
    image, coarse, _ = _object_scene()
    with pytest.raises(ValueError, match="differ in size"):
        refine_probs(np.zeros((1, 10, 10), np.float32), image, "guided")
    with pytest.raises(ValueError, match="guided filter only"):
        upsample_eigvecs(np.zeros((2, 4, 8), np.float32), (60, 120), image=image, refine="bilateral")


def test_bilateral_solver_keeps_constants_and_is_linear():
    image, _, _ = _object_scene(seed=2)
    rng = np.random.default_rng(0)
    p, q = rng.random((2, 60, 120))
    out = bilateral_solve(image, np.stack([np.full((60, 120), 0.7), p, q, 2 * p - q]))
    np.testing.assert_allclose(out[0], 0.7, atol=1e-3)
    np.testing.assert_allclose(out[3], 2 * out[1] - out[2], atol=1e-3)


def test_pamr_keeps_constants_and_stops_at_edges():
    image, _, truth = _object_scene()
    probs = np.stack([np.full((60, 120), 0.25), truth.astype(np.float32)])
    probs[1, :, 44:50] = 1.0  # a band spilled 6 px onto the background
    out = pamr(image, probs, PamrConfig(num_iter=20))
    np.testing.assert_allclose(out[0], 0.25, atol=1e-5)
    assert out[1][:, 44:50].mean() < 0.5 and out[1][:, 60:].mean() > 0.95
