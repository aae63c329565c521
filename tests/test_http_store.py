"""Plain web hosting: a store published as static files, read over loopback HTTP.

The server (tests/httpserver.py) lists no directories and answers byte ranges, like a
public bucket or nginx: everything must work from the keys the store's side files name.
"""

import itertools
import logging
import socket

import numpy as np
import pytest
import torch
from httpserver import http_server  # noqa: F401  (pytest fixture)
from storecheck import assert_same_arrays, toy_manifest

from sazs.stores import cli, commands
from sazs.stores import pull as pull_module
from sazs.stores.format import CHECKSUM_FILE, SUMMARY_FILE, StoreError
from sazs.stores.integrity import finalize, verify
from sazs.stores.publish import publish
from sazs.stores.pull import pull
from sazs.stores.reader import open_store
from sazs.stores.writer import ImageResult, StoreWriter

K = 4
IDS = [f"img{i:02d}" for i in range(7)]
FAILED = "img03"
SHARD = "/eigvecs/c/1/0/0/0"  # the second shard of eigenvectors (images 3..5)


def make_store(path):
    with StoreWriter.open(path, ids=IDS, manifest=toy_manifest(IDS, num_eigs=K)) as w:
        for shard in range(w.num_shards):
            results = []
            for i in w.shard_range(shard):
                if IDS[i] == FAILED:
                    results.append(ImageResult(index=i, error="solver did not converge (synthetic)"))
                    continue
                rng = np.random.default_rng(i)
                h, w_ = 3 + i % 4, 4 + i % 3
                results.append(
                    ImageResult(
                        index=i,
                        image_size=(h * 8, w_ * 8),
                        grid=(h, w_),
                        eigvals=np.sort(rng.random(K)).astype(np.float32),
                        eigvecs=rng.standard_normal((K, h, w_)).astype(np.float32),
                        residuals=np.full(K, 1e-6, np.float32),
                    )
                )
            w.write_shard(shard, results)
    finalize(str(path))
    return path


@pytest.fixture
def served(tmp_path, http_server):
    """(local store, its URL on the loopback server): published as files into a served folder."""
    local = make_store(tmp_path / "local.zarr")
    site = tmp_path / "site" / "priors" / "x.zarr"
    publish(local, str(site), progress=False)
    return local, http_server.url_for(site)


@pytest.fixture(autouse=True)
def _no_retry_wait(monkeypatch):
    monkeypatch.setattr(pull_module, "RETRY_WAIT_S", 0.0)


def test_a_store_served_over_http_reads_identically(served, http_server):
    local, url = served
    assert url.startswith("http://127.0.0.1:")
    a, b = open_store(local), open_store(url)
    assert b.manifest == a.manifest and b.ids == a.ids
    assert_same_arrays(local, url)  # every array, bitwise
    assert b.failures() == a.failures() == {FAILED: "solver did not converge (synthetic)"}
    for id_ in a.done_ids():
        p, q = a.get(id_), b.get(id_)
        np.testing.assert_array_equal(p.eigvecs, q.eigvecs)
        np.testing.assert_array_equal(p.eigvals, q.eigvals)
        assert (p.grid, p.image_size) == (q.grid, q.image_size)
    with pytest.raises(StoreError, match=rf"no priors for '{FAILED}' in {url}: solver did not converge"):
        b.get(FAILED)
    # verify and info work from the checksum file: nothing is listed
    report = verify(url)
    num_objects = len((local / CHECKSUM_FILE).read_text().splitlines())
    assert report.ok and report.finalized and report.num_objects == num_objects
    info = commands.store_info(url)
    assert info["finalized"] and info["counts"] == {"done": 6, "failed": 1, "pending": 0}
    assert info["objects"] == report.num_objects and info["damaged"] == {"missing_data": 0, "bad_status": 0}
    # every request was for a file: the server would have answered a directory with 404
    prefix = http_server.path_of(url)
    assert {p for _, p in http_server.requests if not p.startswith(prefix + "/")} == set()
    assert all(not p.endswith("/") and p != prefix for _, p in http_server.requests)


def test_pull_over_http_round_trip(served, tmp_path, capsys):
    local, url = served
    dest = tmp_path / "pulled" / "x.zarr"
    assert cli.main(["pull", url, str(dest), "--no-progress"]) == 0
    assert f"pulled {url} → {dest} (verified)" in capsys.readouterr().out
    assert_same_arrays(local, dest)
    assert (dest / SUMMARY_FILE).read_bytes() == (local / SUMMARY_FILE).read_bytes()
    assert verify(str(dest)).ok
    assert sorted(p.name for p in dest.parent.iterdir()) == ["x.zarr"]


def test_pull_retries_a_dropped_connection(served, tmp_path, http_server, caplog):
    local, url = served
    http_server.drop[http_server.path_of(url) + SHARD] = 1  # half the shard, then the connection closes
    with caplog.at_level(logging.WARNING, logger="sazs.stores.pull"):
        report = pull(url, tmp_path / "x.zarr", progress=False)
    assert report.ok
    assert "downloading eigvecs/c/1/0/0/0" in caplog.text and "retrying" in caplog.text
    assert_same_arrays(local, tmp_path / "x.zarr")


def test_pull_fails_cleanly_when_the_server_keeps_dropping(served, tmp_path, http_server, capsys):
    _, url = served
    http_server.drop[http_server.path_of(url) + SHARD] = -1
    dest = tmp_path / "out" / "x.zarr"
    with pytest.raises(
        StoreError,
        match=rf"downloading eigvecs/c/1/0/0/0 from {url} failed \(attempt 3 of 3\): "
        r"ClientPayloadError.*nothing was written to .*x\.zarr.*re-run the pull",
    ):
        pull(url, dest, progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # neither the store nor a temporary that looks like one
    # the CLI: one line naming the object and the fix, exit 2
    assert cli.main(["pull", url, str(dest), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eigvecs/c/1/0/0/0" in err and "re-run the pull" in err
    assert not dest.exists()


def test_pull_reports_a_corrupted_object(served, tmp_path, http_server):
    _, url = served
    http_server.corrupt.add(http_server.path_of(url) + SHARD)
    dest = tmp_path / "x.zarr"
    with pytest.raises(StoreError, match=r"fails verification \(corrupted: eigvecs/c/1/0/0/0\).*nothing was written"):
        pull(url, dest, progress=False)
    assert not dest.exists() and not (tmp_path / ".x.zarr.pulling").exists()
    report = verify(url)
    assert report.corrupted == ["eigvecs/c/1/0/0/0"] and not report.ok


def test_an_object_missing_from_the_server(served, tmp_path):
    local, url = served
    site = tmp_path / "site" / "priors" / "x.zarr"
    (site / "eigvals" / "c" / "1" / "0").unlink()
    with pytest.raises(StoreError, match=rf"{url} lacks 1 object\(s\) listed in its checksums \(eigvals/c/1/0\)"):
        pull(url, tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()
    assert verify(url).missing == ["eigvals/c/1/0"]


def test_reads_retry_a_dropped_connection(served, http_server):
    local, url = served
    store = open_store(url)
    http_server.drop[http_server.path_of(url) + SHARD] = 1
    np.testing.assert_array_equal(store.get("img04").eigvecs, open_store(local).get("img04").eigvecs)
    http_server.drop[http_server.path_of(url) + SHARD] = -1
    with pytest.raises(
        StoreError,
        match=rf"cannot read {url}/eigvecs: .* \(after 3 attempt\(s\)\); check that the "
        "server is up",
    ):
        open_store(url).get("img05")  # a new handle: the verified shard is cached in the first


def test_opening_errors_name_the_url_and_the_fix(served, http_server, tmp_path):
    _, url = served
    wrong = url.replace("x.zarr", "nope.zarr")
    with pytest.raises(
        StoreError,
        match=rf"{wrong} is not a prior store \({wrong}/zarr.json is not found, HTTP "
        r"404\); check the URL",
    ):
        open_store(wrong)
    with pytest.raises(StoreError, match=rf"{wrong} is not a published store"):
        pull(wrong, tmp_path / "d", progress=False)

    http_server.ranges = False
    with pytest.raises(StoreError, match=r"ignores HTTP Range requests .*serve the store with one that supports"):
        open_store(url)
    http_server.ranges = True

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = f"http://127.0.0.1:{port}/x.zarr"
    with pytest.raises(StoreError, match=rf"cannot read {down}/zarr.json \(ClientConnectorError.*the server is up"):
        open_store(down)
    with pytest.raises(StoreError, match=rf"cannot read {down}/{SUMMARY_FILE} .*the server is up"):
        pull(down, tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


def test_training_reads_priors_over_http(tmp_path, http_server):
    """The trainer's dataset and its loader workers stream priors from the web server."""
    from sazs.datasets.synthetic import make_voc
    from sazs.pipeline import cli as priors_cli
    from sazs.train.data import AugmentConfig, DataConfig, PriorSegDataset, build_loader

    voc = make_voc(tmp_path / "voc", num_train=4, num_val=1, size=(48, 64))
    store = tmp_path / "train.zarr"
    assert (
        priors_cli.main(
            [
                "run",
                "--dataset",
                "voc",
                "--data",
                str(voc),
                "--split",
                "train",
                "--extractor",
                "color",
                "--short-side",
                "32",
                "--out",
                str(store),
                "--no-progress",
                "--preview",
                "0",
            ]
        )
        == 0
    )
    finalize(str(store))
    site = tmp_path / "site" / "train.zarr"
    publish(store, str(site), progress=False)

    def batches(priors):
        cfg = DataConfig(
            dataset="voc", root=str(voc), fold=0, priors=priors, prior_stride=8, augment=AugmentConfig(crop_size=32)
        )
        return list(itertools.islice(iter(build_loader(PriorSegDataset(cfg), batch_size=2, num_workers=2, seed=0)), 2))

    for x, y in zip(batches(str(store)), batches(http_server.url_for(site))):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["eigvecs"], y["eigvecs"])
