from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
from skimage import data

from sazs.pipeline.graph import Graph, GraphConfig, build_knn_graph, knn, patch_colors

GRID = (30, 40)


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def image_features(image: np.ndarray, grid=GRID) -> np.ndarray:
    """Real-ish patch features: centred mean/std colour and position, L2-normalised.

    Centring makes about half of the cosines negative, like ViT keys.
    """
    h, w = grid
    mean = patch_colors(image, grid)
    sq = patch_colors(((image / 255.0) ** 2 * 255).astype(np.uint8), grid)
    std = np.sqrt(np.clip(sq - mean**2, 0, None))
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    f = np.concatenate([mean, 2 * std, 0.5 * x.reshape(-1, 1), 0.5 * y.reshape(-1, 1)], axis=1)
    return normalise(f - f.mean(0))


def random_features(n=1200, d=32, seed=0, positive=False) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return normalise(np.abs(x) if positive else x)


def check_invariants(g: Graph) -> None:
    W = g.W
    assert sp.issparse(W) and W.format == "csr"
    assert W.dtype in (np.float32, np.float64)
    assert abs(W - W.T).max() == 0
    assert np.all(W.diagonal() == 0)
    assert W.data.min() > 0
    np.testing.assert_allclose(g.degrees, np.asarray(W.sum(axis=1)).ravel())


def assert_same_neighbours_up_to_ties(x, idx_a, idx_b, sims_fn, atol=1e-5):
    """Rows may differ only by neighbours whose score (higher = nearer) ties the k-th score."""
    for i in np.flatnonzero((np.sort(idx_a, 1) != np.sort(idx_b, 1)).any(1)):
        a, b = set(idx_a[i]), set(idx_b[i])
        kth = min(sims_fn(i, list(a)).min(), sims_fn(i, list(b)).min())
        assert np.all(np.abs(sims_fn(i, list(a ^ b)) - kth) <= atol), f"row {i}: {a ^ b}"


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_invariants_and_threshold(backend):
    f = random_features()
    g = build_knn_graph(f, GraphConfig(k=10, backend=backend), grid=GRID)
    check_invariants(g)
    assert g.grid == GRID
    cos = f.astype(np.float64) @ f.T.astype(np.float64)
    rows, cols = g.W.nonzero()
    np.testing.assert_allclose(g.W.data, cos[rows, cols], atol=1e-6)  # W = cos on its edges
    assert (cos[rows, cols] > 0).all()
    # Raising the threshold only removes edges, and exactly those <= threshold.
    g2 = build_knn_graph(f, GraphConfig(k=10, backend=backend, threshold=0.3), grid=GRID)
    assert g2.W.data.min() > 0.3
    assert (g2.W - g.W.multiply(g.W > 0.3)).count_nonzero() == 0


def test_at_least_k_neighbours_when_similarities_positive():
    f = random_features(positive=True)
    g = build_knn_graph(f, GraphConfig(k=7), grid=GRID)
    check_invariants(g)
    assert np.diff(g.W.indptr).min() >= 7


def test_negative_cosines_never_enter():
    # Half the rows are -e1 + noise, half +e1 + noise: every cross cosine is negative,
    # and with k larger than a half each node must reach across; those edges are dropped.
    f = random_features(n=40, d=8, seed=1) * 0.1
    f[:20, 0] += 1
    f[20:, 0] -= 1
    g = build_knn_graph(normalise(f), GraphConfig(k=30), grid=(5, 8))
    check_invariants(g)
    assert g.W[:20, 20:].nnz == 0
    assert np.diff(g.W.indptr).min() == 19


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_backends_agree_on_random_features(metric):
    x = random_features(n=1500, d=24, seed=3)
    sa, ia = knn(x, 12, metric=metric, backend="faiss")
    sb, ib = knn(x, 12, metric=metric, backend="torch")
    assert not (ia == np.arange(len(x))[:, None]).any()
    np.testing.assert_allclose(sa, sb, atol=1e-5)
    x64 = x.astype(np.float64)
    score = (lambda i, j: x64[j] @ x64[i]) if metric == "ip" else (lambda i, j: -((x64[j] - x64[i]) ** 2).sum(1))
    assert_same_neighbours_up_to_ties(x, ia, ib, score)
    ga = build_knn_graph(x, GraphConfig(backend="faiss"), grid=(30, 50))
    gb = build_knn_graph(x, GraphConfig(backend="torch"), grid=(30, 50))
    assert abs(ga.W - gb.W).max() < 1e-6


def test_backends_agree_on_image_colour_features():
    image = data.astronaut()
    f = image_features(image)
    colors = patch_colors(image, GRID)
    x64 = f.astype(np.float64)
    _, ia = knn(f, 10, metric="ip", backend="faiss")
    _, ib = knn(f, 10, metric="ip", backend="torch")
    assert_same_neighbours_up_to_ties(f, ia, ib, lambda i, j: x64[j] @ x64[i])
    # Quantised colours on a regular grid tie exactly: compare up to ties there too.
    h, w = GRID
    y, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    c = np.concatenate([colors, 2 * xx.reshape(-1, 1), 2 * y.reshape(-1, 1)], 1).astype(np.float32)
    c64 = c.astype(np.float64)
    _, ia = knn(c, 10, metric="l2", backend="faiss")
    _, ib = knn(c, 10, metric="l2", backend="torch")
    assert_same_neighbours_up_to_ties(c, ia, ib, lambda i, j: -((c64[j] - c64[i]) ** 2).sum(1))
    for backend in ("faiss", "torch"):
        check_invariants(build_knn_graph(f, GraphConfig(backend=backend, color_weight=1.0), grid=GRID, colors=colors))


def test_colour_term():
    image = data.chelsea()
    f, colors = image_features(image), patch_colors(image, GRID)
    base = build_knn_graph(f, GraphConfig(), grid=GRID)
    one = build_knn_graph(f, GraphConfig(color_weight=1.0), grid=GRID, colors=colors)
    two = build_knn_graph(f, GraphConfig(color_weight=2.0), grid=GRID, colors=colors)
    check_invariants(one)
    Wc = (one.W - base.W).tocsr()
    assert Wc.nnz > 0 and Wc.data.min() > 0 and Wc.data.max() <= 1 + 1e-12
    assert abs((two.W - base.W) - 2 * Wc).max() < 1e-12  # linear in color_weight
    # With a large position weight the colour kNN links grid neighbours.
    near = build_knn_graph(f, GraphConfig(color_weight=1.0, xy_weight=100.0, color_k=4), grid=GRID, colors=colors)
    Wn = (near.W - base.W).tocoo()
    ri, ci = np.divmod(Wn.row, GRID[1])
    rj, cj = np.divmod(Wn.col, GRID[1])
    assert (np.abs(ri - rj) + np.abs(ci - cj)).max() <= 2
    with pytest.raises(ValueError, match="colors"):
        build_knn_graph(f, GraphConfig(color_weight=1.0), grid=GRID)
    with pytest.raises(ValueError, match="colors"):
        build_knn_graph(f, GraphConfig(color_weight=1.0), grid=GRID, colors=colors[:-1])


def test_isolated_nodes():
    f = random_features(n=60, d=8, seed=2, positive=True)
    f[7] = -np.abs(f[7]) - 1.0  # opposite of everyone: all its cosines are negative
    g = build_knn_graph(normalise(f), GraphConfig(k=5), grid=(6, 10))
    check_invariants(g)
    assert g.num_isolated == 1 and g.degrees[7] == 0
    # The colour term reconnects it.
    colors = np.random.default_rng(0).random((60, 3)).astype(np.float32)
    g = build_knn_graph(normalise(f), GraphConfig(k=5, color_weight=0.5), grid=(6, 10), colors=colors)
    assert g.num_isolated == 0


def test_validation(caplog):
    f = random_features(n=20, d=4)
    with pytest.raises(ValueError, match="grid"):
        build_knn_graph(f, GraphConfig(), grid=(4, 6))
    bad = f.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_knn_graph(bad, GraphConfig(), grid=(4, 5))
    with pytest.raises(ValueError, match="backend"):
        GraphConfig(backend="annoy")
    with pytest.raises(ValueError, match="threshold"):
        GraphConfig(threshold=-0.1)
    with caplog.at_level(logging.WARNING, logger="sazs.pipeline.graph"):
        g = build_knn_graph(f, GraphConfig(k=50), grid=(4, 5))
    assert "clamping k" in caplog.text
    check_invariants(g)
    assert np.diff(g.W.indptr).max() <= 19


def test_patch_colors():
    image = data.astronaut()  # 512 x 512: 16 x 16 pixel cells, so area average = block mean
    c = patch_colors(image, (32, 32))
    expected = image.reshape(32, 16, 32, 16, 3).mean(axis=(1, 3)).reshape(-1, 3) / 255.0
    assert c.dtype == np.float32 and c.shape == (1024, 3)
    np.testing.assert_allclose(c, expected, atol=1e-6)
    odd = patch_colors(data.coffee(), (23, 37))  # 400 x 600: cells straddle pixels
    assert odd.shape == (23 * 37, 3) and 0 <= odd.min() and odd.max() <= 1
    np.testing.assert_allclose(odd.mean(0), data.coffee().reshape(-1, 3).mean(0) / 255.0, atol=1e-6)
    with pytest.raises(ValueError):
        patch_colors(image[..., 0], (4, 4))
