"""publish / pull against a real loopback S3 server (moto) through s3fs, and memory://."""

import json
import logging
import uuid

import fsspec
import numpy as np
import pytest
import zarr
from s3server import bucket, s3_server  # noqa: F401  (pytest fixtures)
from storecheck import ARRAYS, toy_manifest

from sazs.stores.format import CHECKSUM_FILE, LOCK_FILE, SUMMARY_FILE, StoreError
from sazs.stores.integrity import finalize, verify
from sazs.stores.publish import publish
from sazs.stores.pull import pull
from sazs.stores.reader import open_store
from sazs.stores.writer import ImageResult, StoreWriter

K = 4
IDS = [f"img{i:02d}" for i in range(7)]


def make_manifest(ids, *, knn=10, shard_size=3, max_grid=(6, 7)):
    return toy_manifest(ids, num_eigs=K, knn=knn, shard_size=shard_size, max_grid=max_grid)


def result(i, seed=0):
    rng = np.random.default_rng(seed + i)
    h, w = 3 + i % 4, 4 + i % 3
    return ImageResult(
        index=i,
        image_size=(h * 8, w * 8),
        grid=(h, w),
        eigvals=np.sort(rng.random(K)).astype(np.float32),
        eigvecs=rng.standard_normal((K, h, w)).astype(np.float32),
        residuals=np.full(K, 1e-6, np.float32),
    )


def make_store(path, *, knn=10, seed=0, final=True):
    with StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS, knn=knn)) as w:
        for shard in range(w.num_shards):
            w.write_shard(shard, [result(i, seed) for i in w.shard_range(shard)])
    if final:
        finalize(str(path))
    return path


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "local.zarr")


def assert_same_store(a, b):
    assert a.ids == b.ids and a.manifest == b.manifest
    for name in ARRAYS:
        np.testing.assert_array_equal(np.asarray(a.group[name][:]), np.asarray(b.group[name][:]), err_msg=name)


def flip_byte(fs, path):
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))


# -- publish to S3 ---------------------------------------------------------------------------


def test_publish_then_read_and_verify_on_s3(store, s3_server, bucket):
    url = f"s3://{bucket}/priors/x.zarr"
    opts = s3_server.storage_options
    assert publish(store, url, storage_options=opts, progress=False) == url
    fs = s3_server.filesystem()
    assert fs.exists(f"{bucket}/priors/x.zarr/{SUMMARY_FILE}")
    assert not fs.exists(f"{bucket}/priors/x.zarr/{LOCK_FILE}")
    assert fs.cat_file(f"{bucket}/priors/x.zarr/{CHECKSUM_FILE}") == (store / CHECKSUM_FILE).read_bytes()

    local, remote = open_store(store), open_store(url, storage_options=opts)
    assert remote.ids == local.ids and remote.manifest == local.manifest
    for id_ in (IDS[0], IDS[4], IDS[-1]):
        a, b = local.get(id_), remote.get(id_)
        np.testing.assert_array_equal(a.eigvecs, b.eigvecs)
        np.testing.assert_array_equal(a.eigvals, b.eigvals)
        assert a.grid == b.grid and a.image_size == b.image_size
    report = verify(url, storage_options=opts)
    assert report.ok and report.finalized and report.num_objects > 0

    # dataset-wide statistics through dask, straight from S3
    def stats(s):
        ev = s.to_dask()["eigvals"]
        return np.array([x.compute() for x in (ev.mean(axis=0), ev.std(axis=0), ev.min(), ev.max())], dtype=object)

    for x, y in zip(stats(local), stats(remote)):
        np.testing.assert_array_equal(x, y)


def test_publish_is_immutable_and_idempotent(store, tmp_path, s3_server, bucket, caplog):
    url = f"s3://{bucket}/x.zarr"
    opts = s3_server.storage_options
    publish(store, url, storage_options=opts, progress=False)
    fs = s3_server.filesystem()
    before = {p: i["LastModified"] for p, i in fs.find(f"{bucket}/x.zarr", detail=True).items()}
    with caplog.at_level(logging.INFO, logger="sazs.stores.publish"):
        assert publish(store, url, storage_options=opts, progress=False) == url
    assert "already published" in caplog.text
    after = {p: i["LastModified"] for p, i in fs.find(f"{bucket}/x.zarr", detail=True).items()}
    assert after == before  # nothing re-uploaded

    other = make_store(tmp_path / "other.zarr", knn=20, seed=5)
    with pytest.raises(StoreError, match=rf"a different store is already published at {url}.*new URL"):
        publish(other, url, storage_options=opts, progress=False)
    assert open_store(url, storage_options=opts).manifest["graph"]["k"] == 10


def test_publish_refuses_unfinalised_and_damaged(tmp_path, s3_server, bucket):
    opts = s3_server.storage_options
    raw = make_store(tmp_path / "raw.zarr", final=False)
    with pytest.raises(StoreError, match=r"finalize it first: sazs-store finalize .*raw\.zarr"):
        publish(raw, f"s3://{bucket}/raw.zarr", storage_options=opts, progress=False)
    with pytest.raises(StoreError, match="not a prior store"):
        publish(tmp_path, f"s3://{bucket}/nothing.zarr", storage_options=opts, progress=False)

    bad = make_store(tmp_path / "bad.zarr")
    flip_byte(fsspec.filesystem("file"), str(bad / "eigvecs" / "c" / "1" / "0" / "0" / "0"))
    with pytest.raises(StoreError, match=r"fails verification \(corrupted: eigvecs/c/1/0/0/0\)"):
        publish(bad, f"s3://{bucket}/bad.zarr", storage_options=opts, progress=False)
    assert s3_server.filesystem().find(bucket) == []  # nothing uploaded


def test_interrupted_publish_resumes(store, s3_server, bucket, monkeypatch):
    import s3fs

    url = f"s3://{bucket}/x.zarr"
    opts = s3_server.storage_options
    real_put = s3fs.S3FileSystem.put_file
    calls = []

    def flaky_put(self, lpath, rpath, *args, **kwargs):
        calls.append(rpath)
        if len(calls) > 6:
            raise ConnectionResetError("network went away")
        return real_put(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "put_file", flaky_put)
    with pytest.raises(StoreError, match=rf"uploading .* failed for {url}.*re-run"):
        publish(store, url, storage_options=opts, progress=False, max_workers=1)
    fs = s3_server.filesystem()
    root = f"{bucket}/x.zarr"
    assert not fs.exists(f"{root}/{SUMMARY_FILE}") and fs.exists(f"{root}/{LOCK_FILE}")
    assert not fs.exists(f"{root}/zarr.json")  # a partial upload is not an openable store
    with pytest.raises(StoreError, match="not a prior store"):
        open_store(url, storage_options=opts)
    with pytest.raises(StoreError, match="not a published store / upload incomplete"):
        pull(url, store.parent / "pulled", storage_options=opts, progress=False)

    calls.clear()
    monkeypatch.setattr(
        s3fs.S3FileSystem,
        "put_file",
        lambda self, lpath, r, *a, **k: (calls.append(r), real_put(self, lpath, r, *a, **k)),
    )
    publish(store, url, storage_options=opts, progress=False)
    num_objects = len((store / CHECKSUM_FILE).read_text().splitlines())
    assert 0 < len(calls) <= num_objects - 6  # the six objects already there were kept
    assert verify(url, storage_options=opts).ok and not fs.exists(f"{root}/{LOCK_FILE}")


def test_partial_upload_without_lock_is_overwritten(store, s3_server, bucket):
    """Objects uploaded by hand (or by a crashed tool), no summary: publish completes it."""
    url = f"s3://{bucket}/x.zarr"
    opts = s3_server.storage_options
    fs = s3_server.filesystem()
    fs.put(str(store / "eigvecs"), f"{bucket}/x.zarr/eigvecs", recursive=True)
    fs.pipe_file(f"{bucket}/x.zarr/status/c/0", b"garbage")  # a torn object
    publish(store, url, storage_options=opts, progress=False)
    assert verify(url, storage_options=opts).ok


def test_publish_refuses_foreign_objects(store, s3_server, bucket):
    url = f"s3://{bucket}/x.zarr"
    s3_server.filesystem().pipe_file(f"{bucket}/x.zarr/notes.txt", b"mine")
    with pytest.raises(StoreError, match=r"not part of .*\(notes\.txt\).*new URL"):
        publish(store, url, storage_options=s3_server.storage_options, progress=False)


# -- pull -----------------------------------------------------------------------------------


def test_pull_round_trip(store, tmp_path, s3_server, bucket, caplog):
    url = f"s3://{bucket}/x.zarr"
    opts = s3_server.storage_options
    publish(store, url, storage_options=opts, progress=False)
    dest = tmp_path / "pulled" / "x.zarr"
    report = pull(url, dest, storage_options=opts, progress=False)
    assert report.ok and report.finalized and report.url == str(dest)
    assert_same_store(open_store(store), open_store(dest))
    assert (dest / SUMMARY_FILE).read_bytes() == (store / SUMMARY_FILE).read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["x.zarr"]  # no temporary left

    with caplog.at_level(logging.INFO, logger="sazs.stores.pull"):
        assert pull(url, dest, storage_options=opts, progress=False).ok  # same store: no-op
    assert "nothing to do" in caplog.text

    # a damaged local copy of the same store is replaced by a good one
    flip_byte(fsspec.filesystem("file"), str(dest / "eigvals" / "c" / "0" / "0"))
    assert pull(url, dest, storage_options=opts, progress=False).ok
    assert verify(str(dest)).ok

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("keep me")
    with pytest.raises(StoreError, match="not empty and does not hold the store"):
        pull(url, busy, storage_options=opts, progress=False)
    assert (busy / "thesis.tex").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert pull(url, empty, storage_options=opts, progress=False).ok


def test_pull_refuses_a_corrupted_object(store, tmp_path, s3_server, bucket):
    url = f"s3://{bucket}/x.zarr"
    opts = s3_server.storage_options
    publish(store, url, storage_options=opts, progress=False)
    flip_byte(s3_server.filesystem(), f"{bucket}/x.zarr/eigvecs/c/2/0/0/0")
    dest = tmp_path / "pulled.zarr"
    with pytest.raises(StoreError, match=r"corrupted: eigvecs/c/2/0/0/0.*nothing was written"):
        pull(url, dest, storage_options=opts, progress=False)
    assert list(tmp_path.iterdir()) == [store]  # neither dest nor a temporary directory


def test_pull_refuses_unpublished(s3_server, bucket, tmp_path):
    with pytest.raises(StoreError, match=rf"s3://{bucket}/none.zarr is not a published store"):
        pull(f"s3://{bucket}/none.zarr", tmp_path / "d", storage_options=s3_server.storage_options, progress=False)
    assert not (tmp_path / "d").exists()


def test_pull_refuses_keys_outside_the_store(store, tmp_path):
    """A tampered checksum file cannot make pull write outside the destination."""
    url = f"memory://sazs-test-{uuid.uuid4().hex[:8]}/x.zarr"
    fs = fsspec.filesystem("memory")
    try:
        publish(store, url, progress=False)
        root = url.removeprefix("memory://")
        text = fs.cat_file(f"{root}/{CHECKSUM_FILE}") + b"0" * 64 + b"  ../escape\n"
        fs.pipe_file(f"{root}/{CHECKSUM_FILE}", text)
        summary = json.loads(fs.cat_file(f"{root}/{SUMMARY_FILE}"))
        summary["checksums_sha256"] = __import__("hashlib").sha256(text).hexdigest()
        fs.pipe_file(f"{root}/{SUMMARY_FILE}", json.dumps(summary).encode())
        with pytest.raises(StoreError, match=r"'\.\./escape'.*not a plain relative path"):
            pull(url, tmp_path / "d", progress=False)
        assert not (tmp_path / "escape").exists() and not (tmp_path / "d").exists()
    finally:
        fs.rm(url.removeprefix("memory://").split("/")[0], recursive=True)


# -- other destinations ------------------------------------------------------------------------


def test_memory_and_local_round_trip(store, tmp_path):
    url = f"memory://sazs-test-{uuid.uuid4().hex[:8]}/x.zarr"
    fs = fsspec.filesystem("memory")
    try:
        publish(store, url, progress=False)
        assert publish(store, url, progress=False) == url
        remote = open_store(url)
        assert_same_store(open_store(store), remote)
        assert verify(url).ok
        assert pull(url, tmp_path / "back.zarr", progress=False).ok
        assert_same_store(open_store(store), open_store(tmp_path / "back.zarr"))
    finally:
        fs.rm(url.removeprefix("memory://").split("/")[0], recursive=True)

    # a plain local path as the destination (e.g. a shared file system)
    shared = tmp_path / "shared" / "x.zarr"
    publish(store, str(shared), progress=False)
    assert verify(str(shared)).ok
    assert zarr.open_group(str(shared), mode="r").attrs["manifest"] == open_store(store).manifest


def test_publish_refuses_a_destination_being_written(store, tmp_path):
    """A local destination where a pipeline job holds the writer's lock is left alone."""
    target = make_store(tmp_path / "target.zarr", final=False)
    (target / LOCK_FILE).write_text(json.dumps({"owner": "alice@gpu1", "pid": 1, "command": "sazs-priors run"}))
    with pytest.raises(StoreError, match=r"locked by a writer \(alice@gpu1 pid 1, command: sazs-priors run\)"):
        publish(store, str(target), progress=False)
    assert not (target / SUMMARY_FILE).exists()
