"""sazs-store export (sazs-png, dsm, npz) and import-dsm: known answers, resume, round trip, hostile files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from sazs.stores import cli as store_cli
from sazs.stores.dsm import DSM_LAPLACIAN, dsm_signs
from sazs.stores.dsm_import import ImportConfig, import_dsm
from sazs.stores.export import ExportConfig, export_store
from sazs.stores.format import StoreError
from sazs.stores.integrity import verify
from sazs.stores.manifest import build_manifest
from sazs.stores.reader import open_store
from sazs.stores.writer import ImageResult, StoreWriter


def _unit(v):
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


def write_store(path, images, *, k, max_grid, failed=()):
    """images: {id: (image_size, eigvals (k,), eigvecs (k, h, w))}; ids in ``failed`` fail."""
    ids = list(images) + list(failed)
    manifest = build_manifest(
        dataset={"name": "toy", "split": "val", "root": "/nowhere", "num_images": len(ids), "ids_sha256": "x"},
        extractor={"name": "test", "weights_sha256": None},
        graph={"k": 1},
        solver={"solver": "test"},
        num_eigs=k,
        layout={"shard_size": 2, "max_grid": list(max_grid), "eigvecs_dtype": "float16"},
    )
    results = []
    for i, id_ in enumerate(ids):
        if id_ in failed:
            results.append(ImageResult(index=i, error="cannot decode it"))
            continue
        size, vals, vecs = images[id_]
        results.append(
            ImageResult(
                index=i,
                image_size=size,
                grid=vecs.shape[1:],
                eigvals=np.float32(vals),
                eigvecs=vecs,
                residuals=np.zeros(k, np.float32),
            )
        )
    with StoreWriter.open(path, ids=ids, manifest=manifest) as w:
        for shard in range(w.num_shards):
            w.write_shard(shard, [r for r in results if r.index in w.shard_range(shard)])
    return path


@pytest.fixture
def known_store(tmp_path):
    """Grid 4x6 on a 30x60 image: vector 1 positive on the left half, vector 2 on the top half."""
    h, w = 4, 6
    yy, xx = np.mgrid[0:h, 0:w]
    vecs = np.stack([_unit(np.ones((h, w))), _unit(np.where(xx < 3, 1.0, -1.0)), _unit(np.where(yy < 2, 1.0, -1.0))])
    images = {"a": ((30, 60), [0.0, 0.2, 0.5], vecs), "sub/b": ((30, 60), [0.0, 0.3, 0.6], vecs)}
    return write_store(tmp_path / "known.zarr", images, k=3, max_grid=(4, 6), failed=("broken",))


def png(path):
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img)


def test_sazs_png_masks_have_the_known_orientation_size_and_values(known_store, tmp_path):
    out = tmp_path / "eigs"
    summary = export_store(str(known_store), out, ExportConfig(format="sazs-png", num_vectors=2, progress=False))
    assert summary.written == 2 and not summary.failed and list(summary.no_priors) == ["broken"]
    k0, k1 = png(out / "a_k0.png"), png(out / "a_k1.png")
    assert k0.shape == (30, 60) and k0.dtype == np.uint8 and set(np.unique(k0)) == {0, 255}
    # vector 1 (k0): the left half of the image, exactly (bilinear, cell centres on pixel centres)
    assert (k0[:, :30] == 255).all() and (k0[:, 30:] == 0).all()
    # vector 2 (k1): the top half: rows, not columns (no transpose)
    assert (k1[:15] == 255).all() and (k1[15:] == 0).all()
    assert (out / "sub" / "b_k0.png").is_file() and not (out / "a_k2.png").exists()
    assert not list(out.rglob("broken*")) and not list(out.rglob("*.partial"))


def test_export_resumes_skips_complete_files_and_refuses_another_setting(known_store, tmp_path):
    out = tmp_path / "eigs"
    cfg = ExportConfig(format="sazs-png", num_vectors=2, progress=False)
    export_store(str(known_store), out, cfg)
    again = export_store(str(known_store), out, cfg)
    assert (again.written, again.existing) == (0, 2)
    (out / "sub" / "b_k1.png").unlink()  # as if killed before b's second mask
    again = export_store(str(known_store), out, cfg)
    assert (again.written, again.existing) == (1, 1) and (out / "sub" / "b_k1.png").is_file()
    with pytest.raises(StoreError, match="another store or setting"):
        export_store(str(known_store), out, ExportConfig(format="sazs-png", num_vectors=1, progress=False))
    redo = export_store(
        str(known_store), out, ExportConfig(format="sazs-png", num_vectors=1, overwrite=True, progress=False)
    )
    assert redo.written == 2


def test_export_subsets_and_cli_errors(known_store, tmp_path, capsys):
    out = tmp_path / "sub"
    rc = store_cli.main(["export", str(known_store), str(out), "--format", "npz", "--ids", "sub/b", "--no-progress"])
    assert rc == 0 and [p.relative_to(out).as_posix() for p in out.rglob("*.npz")] == ["sub/b.npz"]
    rc = store_cli.main(
        ["export", str(known_store), str(tmp_path / "lim"), "--format", "npz", "--limit", "1", "--no-progress"]
    )
    assert rc == 0 and [p.name for p in (tmp_path / "lim").rglob("*.npz")] == ["a.npz"]
    capsys.readouterr()
    rc = store_cli.main(["export", str(known_store), str(out), "--format", "npz", "--ids", "nope", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "'nope'" in err and len(err.strip().splitlines()) == 1
    rc = store_cli.main(["export", str(known_store), str(out), "--format", "dsm", "--num-vectors", "3"])
    assert rc == 2 and "at most 2" in capsys.readouterr().err


def test_npz_loads_without_pickle(known_store, tmp_path):
    out = tmp_path / "npz"
    export_store(str(known_store), out, ExportConfig(format="npz", progress=False))
    with np.load(out / "a.npz", allow_pickle=False) as f:
        prior = open_store(known_store).get("a")
        np.testing.assert_array_equal(f["eigvecs"], prior.eigvecs)
        np.testing.assert_array_equal(f["eigvals"], prior.eigvals)
        assert f["eigvecs"].dtype == np.float32 and tuple(f["grid"]) == (4, 6) and tuple(f["image_size"]) == (30, 60)
        assert str(f["vectors"]) == "u" and str(f["id"]) == "a" and str(f["fingerprint"]) == prior_fp(known_store)


def prior_fp(path):
    return open_store(path).fingerprint


def graph_spectrum(rng, h, w, k):
    """A random connected patch graph: (u (k, h, w) of L_sym, eigenvalues, v of (D - W) v = λ D v, degrees)."""
    n = h * w
    a = rng.random((n, n))
    weights = (a + a.T) / 2 * (rng.random((n, n)) < 0.5)
    weights = np.maximum(weights, weights.T) + 0.05  # dense enough to be connected
    np.fill_diagonal(weights, 0)
    d = weights.sum(1)
    lsym = np.eye(n) - weights / np.sqrt(np.outer(d, d))
    lam, u = np.linalg.eigh(lsym)
    lam_g, v = scipy.linalg.eigh(np.diag(d) - weights, np.diag(d))  # v^T D v = I, as DSM's eigsh(M=D)
    u, v = u[:, :k].T, v[:, :k].T
    u = np.where((u > 0).mean(1, keepdims=True) > 0.5, -u, u)  # the store's rule (minority positive)
    u[0] = np.abs(u[0])
    np.testing.assert_allclose(lam[:k], lam_g[:k], atol=1e-10)
    return u.reshape(k, h, w).astype(np.float32), lam[:k], v, d


def test_dsm_export_holds_their_generalised_vectors_and_sign_rule(tmp_path):
    rng = np.random.default_rng(0)
    h, w, k = 3, 5, 4
    u, lam, v, d = graph_spectrum(rng, h, w, k)
    store = write_store(tmp_path / "g.zarr", {"x": ((30, 50), lam, u)}, k=k, max_grid=(h, w))
    out = tmp_path / "dsm"
    export_store(str(store), out, ExportConfig(format="dsm", progress=False))
    data = torch.load(out / "x.pth", weights_only=True)
    assert set(data) == {"eigenvalues", "eigenvectors", "grid"} and data["grid"].tolist() == [h, w]
    assert data["eigenvectors"].dtype == torch.float32 and tuple(data["eigenvectors"].shape) == (k, h * w)
    assert data["eigenvalues"].dtype == torch.float32
    np.testing.assert_allclose(data["eigenvalues"].numpy(), lam, atol=1e-6)
    # DSM's v up to the volume of the graph (mean degree 1 here), with DSM's signs (their rule leaves an
    # all-negative vector as eigsh returned it: the solver's sign is taken as u's, which v = D^-1/2 u keeps)
    v = v * np.sign((v * u.reshape(k, -1)).sum(1, keepdims=True))
    want = dsm_signs(v * np.sqrt(d.sum() / d.size))
    got = data["eigenvectors"].numpy()
    np.testing.assert_allclose(got, want, atol=3e-3 * np.abs(want).max())
    np.testing.assert_allclose(got[0], 1 / np.sqrt(h * w), rtol=2e-3)  # DSM's trivial vector: constant
    positive = (got > 0).mean(1)
    assert ((positive <= 0.5) | (positive == 1.0)).all()


def test_dsm_round_trip_gives_the_exported_eigenvectors_back(tmp_path):
    rng = np.random.default_rng(1)
    images = {}
    for i, (h, w) in enumerate([(3, 5), (4, 4), (2, 6)]):
        u, lam, _, _ = graph_spectrum(rng, h, w, 4)
        images[f"img{i}" if i != 2 else "seq/img2"] = ((h * 16, w * 16), lam, u)
    store = write_store(tmp_path / "orig.zarr", images, k=4, max_grid=(4, 6))
    exported = tmp_path / "dsm"
    export_store(str(store), exported, ExportConfig(format="dsm", progress=False))
    assert (exported / "seq" / "img2.pth").is_file()
    sizes = {i: s for i, (s, _, _) in images.items()}
    dataset = {"name": "toy", "split": "val", "root": None, "num_images": 3, "ids_sha256": "y"}
    counts = import_dsm(
        exported,
        tmp_path / "imp.zarr",
        ids=list(images),
        image_size=sizes.__getitem__,
        dataset=dataset,
        cfg=ImportConfig(progress=False),
    )
    assert counts == {"pending": 0, "done": 3, "failed": 0}
    imported, original = open_store(tmp_path / "imp.zarr"), open_store(store)
    assert imported.manifest["laplacian"] == DSM_LAPLACIAN and "imported" in imported.manifest
    for id_ in images:
        file = torch.load(id_path_of(exported, id_), weights_only=True)
        got, orig = imported.get(id_), original.get(id_)
        assert got.grid == orig.grid and got.image_size == orig.image_size
        np.testing.assert_allclose(got.eigvecs.reshape(4, -1), file["eigenvectors"].numpy(), atol=2e-3)
        np.testing.assert_allclose(got.eigvals, orig.eigvals, atol=1e-6)
        assert np.isnan(got.residuals).all()  # no graph, no residuals
        np.testing.assert_array_equal(np.sign(got.eigvecs[1:]), np.sign(orig.eigvecs[1:]))  # v = D^-1/2 u
    # and the imported store exports to the same files
    again = tmp_path / "dsm2"
    export_store(str(tmp_path / "imp.zarr"), again, ExportConfig(format="dsm", progress=False))
    for id_ in images:
        a = torch.load(id_path_of(exported, id_), weights_only=True)["eigenvectors"].numpy()
        b = torch.load(id_path_of(again, id_), weights_only=True)["eigenvectors"].numpy()
        np.testing.assert_allclose(a, b, atol=2e-3)


def id_path_of(root, id_):
    return Path(root, id_ + ".pth")


class Payload:
    """A pickle that runs code when loaded without weights_only: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_import_dsm_cli_records_bad_files_never_runs_them_and_verifies(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for name, (hh, ww) in {
        "good": (64, 96),
        "sub/nested": (32, 48),
        "evil": (64, 64),
        "shape": (64, 64),
        "missing": (64, 64),
        "affinity": (64, 64),
    }.items():
        Image.fromarray(np.zeros((hh, ww, 3), np.uint8)).save(imgs / f"{name}.png")
    eigs = tmp_path / "eigs"
    (eigs / "sub").mkdir(parents=True)

    def dsm_file(name, grid, vals=(0.0, 0.1, 0.4)):
        n = grid[0] * grid[1]
        vecs = np.stack([np.full(n, 0.1), np.linspace(-1, 1, n), np.cos(np.arange(n))]).astype(np.float32)
        torch.save(
            {"eigenvalues": torch.tensor(vals, dtype=torch.float64), "eigenvectors": torch.from_numpy(vecs)},
            eigs / f"{name}.pth",
        )

    dsm_file("good", (4, 6))  # 64x96 // 16
    dsm_file("sub/nested", (2, 3))
    dsm_file("shape", (3, 3))  # 64x64 // 16 is 4x4: wrong shape
    dsm_file("affinity", (4, 4), vals=(3.0, 5.0, 9.0))  # eigenvalues of W, not of a Laplacian
    marker = tmp_path / "PWNED"
    torch.save({"eigenvalues": Payload(marker), "eigenvectors": torch.zeros(3, 16)}, eigs / "evil.pth")
    out = tmp_path / "imp.zarr"
    rc = store_cli.main(
        ["import-dsm", str(eigs), "--dataset", "folder", "--data", str(imgs), "--out", str(out), "--no-progress"]
    )
    assert rc == 0, capsys.readouterr().err
    assert not marker.exists()  # the payload never ran
    store = open_store(out)
    assert sorted(store.done_ids()) == ["good", "sub/nested"]
    failures = store.failures()
    assert set(failures) == {"evil", "shape", "missing", "affinity"}
    assert "weights_only" in failures["evil"] and "not a plain-tensor torch file" in failures["evil"]
    assert "grid is 4x4" in failures["shape"] and "--patch-size" in failures["shape"]
    assert "no DSM file" in failures["missing"] and "outside [0, 2]" in failures["affinity"]
    assert store.get("good").grid == (4, 6) and store.get("good").image_size == (64, 96)
    report = verify(str(out))
    assert report.finalized and report.ok, report.lines()
    m = store.manifest
    assert m["imported"]["source"] == str(eigs.resolve()) and m["imported"]["from"] == "deep-spectral-methods"
    assert m["dataset"]["name"] == "folder" and m["extractor"]["input_size_policy"]["patch_size"] == 16
    assert "weights_sha256" in m["extractor"] and m["extractor"]["weights_sha256"] is None
    capsys.readouterr()
    rc = store_cli.main(["info", str(out), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["counts"] == {"done": 2, "failed": 4, "pending": 0}


def test_import_dsm_fingerprint_follows_the_files(tmp_path):
    eigs = tmp_path / "eigs"
    eigs.mkdir()
    vecs = torch.from_numpy(np.stack([np.full(4, 0.5), [1.0, -1, 1, -1]]).astype(np.float32))
    torch.save({"eigenvalues": torch.tensor([0.0, 0.5]), "eigenvectors": vecs}, eigs / "a.pth")
    kw = dict(
        ids=["a"],
        image_size=lambda _: (32, 32),
        dataset={"name": "t", "split": "v", "ids_sha256": "z"},
        cfg=ImportConfig(progress=False),
    )
    import_dsm(eigs, tmp_path / "one.zarr", **kw)
    import_dsm(eigs, tmp_path / "one.zarr", **kw)  # resumes: same files, same fingerprint
    torch.save({"eigenvalues": torch.tensor([0.0, 0.6]), "eigenvectors": vecs}, eigs / "a.pth")
    with pytest.raises(StoreError, match="different setting"):
        import_dsm(eigs, tmp_path / "one.zarr", **kw)
