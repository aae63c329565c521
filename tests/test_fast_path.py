"""The GPU fast path wired into the pipeline (graph backend and solver "batched"), on the CPU.

On a GPU the same functions run on torch CUDA tensors and cupy arrays; here they run on
torch CPU and numpy, through the real `sazs-priors` CLI and the job's own functions.
"""

import logging

import numpy as np
import pytest
from images import write_bad_images
from skimage import data
from storecheck import assert_same_arrays

from sazs.datasets.base import DatasetConfig
from sazs.datasets.registry import build_dataset
from sazs.features.extractors import ExtractorConfig, build_extractor
from sazs.features.types import Features
from sazs.pipeline import cli, compute, knn_batched
from sazs.pipeline import graph as graph_mod
from sazs.pipeline.batched_solver import array_module
from sazs.pipeline.compute import resolve_auto, solve_features
from sazs.pipeline.ell import ell_from_csr
from sazs.pipeline.graph import GraphConfig, build_knn_graph, build_knn_graphs
from sazs.pipeline.job import make_manifest
from sazs.pipeline.knn import knn
from sazs.pipeline.spectral import SpectralConfig, laplacian_eigs_batch
from sazs.stores.lock import read_lock
from sazs.stores.reader import open_store
from sazs.stores.writer import StoreWriter

K = 8
FAST = ["--extractor", "color", "--short-side", "64", "--no-progress", "--preview", "0"]
BATCHED = ["--solver", "batched", "--graph-backend", "batched"]


def run(*argv):
    return cli.main(["run", *map(str, argv)])


def color_features(names, short_side=64):
    ext = build_extractor(ExtractorConfig(name="color", short_side=short_side))
    images = [getattr(data, n)() for n in names]
    return images, ext.extract(images)


def test_auto_picks_the_cpu_path_without_a_gpu_and_the_fast_path_with_one(caplog):
    auto = GraphConfig(backend="auto"), SpectralConfig(solver="auto")
    g, s = resolve_auto(*auto, gpu=False)
    assert (g.backend, s.solver) == ("certified", "eigsh")
    g, s = resolve_auto(*auto, gpu=True, cupy=True)
    assert (g.backend, s.solver) == ("batched", "batched")
    with caplog.at_level(logging.WARNING):
        g, s = resolve_auto(*auto, gpu=True, cupy=False)
    assert (g.backend, s.solver) == ("batched", "eigsh") and "cupy-cuda12x" in caplog.text
    # explicit choices are never overridden
    g, s = resolve_auto(GraphConfig(backend="faiss"), SpectralConfig(solver="lobpcg"), gpu=True, cupy=True)
    assert (g.backend, s.solver) == ("faiss", "lobpcg")
    dataset = build_dataset(DatasetConfig(name="sample", limit=1))
    with pytest.raises(ValueError, match="resolve the 'auto'"):
        make_manifest(dataset, {}, (8, 8), *auto, 64)


def test_the_fast_path_choice_is_the_batched_graph_builders_own_check():
    """The job builds a batch's graphs at once exactly when `build_knn_graphs` can build them."""
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    assert GraphConfig(backend="batched").builds_in_batch
    assert not GraphConfig(backend="certified").builds_in_batch  # per image, on the CPU
    for cfg in (GraphConfig(backend="batched", color_weight=0.5), GraphConfig(backend="batched", kind="dense")):
        assert not cfg.builds_in_batch
        with pytest.raises(ValueError, match="per image"):
            build_knn_graphs([x], cfg, grids=[(4, 5)])
    # a colour term with the batched backend: the job builds per image and still solves in a batch
    images, feats = color_features(["coffee", "chelsea"])
    cfg = GraphConfig(backend="batched", color_weight=0.5)
    out = solve_features(list(zip(images, feats)), cfg, SpectralConfig(solver="batched"))
    for (grid, spec), f in zip(out, feats):
        assert grid == f.grid and spec.converged and spec.solver == "batched"


def test_an_unknown_solver_fails_the_job_at_once(tmp_path, capsys):
    assert run(*FAST, "--limit", 1, "--solver", "arpack", "--out", tmp_path / "s.zarr") == 2
    assert "unknown solver 'arpack'; choose from ['auto', 'eigsh', 'lobpcg'" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()  # nothing was started


def test_default_cli_on_a_cpu_writes_what_the_explicit_cpu_path_writes(tmp_path):
    """`make priors` without a GPU: auto = certified + eigsh, the same store (and fingerprint) as before."""
    a, b = tmp_path / "auto.zarr", tmp_path / "explicit.zarr"
    assert run(*FAST, "--limit", 2, "--out", a) == 0
    assert run(*FAST, "--limit", 2, "--out", b, "--solver", "eigsh", "--graph-backend", "certified") == 0
    sa, sb = open_store(a), open_store(b)
    assert sa.manifest["solver"]["solver"] == "eigsh" and sa.manifest["graph"]["backend"] == "certified"
    assert sa.fingerprint == sb.fingerprint
    assert_same_arrays(a, b)


@pytest.mark.parametrize("backend", ["batched", "certified"])
def test_batched_path_end_to_end_matches_the_per_image_path(tmp_path, backend):
    ref, fast = tmp_path / "ref.zarr", tmp_path / "fast.zarr"
    assert run(*FAST, "--limit", 5, "--out", ref, "--solver", "eigsh") == 0
    # shards of 3: a batch of 3 images of different sizes, then one of 2
    assert (
        run(*FAST, "--limit", 5, "--out", fast, "--solver", "batched", "--graph-backend", backend, "--shard-size", 3)
        == 0
    )
    r, f = open_store(ref), open_store(fast)
    assert f.manifest["solver"]["solver"] == "batched" and f.manifest["graph"]["backend"] == backend
    assert r.fingerprint != f.fingerprint  # another solver: other last bits, another fingerprint
    assert f.done_ids() == r.done_ids() and len(f.done_ids()) == 5
    assert len({tuple(f.get(i).grid) for i in f.done_ids()}) > 1  # padded batches really were mixed
    for id_ in f.done_ids():
        a, b = f.get(id_), r.get(id_)
        assert a.grid == b.grid and (a.residuals <= 1e-4).all()
        np.testing.assert_allclose(a.eigvals, b.eigvals, atol=1e-5)
        # vectors: compare against the per-image result where eigenvalues are separated
        gaps = np.diff(b.eigvals)
        for j in range(1, K - 1):
            if min(gaps[j - 1], gaps[j]) > 1e-3:
                u, v = a.eigvecs[j].ravel().astype(np.float64), b.eigvecs[j].ravel().astype(np.float64)
                assert abs(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v)) > 1 - 1e-3, (id_, j)


def test_bad_images_are_recorded_on_the_batched_path_too(tmp_path):
    root = tmp_path / "bad"
    expected = write_bad_images(root)
    out = tmp_path / "s.zarr"
    assert run(*FAST, *BATCHED, "--dataset", "folder", "--data", root, "--out", out, "--shard-size", 16) == 0
    store = open_store(out)
    bad = {id_ for id_, outcome in expected.items() if outcome != "ok"}
    assert set(store.failures()) == bad
    assert set(store.done_ids()) == set(expected) - bad


def test_one_bad_graph_fails_alone_and_batch_mates_match_their_solo_solve():
    images, feats = color_features(["astronaut", "coffee", "chelsea"])
    broken = feats[1].feats.copy()
    broken[5] = np.nan
    items = [(images[0], feats[0]), (images[1], Features(broken, feats[1].grid)), (images[2], feats[2])]
    graph_cfg, spectral_cfg = GraphConfig(backend="batched"), SpectralConfig(solver="batched")
    out = solve_features(items, graph_cfg, spectral_cfg)
    assert isinstance(out[1], ValueError) and "NaN" in str(out[1])
    for j in (0, 2):
        (solo,) = solve_features([items[j]], graph_cfg, spectral_cfg)
        grid, spec = out[j]
        assert grid == feats[j].grid and spec.converged
        np.testing.assert_allclose(spec.eigvals, solo[1].eigvals, atol=1e-7)
        np.testing.assert_allclose(np.abs(spec.eigvecs.T @ solo[1].eigvecs).diagonal()[:3], 1, atol=1e-4)


def test_solve_features_orders_results_like_its_input():
    """Batches are formed by size (less padding); results still come back in input order."""
    images, feats = color_features(["coffee", "astronaut", "chelsea"])
    sizes = [f.feats.shape[0] for f in feats]
    assert sizes != sorted(sizes)  # the solve order differs from the input order
    out = solve_features(list(zip(images, feats)), GraphConfig(backend="batched"), SpectralConfig(solver="batched"))
    for (grid, spec), f in zip(out, feats):
        assert grid == f.grid and spec.eigvecs.shape == (f.feats.shape[0], K)


def test_laplacian_eigs_batch_picks_numpy_on_cpu_and_asks_for_cupy_on_cuda():
    _, feats = color_features(["coffee"])
    g = build_knn_graph(feats[0].feats, GraphConfig(), grid=feats[0].grid)
    ell = ell_from_csr([g.W])
    assert array_module("cpu", ell)[0] is np and array_module("auto", ell)[0] is np
    (s,) = laplacian_eigs_batch(ell, SpectralConfig(solver="batched", device="cpu"))
    assert s.converged and s.solver == "batched"
    with pytest.raises(ValueError, match="'batched' solver"):
        laplacian_eigs_batch(ell, SpectralConfig(solver="eigsh"))
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install cupy-cuda12x"):
            array_module("cuda", ell)


# --- run_local's helper threads (on by default with a GPU extractor; forced on here) ----


def test_decode_and_write_threads_give_the_same_store(tmp_path):
    root = tmp_path / "imgs"
    write_bad_images(root)
    common = [*FAST, "--dataset", "folder", "--data", root, "--shard-size", 3]
    inline, threaded = tmp_path / "inline.zarr", tmp_path / "threaded.zarr"
    assert run(*common, "--out", inline, "--decode-workers", 0) == 0
    assert run(*common, "--out", threaded, "--decode-workers", 2) == 0
    assert open_store(inline).failures() == open_store(threaded).failures() and open_store(inline).failures()
    assert_same_arrays(inline, threaded)


def test_ctrl_c_with_threads_keeps_every_computed_shard(tmp_path, monkeypatch):
    ref = tmp_path / "ref.zarr"
    args = [*FAST, "--limit", 6, "--shard-size", 2, "--batch-size", 2, "--decode-workers", 2]
    assert run(*args, "--out", ref) == 0
    real, calls = compute.compute_priors, {"n": 0}

    def interrupted_at_third(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C while shard 2 is computed and shard 1 may still be writing
            raise KeyboardInterrupt
        return real(*a, **kw)

    out = tmp_path / "int.zarr"
    monkeypatch.setattr(compute, "compute_priors", interrupted_at_third)
    assert run(*args, "--out", out) == 130
    assert list(open_store(out).status()) == [1, 1, 1, 1, 0, 0]
    monkeypatch.setattr(compute, "compute_priors", real)
    assert run(*args, "--out", out) == 0
    assert_same_arrays(ref, out)


def test_a_failed_write_in_the_writer_thread_stops_the_job(tmp_path, monkeypatch, capsys):
    def disk_full(self, shard, results):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StoreWriter, "write_shard", disk_full)
    out = tmp_path / "s.zarr"
    code = cli.main(["run", *map(str, [*FAST, "--limit", 4, "--shard-size", 2, "--decode-workers", 2, "--out", out])])
    assert code == 2  # one line naming the store and the fix, no traceback
    assert "No space left on device" in capsys.readouterr().err
    assert read_lock(out) is None  # the lock is released on the way out


def test_out_of_memory_splits_the_batch_until_it_fits(monkeypatch, caplog):
    images, feats = color_features(["coffee", "astronaut", "chelsea", "rocket"])
    items = list(zip(images, feats))
    cfgs = GraphConfig(backend="batched"), SpectralConfig(solver="batched")
    expected = solve_features(items, *cfgs)
    real, sizes = compute.laplacian_eigs_batch, []

    def small_memory(ell, cfg):
        sizes.append(ell.shape[0])
        if ell.shape[0] > 1:
            raise MemoryError("out of memory allocating 8 GiB")  # what cupy raises
        return real(ell, cfg)

    monkeypatch.setattr(compute, "laplacian_eigs_batch", small_memory)
    with caplog.at_level(logging.WARNING):
        out = solve_features(items, *cfgs)
    assert sizes == [4, 2, 1, 1, 2, 1, 1] and "splitting the batch in two" in caplog.text
    for (grid, spec), (grid0, spec0) in zip(out, expected):
        assert grid == grid0
        np.testing.assert_allclose(spec.eigvals, spec0.eigvals, atol=1e-7)

    def broken(ell, cfg):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")  # not OOM: not hidden

    monkeypatch.setattr(compute, "laplacian_eigs_batch", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        solve_features(items, *cfgs)


def test_build_knn_graphs_certified_fp16_is_the_float32_graph(monkeypatch):
    """What a GPU runs by default (the certified fp16 search), here on torch CPU: the float32
    neighbours up to exact ties (flat colour regions have many), and fp32 on a CPU."""
    import torch
    from test_graph import assert_same_neighbours_up_to_ties

    _, feats = color_features(["coffee", "astronaut"], short_side=96)
    seen, real = [], knn_batched.batched_knn

    def spy(*args, **kwargs):
        seen.append(kwargs["precision"])
        stats: dict = {}
        idx, sims = real(*args, **kwargs, stats=stats)
        seen.append(stats)
        for b, f in enumerate(feats):
            n = len(f.feats)
            _, ref = knn(f.feats, 10, metric="ip", backend="torch")
            cos = f.feats.astype(np.float64) @ f.feats.T.astype(np.float64)
            assert_same_neighbours_up_to_ties(f.feats, idx[b, :n].numpy(), ref, lambda i, j: cos[i, j], atol=1e-6)
        return idx, sims

    monkeypatch.setattr(graph_mod, "batched_knn", spy)
    grids = [f.grid for f in feats]
    build_knn_graphs([torch.from_numpy(f.feats) for f in feats], GraphConfig(k=10), grids=grids, precision="fp16")
    build_knn_graphs([f.feats for f in feats], GraphConfig(k=10), grids=grids)
    assert seen[0] == "fp16" and seen[2] == "fp32"
    assert seen[1]["rows"] == sum(len(f.feats) for f in feats)
