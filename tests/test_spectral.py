from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from scipy.sparse.csgraph import connected_components
from skimage import data
from test_graph import GRID, image_features, normalise, random_features

from sazs.pipeline import spectral
from sazs.pipeline.ell import ell_from_graphs
from sazs.pipeline.graph import GraphConfig, build_dense_graph, build_knn_graph, patch_colors
from sazs.pipeline.laplacian import (
    as_batch,
    batch_operator,
    degrees,
    dense_affinity,
    fix_signs,
    normalized_adjacency,
    normalized_operator,
    num_isolated,
)
from sazs.pipeline.spectral import SolverError, SpectralConfig, laplacian_eigs, list_solvers
from sazs.pipeline.types import Graph

K = 8
GAP = 1e-3  # eigenvalue groups separated by less than this are compared as one subspace


@pytest.fixture
def numpy_cupy(monkeypatch):
    """Run the `cupy-lobpcg` solver's code with numpy/scipy in place of cupy/cupyx."""
    monkeypatch.setattr(spectral, "_cupy_modules", lambda: (np, sp, sla.lobpcg))


ITERATIVE = ["eigsh", "lobpcg", "cupy-lobpcg", "batched"]


@pytest.fixture(scope="module", params=["astronaut", "chelsea", "coffee"])
def image_case(request):
    image = getattr(data, request.param)()
    graph = build_knn_graph(
        image_features(image),
        GraphConfig(global_weight=0, k=10, color_weight=0.5),
        grid=GRID,
        colors=patch_colors(image, GRID),
    )
    ref = laplacian_eigs(graph, SpectralConfig(num_eigs=K + 1, solver="dense"))
    return graph, ref


def assert_sign_convention(vecs):
    np.testing.assert_array_equal(fix_signs(vecs), vecs)


def assert_matches_reference(s, ref, num):
    np.testing.assert_allclose(s.eigvals, ref.eigvals[:num], atol=1e-4)
    vals = ref.eigvals
    starts = [0] + [i + 1 for i in range(num - 1) if vals[i + 1] - vals[i] > GAP]
    ends = starts[1:] + [num]
    tested = 0
    for a, b in zip(starts, ends):
        if vals[b] - vals[b - 1] <= GAP:  # group continues past K: its K-th vector is not determined
            continue
        cos = np.linalg.svd(ref.eigvecs[:, a:b].astype(np.float64).T @ s.eigvecs[:, a:b], compute_uv=False)
        assert cos.min() > 1 - 1e-3, f"eigenvectors {a}:{b} misaligned: {cos}"
        tested += b - a
    assert tested >= num // 2  # the comparison must not be vacuous


def assert_well_formed(s, n, num, cfg):
    assert s.eigvals.shape == (num,) and s.eigvals.dtype == np.float64
    assert s.eigvecs.shape == (n, num) and s.eigvecs.dtype == np.float32
    assert s.residuals.shape == (num,) and s.residuals.dtype == np.float64
    assert np.all(np.diff(s.eigvals) >= 0)
    assert abs(s.eigvals[0]) < 1e-6
    np.testing.assert_allclose(s.eigvecs.T.astype(np.float64) @ s.eigvecs, np.eye(num), atol=1e-5)
    assert s.converged and np.all(s.residuals <= cfg.residual_tol)
    assert_sign_convention(s.eigvecs)


def test_registry():
    assert sorted(list_solvers()) == ["batched", "cupy-lobpcg", "dense", "eigsh", "generalized", "lobpcg"]
    g = build_knn_graph(random_features(n=100, d=8), GraphConfig(global_weight=0), grid=(10, 10))
    with pytest.raises(ValueError, match=r"unknown solver 'arpack'; choose from \[.auto., .eigsh., .lobpcg."):
        laplacian_eigs(g, SpectralConfig(solver="arpack"))


def test_dense_reference_is_exact(image_case):
    graph, ref = image_case
    L = np.eye(graph.num_nodes) - normalized_adjacency(graph.W).toarray()
    assert_well_formed(ref, graph.num_nodes, K + 1, SpectralConfig())
    assert ref.residuals.max() < 1e-6
    full = np.linalg.eigvalsh(L)
    np.testing.assert_allclose(ref.eigvals, full[: K + 1], atol=1e-10)


@pytest.mark.parametrize("solver", ITERATIVE)
def test_solver_matches_dense(solver, image_case, numpy_cupy):
    graph, ref = image_case
    cfg = SpectralConfig(num_eigs=K, solver=solver)
    s = laplacian_eigs(graph, cfg)
    assert s.solver == solver and s.iterations > 0
    assert_well_formed(s, graph.num_nodes, K, cfg)
    assert_matches_reference(s, ref, K)
    # The trivial eigenvector is sqrt(d) / ||sqrt(d)||, made non-negative.
    d = degrees(graph)
    np.testing.assert_allclose(s.eigvecs[:, 0], np.sqrt(d / d.sum()), atol=1e-4)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_eigsh_precisions_match_dense(precision, image_case):
    graph, ref = image_case
    cfg = SpectralConfig(num_eigs=K, solver="eigsh", precision=precision)
    s = laplacian_eigs(graph, cfg)
    assert_well_formed(s, graph.num_nodes, K, cfg)
    assert_matches_reference(s, ref, K)
    # float64 Rayleigh quotients: eigenvalues far more accurate than float32 Ritz values
    np.testing.assert_allclose(s.eigvals, ref.eigvals[:K], atol=1e-7)
    assert s.residuals.max() < 1e-4


@pytest.mark.parametrize("solver", ITERATIVE)
def test_deterministic(solver, numpy_cupy):
    g = build_knn_graph(random_features(n=800, d=16, seed=5), GraphConfig(global_weight=0), grid=(20, 40))
    a = laplacian_eigs(g, SpectralConfig(solver=solver, seed=3))
    b = laplacian_eigs(g, SpectralConfig(solver=solver, seed=3))
    np.testing.assert_array_equal(a.eigvals, b.eigvals)
    np.testing.assert_array_equal(a.eigvecs, b.eigvecs)


@pytest.mark.parametrize("solver", ITERATIVE + ["dense", "eigsh-float64"])
def test_two_components(solver, numpy_cupy):
    f = random_features(n=600, d=8, seed=4) * 0.3
    f[:300, 0] += 1  # left/right halves point in opposite directions: no edges across
    f[300:, 0] -= 1
    g = build_knn_graph(normalise(f), GraphConfig(global_weight=0, k=10), grid=(20, 30))
    assert connected_components(g.W, directed=False)[0] == 2
    cfg = (
        SpectralConfig(num_eigs=4, solver="eigsh", precision="float64")
        if solver == "eigsh-float64"
        else (SpectralConfig(num_eigs=4, solver=solver))
    )
    s = laplacian_eigs(g, cfg)
    assert s.converged
    np.testing.assert_allclose(s.eigvals[:2], 0, atol=1e-6)
    assert s.eigvals[2] > 1e-3
    # The null space is spanned by sqrt(d) restricted to each component.
    null = np.zeros((600, 2))
    null[:300, 0], null[300:, 1] = np.sqrt(degrees(g)[:300]), np.sqrt(degrees(g)[300:])
    null /= np.linalg.norm(null, axis=0)
    cos = np.linalg.svd(null.T @ s.eigvecs[:, :2], compute_uv=False)
    assert cos.min() > 1 - 1e-4


@pytest.mark.parametrize("solver", ["eigsh", "lobpcg", "dense"])
def test_isolated_node_is_not_among_smallest(solver):
    f = random_features(n=300, d=8, seed=6, positive=True)
    f[11] = -f[11]
    g = build_knn_graph(normalise(f), GraphConfig(global_weight=0, k=8), grid=(15, 20))
    assert num_isolated(g) == 1
    s = laplacian_eigs(g, SpectralConfig(num_eigs=4, solver=solver))
    assert s.converged and s.eigvals.max() < 1
    assert np.abs(s.eigvecs[11]).max() < 1e-4


def test_nan_weights_raise_solver_error():
    g = build_knn_graph(random_features(n=200, d=8), GraphConfig(global_weight=0), grid=(10, 20))
    W = g.W.copy()
    W.data[5] = np.nan
    with pytest.raises(SolverError, match="NaN"):
        laplacian_eigs(Graph(W=W, grid=g.grid), SpectralConfig())


def test_non_convergence_is_reported(caplog):
    g = build_knn_graph(random_features(n=800, d=16), GraphConfig(global_weight=0), grid=(20, 40))
    with pytest.raises(SolverError, match="ARPACK"):
        laplacian_eigs(g, SpectralConfig(solver="eigsh", max_iter=1))
    s = laplacian_eigs(g, SpectralConfig(solver="lobpcg", max_iter=2))
    assert not s.converged and s.residuals.max() > 1e-3
    assert "residual_tol" in caplog.text


def test_sign_convention():
    u = np.array([[3.0, 1.0, -2.0], [-1.0, 1.0, 2.0], [-1.0, 1.0, -1.0], [-1.0, 1.0, 1.0]])
    out = fix_signs(u)
    np.testing.assert_array_equal(out[:, 0], u[:, 0])  # one positive of four: kept
    np.testing.assert_array_equal(out[:, 1], u[:, 1])  # one sign: made non-negative
    np.testing.assert_array_equal(out[:, 2], -u[:, 2])  # tie: largest |u| (first -2) made positive
    np.testing.assert_array_equal(fix_signs(-u[:, :2]), u[:, :2])


def test_input_checks():
    g = build_knn_graph(random_features(n=20, d=4), GraphConfig(global_weight=0, k=5), grid=(4, 5))
    with pytest.raises(ValueError, match="num_eigs"):
        laplacian_eigs(g, SpectralConfig(num_eigs=20))
    with pytest.raises(ValueError, match=r"unknown precision 'float16'; choose from \['float32'"):
        laplacian_eigs(g, SpectralConfig(num_eigs=3, precision="float16"))
    big = Graph(W=sp.diags([np.ones(6000), np.ones(6000)], [-1, 1], format="csr"), grid=(1, 6001))
    with pytest.raises(ValueError, match="dense solver refuses"):
        laplacian_eigs(big, SpectralConfig(solver="dense"))


def test_cupy_lobpcg_needs_a_cuda_device(numpy_cupy):
    g = build_knn_graph(random_features(n=100, d=8), GraphConfig(global_weight=0), grid=(10, 10))
    with pytest.raises(ValueError, match="CUDA device"):
        laplacian_eigs(g, SpectralConfig(solver="cupy-lobpcg", device="cpu"))
    assert laplacian_eigs(g, SpectralConfig(solver="cupy-lobpcg", num_eigs=4, device="cuda:0")).converged


def test_cupy_missing_gives_install_hint():
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cupy is installed")
    g = build_knn_graph(random_features(n=100, d=8), GraphConfig(global_weight=0), grid=(10, 10))
    with pytest.raises(ImportError, match="pip install cupy-cuda12x"):
        laplacian_eigs(g, SpectralConfig(solver="cupy-lobpcg"))


def test_with_colour_extractor():
    """The same checks on features from the pipeline's own `color` extractor, when present."""
    extractors = pytest.importorskip("sazs.features.extractors")
    if "color" not in getattr(extractors, "list_extractors", lambda: [])():
        pytest.skip("no 'color' extractor registered")
    ext = extractors.build_extractor(extractors.ExtractorConfig(name="color", short_side=240))
    (feat,) = ext.extract([data.coffee()])
    g = build_knn_graph(feat.feats, GraphConfig(global_weight=0), grid=feat.grid)
    ref = laplacian_eigs(g, SpectralConfig(num_eigs=K + 1, solver="dense"))
    s = laplacian_eigs(g, SpectralConfig(num_eigs=K))
    assert s.converged
    np.testing.assert_allclose(s.eigvals, ref.eigvals[:K], atol=1e-4)


def test_rejects_asymmetric_or_negative_weights():
    W = sp.random(50, 50, density=0.2, random_state=0, format="csr")
    with pytest.raises(ValueError, match="symmetric"):
        laplacian_eigs(Graph(W=W, grid=(5, 10)), SpectralConfig(num_eigs=3))
    with pytest.raises(ValueError, match="non-negative"):
        laplacian_eigs(Graph(W=-(W + W.T).tocsr(), grid=(5, 10)), SpectralConfig(num_eigs=3))


# --- the global term and the Deep Spectral Methods baseline ---------------------------------


@pytest.mark.parametrize("kernel", ["cosine", "affine"])
@pytest.mark.parametrize("solver", ["eigsh", "lobpcg", "batched", "dense"])
def test_global_term_spectrum_matches_dense_reference(solver, kernel):
    import scipy.linalg

    x = normalise(random_features(n=300, d=12, seed=6, positive=kernel == "cosine"))
    g = build_knn_graph(x, GraphConfig(k=8, global_weight=0.05, global_rank=0, global_kernel=kernel), grid=(15, 20))
    W = dense_affinity(g)
    dinv = 1 / np.sqrt(W.sum(axis=1))
    L = np.eye(300) - dinv[:, None] * W * dinv
    vals, vecs = scipy.linalg.eigh(L, subset_by_index=[0, 5])
    s = laplacian_eigs(g, SpectralConfig(num_eigs=6, solver=solver, tol=1e-8 if solver != "batched" else 1e-6))
    assert s.converged
    np.testing.assert_allclose(s.eigvals, vals, atol=1e-5)
    # same subspace (eigenvalues here are simple): |<u, u_ref>| ~ 1 per vector
    np.testing.assert_allclose(np.abs(np.einsum("ij,ij->j", s.eigvecs, vecs)), 1, atol=1e-3)


@pytest.mark.parametrize("global_weight", [0.0, 0.3])
def test_one_operator_for_a_graph_and_a_padded_batch(global_weight):
    """The batch operator (ELL kNN part, G (B, N, r)) is each image's own operator: degrees,
    products, padded rows that stay zero; a graph's operator as a batch of one likewise."""
    cfg = GraphConfig(k=6, global_weight=global_weight, global_rank=4, global_kernel="cosine")
    graphs = [build_knn_graph(random_features(n=n, d=8, seed=s), cfg, grid=(1, n)) for n, s in ((90, 1), (60, 2))]
    A, valid = batch_operator(ell_from_graphs(graphs), np)
    assert A.shape[:2] == (2, 90) and valid.sum(axis=1).tolist() == [90, 60]
    assert (A.H is None) == (global_weight == 0)
    X = np.random.default_rng(0).standard_normal((2, 90, 3))
    Y = A @ X
    for b, g in enumerate(graphs):
        n, single = g.num_nodes, normalized_operator(g)
        np.testing.assert_allclose(A.degrees[b, :n], degrees(g), rtol=1e-13)
        np.testing.assert_array_equal(single.degrees, degrees(g))
        np.testing.assert_allclose(Y[b, :n], single @ X[b, :n], rtol=1e-12, atol=1e-14)
        assert (A.degrees[b, n:] == 0).all() and (Y[b, n:] == 0).all()  # padded rows: isolated, zero
        one = as_batch(single)
        np.testing.assert_allclose((one @ X[b : b + 1, :n])[0], single @ X[b, :n], rtol=1e-12, atol=1e-14)
        # the float32 copy the solvers iterate with, and one image taken out of the batch
        np.testing.assert_allclose(A.astype(np.float32).take(np.array([b])) @ X[b : b + 1], Y[b : b + 1], atol=1e-5)
    dense = dense_affinity(graphs[0])
    dinv = 1 / np.sqrt(dense.sum(axis=1))
    np.testing.assert_allclose(normalized_operator(graphs[0]).toarray(), dinv[:, None] * dense * dinv, atol=1e-12)


def test_generalized_solver_is_dsm_on_the_dense_graph():
    """eigsh(D - W, M = D, sigma ~ 0) on DSM's affinity, returned as u = D^1/2 v (unit, minority positive)."""
    import scipy.linalg

    x = normalise(random_features(n=120, d=8, seed=7))
    g = build_dense_graph(x, grid=(10, 12))
    W = dense_affinity(g)
    d = W.sum(axis=1)
    vals, v = scipy.linalg.eigh(np.diag(d) - W, np.diag(d), subset_by_index=[0, 4])
    u = np.sqrt(d)[:, None] * v
    u /= np.linalg.norm(u, axis=0)
    s = laplacian_eigs(g, SpectralConfig(num_eigs=5, solver="generalized", tol=1e-10))
    assert s.converged
    np.testing.assert_allclose(s.eigvals, vals, atol=1e-6)
    np.testing.assert_allclose(np.abs(np.einsum("ij,ij->j", s.eigvecs, u)), 1, atol=1e-4)
    assert ((s.eigvecs[:, 1:] > 0).sum(axis=0) <= 60).all()  # sign convention: positive part the minority
