"""GT-free object masks (segments/objects.py) and TokenCut's recipe (segments/tokencut.py) on
synthetic patch features whose object is known: the eigenvectors come from the pipeline's own
graph and solver, so the sign convention, the degree scaling and the noise are real."""

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from sazs.pipeline.graph import GraphConfig, build_graph
from sazs.pipeline.spectral import SpectralConfig, laplacian_eigs
from sazs.segments.objects import (
    ObjectConfig,
    border_ratios,
    encode_mask_png,
    object_mask,
    object_mask_grid,
    prior_object_mask,
)
from sazs.segments.tokencut import TokenCutConfig, mask_from_vector, tokencut_mask, tokencut_vector
from sazs.stores.reader import Prior

H, W = 24, 32


def _features(labels, *, seed=0, dim=16, noise=0.35):
    """Unit feature rows (h*w, dim): one random direction per label, plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((int(labels.max()) + 1, dim))
    f = centres[labels.ravel()] + noise * rng.standard_normal((labels.size, dim))
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def _spectrum(labels, **kw):
    feats = _features(labels, **kw)
    spec = laplacian_eigs(build_graph(feats, GraphConfig(), grid=labels.shape), SpectralConfig(num_eigs=8))
    return np.asarray(spec.eigvecs).T.reshape(8, *labels.shape), np.asarray(spec.eigvals)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _background(kind="halves"):
    """A background that fills the frame: two textures, left and right, both on the border."""
    labels = np.zeros((H, W), np.int64)
    if kind == "halves":
        labels[:, W // 2 :] = 1
    return labels


def test_an_object_off_centre_is_found():
    labels = _background()
    labels[3:11, 4:12] = 2  # top left, inside the frame
    vecs, _ = _spectrum(labels)
    got = object_mask_grid(vecs)
    assert _iou(got, labels == 2) > 0.9
    assert not got[labels != 2].any()


def test_an_object_larger_than_half_the_image_is_the_object_not_the_minority():
    labels = np.zeros((H, W), np.int64)
    labels[2:-2, 3:-3] = 1  # 20 x 26 = 68 % of the grid; the background is the frame around it
    vecs, _ = _spectrum(labels)
    assert (labels == 1).mean() > 0.5
    got = object_mask_grid(vecs)
    assert _iou(got, labels == 1) > 0.9
    # the minority rule of the Fiedler vector names the frame here
    fiedler = vecs[1] > 0
    assert _iou(fiedler, labels == 1) < 0.5


def test_the_sign_of_the_vectors_does_not_matter():
    labels = _background()
    labels[12:20, 18:28] = 2
    vecs, _ = _spectrum(labels, seed=1)
    flipped = vecs.copy()
    flipped[1:] *= -1  # the object now on the negative side of every vector
    a, b = object_mask_grid(vecs), object_mask_grid(flipped)
    assert _iou(a, labels == 2) > 0.9
    np.testing.assert_array_equal(a, b)


def test_two_objects_are_both_kept():
    labels = _background()
    labels[3:10, 4:11] = 2
    labels[14:21, 20:28] = 3
    vecs, _ = _spectrum(labels, seed=2)
    got = object_mask_grid(vecs)
    assert _iou(got, labels >= 2) > 0.85
    assert got[labels == 2].mean() > 0.9 and got[labels == 3].mean() > 0.9


def test_no_object_gives_an_empty_mask():
    # four textures, one per quadrant: each holds a quarter of the border and a quarter of the image
    labels = np.zeros((H, W), np.int64)
    labels[: H // 2, W // 2 :], labels[H // 2 :, : W // 2], labels[H // 2 :, W // 2 :] = 1, 2, 3
    vecs, _ = _spectrum(labels, seed=3)
    assert not object_mask_grid(vecs).any()
    # the same image with an object in it: found
    labels[8:16, 10:22] = 4
    vecs, _ = _spectrum(labels, seed=3)
    assert _iou(object_mask_grid(vecs, ObjectConfig(num_clusters=5)), labels == 4) > 0.9


def test_border_ratios_by_hand():
    labels = np.zeros((5, 5), np.int64)
    labels[1:4, 1:4] = 1  # inside: never on the border
    labels[0, 0] = 2  # one corner cell
    r = border_ratios(labels, 3)
    # 16 border cells: 15 of label 0, 1 of label 2; areas 15/25, 9/25, 1/25
    np.testing.assert_allclose(r, [(15 / 16) / (15 / 25), 0.0, (1 / 16) / (1 / 25)])


def test_object_mask_at_pixels_and_with_refinement():
    labels = _background()
    labels[6:14, 10:20] = 2
    vecs, vals = _spectrum(labels, seed=4)
    size = (H * 8, W * 8)
    truth = np.kron(labels == 2, np.ones((8, 8), bool))
    plain = object_mask(vecs, size)
    assert plain.shape == size and plain.dtype == bool and _iou(plain, truth) > 0.9
    image = np.where(truth[..., None], np.uint8(220), np.uint8(40)).repeat(3, 2).astype(np.uint8)
    refined = object_mask(vecs, size, image=image, refine="guided")
    assert refined.shape == size and _iou(refined, truth) >= _iou(plain, truth) - 0.01
    with pytest.raises(ValueError, match="needs the image"):
        object_mask(vecs, size, refine="guided")
    prior = Prior(id="x", eigvals=vals, eigvecs=vecs, residuals=np.zeros(8), grid=(H, W), image_size=(50, 70))
    assert prior_object_mask(prior).shape == (50, 70)


def test_config_is_checked():
    with pytest.raises(ValueError, match="num_clusters"):
        ObjectConfig(num_clusters=1)
    with pytest.raises(ValueError, match="max_border_ratio"):
        ObjectConfig(max_border_ratio=0)
    with pytest.raises(ValueError, match="K >= 2"):
        object_mask_grid(np.zeros((1, 5, 5)))


def test_encode_mask_png(tmp_path):
    m = np.zeros((5, 7), bool)
    m[1:3, 2:5] = True
    (tmp_path / "m.png").write_bytes(encode_mask_png(m))
    img = Image.open(tmp_path / "m.png")
    assert img.mode == "L" and img.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(img), np.where(m, 255, 0))


# ----------------------------------------------------------------------------- TokenCut


def test_tokencut_vector_is_the_dense_generalised_eigenvector():
    labels = _background()[:12, :16]
    labels[3:8, 4:9] = 2
    feats = _features(labels, seed=5)
    cfg = TokenCutConfig(tau=0.2)
    v = tokencut_vector(feats, cfg)
    # TokenCut's own solve: eigh(D - A, D), the second smallest
    f = feats.astype(np.float64)
    a = np.where(f @ f.T > cfg.tau, 1.0, cfg.eps)
    d = np.diag(a.sum(1))
    _, ref = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 1])
    ref = ref[:, 0]
    cos = abs(v @ ref) / np.linalg.norm(v) / np.linalg.norm(ref)
    assert cos > 1 - 1e-6


def test_tokencut_mask_finds_the_object_and_tau_matters():
    labels = _background()
    labels[4:12, 18:26] = 2
    feats = _features(labels, seed=6, noise=0.2)
    got = tokencut_mask(feats, labels.shape)
    assert _iou(got, labels == 2) > 0.9
    # every cosine above tau: the binary graph is complete and carries no structure
    flat = tokencut_mask(feats, labels.shape, TokenCutConfig(tau=-1.0))
    assert _iou(flat, labels == 2) < 0.9


def test_tokencut_seed_side_and_component():
    v = np.zeros((6, 8))
    v[1:3, 1:3] = -1.0  # the seed: largest |v|, on the negative side
    v[1:3, 5:7] = -0.5  # same side, another component
    v[4:, :] = 0.3
    got = mask_from_vector(v)
    want = np.zeros_like(got)
    want[1:3, 1:3] = True
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError):
        TokenCutConfig(eps=0)
