"""The store writer: layout, resume, refusal of other settings, partial shards, reader."""

import json

import numpy as np
import pytest
import zarr

from sazs.stores.format import DONE, FAILED, PENDING, StoreError
from sazs.stores.manifest import build_manifest, fingerprint
from sazs.stores.reader import open_store
from sazs.stores.writer import ImageResult, StoreWriter

K = 4


def make_manifest(ids, *, k=K, knn=10, shard_size=2, max_grid=(6, 7)):
    return build_manifest(
        dataset={
            "name": "toy",
            "split": "val",
            "root": "/nowhere",
            "num_images": len(ids),
            "ids_sha256": str(hash(tuple(ids))),
        },
        extractor={"name": "color", "weights_sha256": None, "facet": "key", "device": "cpu"},
        graph={"k": knn, "threshold": 0.0},
        solver={"solver": "eigsh", "num_eigs": k},
        num_eigs=k,
        layout={"shard_size": shard_size, "max_grid": list(max_grid), "eigvecs_dtype": "float16"},
    )


def result(i, grid=(3, 5), seed=0):
    rng = np.random.default_rng(seed + i)
    h, w = grid
    return ImageResult(
        index=i,
        image_size=(h * 8, w * 8),
        grid=grid,
        eigvals=np.sort(rng.random(K)).astype(np.float32),
        eigvecs=rng.standard_normal((K, h, w)).astype(np.float32),
        residuals=np.full(K, 1e-6, np.float32),
    )


IDS = ["a", "b", "c", "d", "e"]


def test_layout_and_roundtrip(tmp_path):
    path = tmp_path / "s.zarr"
    w = StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS))
    assert w.num_shards == 3 and list(w.shard_range(2)) == [4]
    assert w.todo() == {0: [0, 1], 1: [2, 3], 2: [4]}
    w.write_shard(0, [result(0), ImageResult(index=1, image_size=(5, 5), error="ImageError: too small")])
    g = zarr.open_group(str(path), mode="r")
    assert g["eigvecs"].shape == (5, K, 6, 7) and g["eigvecs"].dtype == np.float16
    assert g["eigvecs"].chunks == (1, K, 6, 7) and g["eigvecs"].shards == (2, K, 6, 7)
    # ids are variable-length UTF-8 (Zarr v3 "string"), not fixed-width numpy U
    assert json.loads((path / "ids" / "zarr.json").read_text())["data_type"] == "string"
    assert list(g["status"][:]) == [DONE, FAILED, PENDING, PENDING, PENDING]
    store = open_store(path)
    assert store.ids == IDS and store.fingerprint == fingerprint(store.manifest)
    p = store.get("a")
    ref = result(0)
    assert p.grid == (3, 5) and p.eigvecs.shape == (K, 3, 5)
    np.testing.assert_allclose(p.eigvecs, ref.eigvecs, atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(p.eigvals, ref.eigvals)
    # the padding beyond the grid is zero
    assert not np.asarray(g["eigvecs"][0, :, 3:, :]).any() and not np.asarray(g["eigvecs"][0, :, :, 5:]).any()
    assert store.failures() == {"b": "ImageError: too small"}
    with pytest.raises(StoreError, match="too small"):
        store.get("b")
    with pytest.raises(StoreError, match="not computed"):
        store.get("c")
    with pytest.raises(KeyError, match="'zz'"):
        store.get("zz")


def test_resume_same_setting_and_refuse_other(tmp_path):
    path = tmp_path / "s.zarr"
    with StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS)) as w:
        w.write_shard(0, [result(0), result(1)])
    with StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS)) as again:
        assert again.todo() == {1: [2, 3], 2: [4]}
    with pytest.raises(StoreError, match=r"graph\.k: 10 != 20.*--overwrite"):
        StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS, knn=20))
    fresh = StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS, knn=20), overwrite=True)
    assert fresh.todo() == {0: [0, 1], 1: [2, 3], 2: [4]}


def test_layout_only_changes_do_not_change_fingerprint():
    a = make_manifest(IDS, shard_size=2)
    b = make_manifest(IDS, shard_size=64, max_grid=(9, 9))
    b["dataset"]["root"] = "/elsewhere"
    b["extractor"]["device"] = "cuda"
    assert a["fingerprint"] == b["fingerprint"]
    assert make_manifest(IDS, k=5)["fingerprint"] != a["fingerprint"]


def test_refuses_non_store_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a prior store"):
        StoreWriter.open(tmp_path, ids=IDS, manifest=make_manifest(IDS), overwrite=True)
    assert (tmp_path / "precious.txt").exists()


def test_retry_keeps_other_images_of_the_shard(tmp_path):
    path = tmp_path / "s.zarr"
    w = StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS))
    w.write_shard(0, [result(0), ImageResult(index=1, error="transient")])
    assert w.todo(retry_failed=True) == {0: [1], 1: [2, 3], 2: [4]}
    w.write_shard(0, [result(1)])
    store = open_store(path)
    np.testing.assert_allclose(store.get("a").eigvecs, result(0).eigvecs, atol=2e-3)
    np.testing.assert_allclose(store.get("b").eigvecs, result(1).eigvecs, atol=2e-3)
    assert store.failures() == {}


def test_rejects_bad_results(tmp_path):
    w = StoreWriter.open(tmp_path / "s.zarr", ids=IDS, manifest=make_manifest(IDS))
    with pytest.raises(StoreError, match="exceeds the store's max grid"):
        w.write_shard(0, [result(0, grid=(7, 7))])
    with pytest.raises(StoreError, match="outside shard"):
        w.write_shard(0, [result(3)])


def test_reader_rejects_non_stores(tmp_path):
    with pytest.raises(StoreError, match="not a prior store"):
        open_store(tmp_path)
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="no sazs manifest"):
        open_store(tmp_path / "g.zarr")
    path = tmp_path / "s.zarr"
    StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS))
    g = zarr.open_group(str(path), mode="r+")
    m = dict(g.attrs["manifest"])
    m["format_version"] = "2.0"
    g.attrs["manifest"] = m
    with pytest.raises(StoreError, match="format version 2.0"):
        open_store(path)
