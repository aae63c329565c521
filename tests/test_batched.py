"""Batched kNN + batched eigensolver on numpy/torch CPU (the code the GPU runs with cupy)."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
from skimage import data
from test_graph import (
    GRID,
    assert_same_neighbours_up_to_ties,
    image_features,
    normalise,
    random_features,
    real_vit_features,
)
from test_spectral import assert_matches_reference, assert_well_formed

from sazs.pipeline import ell_operator
from sazs.pipeline.batched_solver import _orthonormalise, batched_eigs
from sazs.pipeline.ell import ell_from_csr, ell_from_graphs, ell_graph, ell_to_csr
from sazs.pipeline.graph import GraphConfig, build_knn_graph, build_knn_graphs, patch_colors
from sazs.pipeline.knn import knn
from sazs.pipeline.knn_batched import batched_knn
from sazs.pipeline.laplacian import degrees, fix_signs, num_isolated
from sazs.pipeline.spectral import SpectralConfig, laplacian_eigs

K = 8
IMAGES = ["astronaut", "chelsea", "coffee"]


def pad(feats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    n = max(len(f) for f in feats)
    out = np.zeros((len(feats), n, feats[0].shape[1]), np.float32)
    for b, f in enumerate(feats):
        out[b, : len(f)] = f
    return out, np.array([len(f) for f in feats])


def vit_features(name: str) -> np.ndarray:
    f = real_vit_features(name)
    return normalise(f.reshape(-1, f.shape[-1]))


def assert_same_graph(ell, b, x, k, atol=1e-6):
    """ELL image b vs build_knn_graph: neighbour sets up to ties, W equal where they agree."""
    g = build_knn_graph(x, GraphConfig(global_weight=0, k=k, backend="torch"), grid=(1, len(x)))
    W = ell_to_csr(ell, b)
    assert abs(W - W.T).max() == 0 and W.diagonal().max() == 0
    diff = abs(W - g.W)
    if diff.max() > atol:  # only allowed on rows whose kNN sets differ by a tie
        rows = np.unique(diff.multiply(diff > atol).nonzero()[0])
        cos = x.astype(np.float64) @ x.T.astype(np.float64)
        _, ref = knn(x, k, metric="ip", backend="torch")
        mine = np.array([np.argsort(-np.where(np.arange(len(x)) == i, -np.inf, cos[i]))[:k] for i in rows])
        assert_same_neighbours_up_to_ties(x, mine, ref[rows], lambda i, j: cos[rows[i], j])


# --- kNN ------------------------------------------------------------------------------


def test_knn_matches_build_knn_graph_random_and_images():
    feats = [random_features(n=500, d=16, seed=1), random_features(n=300, d=16, seed=2)]
    F, nv = pad(feats)
    idx, sims = batched_knn(F, 10, n_valid=nv)
    assert idx.shape == sims.shape == (2, 500, 10) and str(sims.dtype) == "torch.float64"
    # padded rows: no neighbours; valid rows never point at padding or themselves
    assert (idx[1, 300:] == -1).all() and (sims[1, 300:] == 0).all()
    assert (idx[1, :300] < 300).all() and (idx[1, :300] >= 0).all()
    assert not (idx == np.arange(500)[None, :, None]).any()
    for b, f in enumerate(feats):
        _, ref = knn(f, 10, metric="ip", backend="torch")
        cos = f.astype(np.float64) @ f.T.astype(np.float64)
        assert_same_neighbours_up_to_ties(f, idx[b, : len(f)].numpy(), ref, lambda i, j: cos[i, j])
    ell = ell_graph(idx, sims, n_valid=nv)
    for b, f in enumerate(feats):
        assert_same_graph(ell, b, f, 10)

    imgs = [image_features(getattr(data, n)()) for n in IMAGES]
    idx, sims = batched_knn(np.stack(imgs), 10)
    ell = ell_graph(idx, sims)
    for b, f in enumerate(imgs):
        assert_same_graph(ell, b, f, 10)


def test_knn_matches_on_vit_features():
    feats = [vit_features("astronaut"), vit_features("chelsea")]  # 2304 and 3456 patches, d=384
    F, nv = pad(feats)
    idx, sims = batched_knn(F, 10, n_valid=nv)
    ell = ell_graph(idx, sims, n_valid=nv)
    for b, f in enumerate(feats):
        assert_same_graph(ell, b, f, 10)


def test_knn_threshold_small_images_and_errors():
    f = random_features(n=40, d=8, seed=3)
    F, nv = pad([f, f[:6]])
    idx, sims = batched_knn(F, 8, n_valid=nv)
    assert (idx[1, :6, 5:] == -1).all()  # only 5 other patches exist
    ell = ell_graph(idx, sims, n_valid=nv, threshold=0.3)
    W = ell_to_csr(ell, 0)
    g = build_knn_graph(f, GraphConfig(global_weight=0, k=8, threshold=0.3, backend="torch"), grid=(5, 8))
    assert abs(W - g.W).max() < 1e-6 and W.data.min() > 0.3
    with pytest.raises(ValueError, match="n_valid"):
        batched_knn(F, 3, n_valid=[40, 41])
    with pytest.raises(ValueError, match="precision"):
        batched_knn(F, 3, precision="fp8")


# --- solver ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_graphs():
    """The three sample images' graphs (colour term on) and a random one of another size."""
    graphs = []
    for name in IMAGES:
        image = getattr(data, name)()
        graphs.append(
            build_knn_graph(
                image_features(image),
                GraphConfig(global_weight=0, k=10, color_weight=0.5),
                grid=GRID,
                colors=patch_colors(image, GRID),
            )
        )
    graphs.append(
        build_knn_graph(random_features(n=700, d=8, seed=9), GraphConfig(global_weight=0, k=10), grid=(25, 28))
    )
    refs = [laplacian_eigs(g, SpectralConfig(num_eigs=K + 1, solver="dense")) for g in graphs]
    return graphs, refs


def test_batched_matches_dense_and_eigsh(image_graphs):
    graphs, refs = image_graphs
    ell = ell_from_csr([g.W for g in graphs])  # N = 1200, the last image padded from 700
    assert ell.shape[1] == 1200 and list(ell.n_valid) == [1200, 1200, 1200, 700]
    out = batched_eigs(ell, K, tol=1e-4)
    cfg = SpectralConfig(num_eigs=K)
    for g, ref, s in zip(graphs, refs, out):
        assert s.solver == "batched" and s.iterations > 0
        assert_well_formed(s, g.num_nodes, K, cfg)
        assert_matches_reference(s, ref, K)
        assert s.residuals.max() <= 1e-4
        d = degrees(g)
        np.testing.assert_allclose(s.eigvecs[:, 0], np.sqrt(d / d.sum()), atol=1e-4)
        e = laplacian_eigs(g, SpectralConfig(num_eigs=K, solver="eigsh"))
        np.testing.assert_allclose(s.eigvals, e.eigvals, atol=1e-6)
        # the first K - 1 against eigsh (its K-th vector's group may continue past K)
        assert_matches_reference(replace(s, eigvals=s.eigvals[: K - 1], eigvecs=s.eigvecs[:, : K - 1]), e, K - 1)


def test_knn_to_spectra_padded_batch_equals_per_image():
    """Images with different N in one padded batch give each image's own spectrum."""
    feats = [image_features(data.astronaut()), image_features(data.coffee(), grid=(20, 30))]
    F, nv = pad(feats)
    idx, sims = batched_knn(F, 10, n_valid=nv)
    out = batched_eigs(ell_graph(idx, sims, n_valid=nv), K)
    for f, s, grid in zip(feats, out, [GRID, (20, 30)]):
        g = build_knn_graph(f, GraphConfig(global_weight=0, k=10), grid=grid)
        ref = laplacian_eigs(g, SpectralConfig(num_eigs=K + 1, solver="dense"))
        assert s.eigvecs.shape == (len(f), K) and s.converged
        assert_matches_reference(s, ref, K)


def test_convergence_masks_easy_stops_early(caplog):
    # easy: 10 disjoint cliques, eigenvalue 0 (x10) then a large gap; hard: random kNN graph
    easy = sp.block_diag([np.ones((60, 60)) - np.eye(60)] * 10, format="csr")
    hard = build_knn_graph(random_features(n=600, d=32, seed=11), GraphConfig(global_weight=0, k=10), grid=(20, 30)).W
    out = batched_eigs(ell_from_csr([easy, hard]), K)
    assert all(s.converged for s in out)
    assert out[0].iterations < out[1].iterations, [s.iterations for s in out]
    np.testing.assert_allclose(out[0].eigvals, 0, atol=1e-6)
    # non-convergence is reported per image, never hidden
    with caplog.at_level(logging.WARNING):
        out = batched_eigs(ell_from_csr([easy, hard]), K, max_iter=1)
    assert out[0].converged and not out[1].converged
    assert not out[1].info["solver_converged"] and out[1].residuals.max() > 1e-4
    assert "image 1 not converged" in caplog.text


def test_isolated_node_and_two_components():
    f = random_features(n=300, d=8, seed=6, positive=True)
    f[11] = -f[11]
    g1 = build_knn_graph(normalise(f), GraphConfig(global_weight=0, k=8), grid=(15, 20))
    assert num_isolated(g1) == 1
    f = random_features(n=400, d=8, seed=4) * 0.3
    f[:200, 0] += 1
    f[200:, 0] -= 1
    g2 = build_knn_graph(normalise(f), GraphConfig(global_weight=0, k=10), grid=(20, 20))
    s1, s2 = batched_eigs(ell_from_csr([g1.W, g2.W]), 4)
    assert s1.converged and s1.eigvals.max() < 1 and np.abs(s1.eigvecs[11]).max() < 1e-4
    assert s2.converged
    np.testing.assert_allclose(s2.eigvals[:2], 0, atol=1e-6)
    assert s2.eigvals[2] > 1e-3


def test_deterministic_and_float64():
    W = build_knn_graph(random_features(n=500, d=16, seed=5), GraphConfig(global_weight=0), grid=(20, 25)).W
    a, b = batched_eigs(ell_from_csr([W]), K, seed=3)[0], batched_eigs(ell_from_csr([W]), K, seed=3)[0]
    np.testing.assert_array_equal(a.eigvecs, b.eigvecs)
    c = batched_eigs(ell_from_csr([W]), K, dtype=np.float64, tol=1e-8)[0]
    assert c.converged and c.residuals.max() < 1e-6
    np.testing.assert_allclose(a.eigvals, c.eigvals, atol=1e-7)


def test_as_a_spectral_solver(image_graphs):
    """The solver "batched" of `laplacian_eigs`: one graph as a batch of one (`solve_batched`)."""
    graphs, refs = image_graphs
    cfg = SpectralConfig(num_eigs=K, solver="batched", tol=1e-4)
    s = laplacian_eigs(graphs[0], cfg)
    assert_well_formed(s, graphs[0].num_nodes, K, cfg)
    assert_matches_reference(s, refs[0], K)


def test_rejects_bad_input():
    W = sp.random(50, 50, density=0.2, random_state=0, format="csr")
    W = (W + W.T).tocsr()
    with pytest.raises(ValueError, match="more than"):
        batched_eigs(ell_from_csr([W]), 50)
    with pytest.raises(ValueError, match="non-negative"):
        batched_eigs(ell_from_csr([-W]), 3)


def test_cholesky_qr_falls_back_to_qr_per_image():
    X = np.random.default_rng(0).standard_normal((3, 100, 6)).astype(np.float32)
    X[1, :, 5] = X[1, :, 4]  # rank deficient: Cholesky of its Gram fails
    stats: dict = {}
    Q = _orthonormalise(X.copy(), np, stats)
    assert stats["qr_fallbacks"] >= 1
    for b in (0, 2):
        np.testing.assert_allclose(Q[b].T @ Q[b], np.eye(6), atol=1e-5)
        # same span as the input
        assert np.linalg.svd(Q[b].T @ np.linalg.qr(X[b])[0], compute_uv=False).min() > 1 - 1e-5
    assert np.isfinite(Q).all()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_search_is_certified_exact(precision):
    """fp16/bf16 ranking (tensor cores on a GPU), certified: the float32 answer on every row,
    on real ViT features and on features built to defeat a low-precision ranking."""
    rng = np.random.default_rng(7)
    hard = np.zeros((600, 64), np.float32)  # two far clusters, ~1e-3 apart inside: bf16 cannot rank them
    hard[:, 0] = np.repeat([1.0, -1.0], 300)
    hard = normalise(hard + 1e-3 * rng.standard_normal(hard.shape).astype(np.float32))
    for f, min_redo in ((vit_features("coffee"), 0), (hard, 0.5)):
        stats: dict = {}
        idx, sims = batched_knn(f[None], 10, precision=precision, stats=stats)
        assert stats["rows"] == len(f) and stats["searched_again"] >= min_redo * len(f)
        _, ref = knn(f, 10, metric="ip", backend="torch")
        cos = f.astype(np.float64) @ f.T.astype(np.float64)
        assert_same_neighbours_up_to_ties(f, idx[0].numpy(), ref, lambda i, j: cos[i, j], atol=1e-6)
        np.testing.assert_allclose(sims[0].numpy(), np.take_along_axis(cos, idx[0].numpy(), 1), atol=1e-6)
        # the order within a row is best first
        assert (np.diff(sims[0].numpy(), axis=1) <= 0).all()


def test_certified_search_with_padding_and_small_images():
    f = [random_features(n=300, d=16, seed=1), random_features(n=9, d=16, seed=2)]
    F, nv = pad(f)
    stats: dict = {}
    idx, sims = batched_knn(F, 10, n_valid=nv, precision="fp16", stats=stats)
    ref, _ = batched_knn(F, 10, n_valid=nv, precision="fp32")
    assert stats["rows"] == 309
    assert (idx[1, :9, 8:] == -1).all() and (idx[1, 9:] == -1).all()  # 8 others only; padded rows empty
    for b, x in enumerate(f):
        cos = x.astype(np.float64) @ x.T.astype(np.float64)
        assert_same_neighbours_up_to_ties(
            x, idx[b, : len(x), : len(x) - 1].numpy(), ref[b, : len(x), : len(x) - 1].numpy(), lambda i, j: cos[i, j]
        )


def test_bench_gpu_script_runs_on_cpu(tmp_path):
    """bench/gpu.py --cpu: every stage runs end to end on a tiny problem."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu.json"
    assert mod.main(["--cpu", "--repeats", "1", "--out", str(out)]) == 0
    rows = {r["stage"]: r for r in json.loads(out.read_text())["rows"]}
    eig = rows["eigen batched (numpy, gather)"]
    assert eig["converged"] == eig["B"] and eig["max_residual"] <= 1e-4
    assert rows["accuracy vs float64"]["max_abs_dlambda"] < 1e-4
    e2e = rows["end to end (measured, shard 2)"]
    assert e2e["done"] == e2e["images"] == 4 and e2e["images_per_s"] > 0 and e2e["coco_train2017_minutes"] > 0
    assert (e2e["solver"], e2e["graph_backend"]) == ("eigsh", "certified")  # no GPU: the CPU path
    assert rows["end to end (serial estimate of the stages)"]["images_per_s"] > 0


def _emulated_kernel(grid, block, args):
    """The fused CUDA kernel's index arithmetic (`ell_operator._ELL_SOURCE`), one numpy lane per thread."""
    idx, a, X, Y, rows, N, m, p = args
    t = np.arange(grid[0] * block[0])
    t = t[t < rows * p]
    row = t // p
    c = t - row * p
    slots = row[:, None] * m + np.arange(m)
    base = (row // N) * N * p
    vals = X.reshape(-1)[base[:, None] + idx.reshape(-1)[slots] * p + c[:, None]]
    Y.reshape(-1)[t] = (a.reshape(-1)[slots] * vals).sum(axis=1)


@pytest.mark.parametrize("kernel", ["emulated", "broken"])
def test_fused_product_launch_and_its_self_check(monkeypatch, caplog, kernel):
    """The launch glue of the fused ELL kernel (on a GPU: cupy.RawKernel), with the kernel
    emulated on numpy; a kernel that disagrees with the gather product is switched off."""
    assert not ell_operator.fused_available(np)  # numpy never takes the fused path by itself
    W = build_knn_graph(random_features(n=300, d=8, seed=2), GraphConfig(global_weight=0), grid=(15, 20)).W
    ell = ell_from_csr([W, W[:200, :200]])
    X = np.random.default_rng(0).standard_normal((2, 300, 16)).astype(np.float32)
    X[1, 200:] = 0
    fake = _emulated_kernel if kernel == "emulated" else (lambda grid, block, args: args[3].fill(1.0))
    monkeypatch.setattr(ell_operator, "_FUSED_STATE", {})
    monkeypatch.setattr(ell_operator, "_ell_kernel", lambda xp, dtype: fake)
    op = ell_operator.EllOperator(ell.idx, ell.w.astype(np.float32), np, fused=True)
    with caplog.at_level(logging.WARNING):
        Y = op(X)
    ref = op.gathered(X)
    np.testing.assert_allclose(Y, ref, rtol=1e-5, atol=1e-6)
    if kernel == "emulated":
        assert ell_operator._FUSED_STATE["ok"] and op.fused and not caplog.text
    else:
        assert ell_operator._FUSED_STATE["ok"] is False and not op.fused
        assert "fused ELL kernel disagrees" in caplog.text


def test_a_silently_failed_cholesky_is_caught(monkeypatch):
    """CuPy's batched Cholesky does not raise: a partial factor of one image must be
    recognised (L L^T != G) and that image orthonormalised by QR."""
    X = np.random.default_rng(1).standard_normal((3, 120, 6)).astype(np.float32)
    real = np.linalg.cholesky

    def partial_on_image_1(G):
        L = real(G)
        L[1, 3:, 3:] = np.eye(3)  # stopped half-way, finite and well-scaled: only L L^T != G shows it
        return L

    monkeypatch.setattr(np.linalg, "cholesky", partial_on_image_1)
    stats: dict = {}
    Q = _orthonormalise(X.copy(), np, stats)
    assert stats["qr_fallbacks"] >= 1
    for b in range(3):
        np.testing.assert_allclose(Q[b].T.astype(np.float64) @ Q[b], np.eye(6), atol=1e-5)
        assert np.linalg.svd(Q[b].T @ np.linalg.qr(X[b])[0], compute_uv=False).min() > 1 - 1e-5


def fix_signs_reference(vecs: np.ndarray) -> np.ndarray:
    """The sign convention column by column, as the docstring of `fix_signs` states it."""
    out = vecs.copy()
    for j in range(out.shape[1]):
        u = out[:, j]
        eps = 1e-6 * np.abs(u).max()
        pos, neg = int((u > eps).sum()), int((u < -eps).sum())
        if pos == 0 or neg == 0:
            flip = pos == 0
        elif pos != neg:
            flip = pos > neg
        else:
            flip = u[np.argmax(np.abs(u))] < 0
        if flip:
            out[:, j] = -u
    return out


def test_fix_signs_of_a_batch_is_the_per_column_convention():
    rng = np.random.default_rng(4)
    u = rng.standard_normal((5, 40, 6))
    u[0, :, 1] = np.abs(u[0, :, 1])  # one-signed, positive
    u[1, :, 2] = -np.abs(u[1, :, 2])  # one-signed, negative
    u[2, :, 3] = np.repeat([1.0, -1.0], 20) * np.linspace(1, 2, 40)  # 20 vs 20: the largest |u| decides
    u[3, :, 4] = np.repeat([-1.0, 1.0], 20) * np.linspace(1, 2, 40)
    u[4, :3, 0] = 1e-9  # below 1e-6 max|u|: counts as zero
    u[4, 30:, :] = 0  # padded rows
    out = fix_signs(u, np)
    for b in range(5):
        assert out[b].tobytes() == fix_signs(u[b]).tobytes() == fix_signs_reference(u[b]).tobytes()


def test_low_precision_product_runs_with_full_precision_reductions(monkeypatch):
    """The certificate's error bound assumes fp32 accumulation; cuBLAS is told so, then restored."""
    import torch

    m = torch.backends.cuda.matmul
    real, seen = torch.bmm, []

    def spy(a, b):
        if a.dtype == torch.float16:
            seen.append((m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction))
        return real(a, b)

    monkeypatch.setattr(torch, "bmm", spy)
    before = m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction
    batched_knn(random_features(n=200, d=16, seed=3)[None], 5, precision="fp16")
    assert seen == [(False, False)]
    assert (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction) == before


@pytest.mark.parametrize("kernel,positive", [("cosine", True), ("cosine", False), ("affine", False)])
def test_batched_global_term_matches_per_image_eigsh(kernel, positive):
    """The low-rank term in the ELL products: padded batch of two == eigsh per image (numpy)."""
    cfg = GraphConfig(k=8, global_weight=0.3, global_rank=6, global_kernel=kernel)
    feats = [normalise(random_features(n=n, d=16, seed=s, positive=positive)) for n, s in ((400, 8), (300, 9))]
    grids = [(20, 20), (15, 20)]
    graphs = [build_knn_graph(f, cfg, grid=gr) for f, gr in zip(feats, grids)]
    refs = [laplacian_eigs(g, SpectralConfig(num_eigs=5, tol=1e-8, precision="float64")) for g in graphs]
    for ell in (ell_from_graphs(graphs), build_knn_graphs(feats, replace(cfg, backend="batched"), grids=grids)):
        for ref, got in zip(refs, batched_eigs(ell, 5, tol=1e-6)):
            assert got.converged
            np.testing.assert_allclose(got.eigvals, ref.eigvals, atol=1e-5)
            np.testing.assert_allclose(np.abs(np.einsum("ij,ij->j", got.eigvecs, ref.eigvecs)), 1, atol=1e-3)
