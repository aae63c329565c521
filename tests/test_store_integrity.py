"""finalize / verify, reader validation of bad input, dask view, info, merge, sazs-store CLI."""

import json
import shutil

import numpy as np
import pytest
import zarr
from storecheck import assert_same_arrays

from sazs.pipeline import cli as priors_cli
from sazs.stores import cli
from sazs.stores.format import CHECKSUM_FILE, PENDING, SUMMARY_FILE, StoreError
from sazs.stores.integrity import finalize, list_objects, verify
from sazs.stores.merge import merge
from sazs.stores.reader import open_store

FAST = ["--extractor", "color", "--short-side", "64", "--no-progress", "--preview", "0"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real store (5 sample images, shards of 2) computed once for the module."""
    out = tmp_path_factory.mktemp("built") / "s.zarr"
    assert priors_cli.main(["run", *FAST, "--limit", "5", "--shard-size", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def store(built, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(built, path)
    return path


def test_finalize_then_verify_ok_and_sha256sum_format(store):
    summary = finalize(str(store))
    assert summary["done"] == 5 and summary["num_objects"] == len(list_objects(*_fs(store)))
    lines = (store / CHECKSUM_FILE).read_text().splitlines()
    assert len(lines) == summary["num_objects"] and all(len(line.split("  ")[0]) == 64 for line in lines)
    assert json.loads((store / SUMMARY_FILE).read_text())["fingerprint"] == open_store(store).fingerprint
    report = verify(str(store))
    assert report.ok and report.finalized and not report.pending


def _fs(path):
    import fsspec

    return fsspec.core.url_to_fs(str(path))


def test_a_flipped_byte_anywhere_is_detected(store):
    finalize(str(store))
    keys = sorted(list_objects(*_fs(store)))
    assert any(k.startswith("eigvecs/c/") for k in keys) and "zarr.json" in keys
    for key in keys:
        path = store / key
        data = bytearray(path.read_bytes())
        pos = len(data) // 2
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            report = verify(str(store))
        finally:
            data[pos] ^= 0x01
            path.write_bytes(bytes(data))
        assert report.corrupted == [key] and not report.ok, key
    assert verify(str(store)).ok


def test_missing_extra_and_truncated_objects(store):
    finalize(str(store))
    shard = next(k for k in sorted(list_objects(*_fs(store))) if k.startswith("eigvecs/c/"))
    (store / "stray.bin").write_bytes(b"x")
    report = verify(str(store))
    assert report.extra == ["stray.bin"] and not report.ok
    (store / "stray.bin").unlink()
    data = (store / shard).read_bytes()
    (store / shard).write_bytes(data[: len(data) // 3])
    report = verify(str(store))
    assert shard in report.corrupted and report.unreadable
    (store / shard).unlink()
    report = verify(str(store))
    assert shard in report.missing


def test_nonfinite_values_and_high_residuals_are_reported(store):
    g = zarr.open_group(str(store), mode="r+")
    ev = np.asarray(g["eigvals"][0:2])
    ev[1, 3] = np.nan
    g["eigvals"][0:2] = ev
    res = np.asarray(g["residual"][2:4])
    res[0, 0] = 0.5
    g["residual"][2:4] = res
    s = open_store(store)
    report = verify(str(store))
    assert report.nonfinite == [s.ids[1]] and not report.ok
    assert report.high_residual == [s.ids[2]]


def test_pending_images_are_listed_but_not_damage(store):
    g = zarr.open_group(str(store), mode="r+")
    status = np.asarray(g["status"][4:5])
    status[:] = PENDING
    g["status"][4:5] = status
    report = verify(str(store))
    assert report.ok and report.pending == [open_store(store).ids[4]]
    with pytest.raises(StoreError, match="1 pending image"):
        finalize(str(store))
    finalize(str(store), allow_incomplete=True)


def test_reader_errors_name_the_object(store, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope.zarr")
    meta_path = store / "eigvals" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["data_type"] = "float64"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"eigvals has data type 'float64', expected 'float32'"):
        open_store(store)
    meta["data_type"] = "float32"
    meta["shape"] = [5, 3]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"eigvals has shape \(5, 3\), expected \(5, 8\)"):
        open_store(store)
    meta["shape"] = [5, 8]
    meta["codecs"].insert(0, {"name": "numcodecs.pickle", "configuration": {}})
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="numcodecs.pickle.*refusing"):
        open_store(store)
    meta["codecs"].pop(0)
    meta_path.write_text(json.dumps(meta))
    root = json.loads((store / "zarr.json").read_text())
    del root["attributes"]["manifest"]["solver"]
    (store / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(StoreError, match=r"missing the field\(s\) \['solver'\]"):
        open_store(store)
    (store / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="zarr.json is not valid JSON"):
        open_store(store)


def test_truncated_chunk_gives_a_store_error_on_get(store):
    s = open_store(store)
    shard = sorted(k for k in list_objects(*_fs(store)) if k.startswith("eigvecs/c/"))[0]
    data = (store / shard).read_bytes()
    (store / shard).write_bytes(data[:10])
    with pytest.raises(StoreError, match="eigvecs.*truncated or damaged"):
        open_store(store).get(s.ids[0])


def test_get_many_memory_url_and_dask_view(store):
    import fsspec

    local = open_store(store)
    fs = fsspec.filesystem("memory")
    fs.put(str(store), "memory://shared/s.zarr", recursive=True)
    remote = open_store("memory://shared/s.zarr")
    assert remote.ids == local.ids and remote.fingerprint == local.fingerprint
    for a, b in zip(local.get_many(local.ids), remote.get_many(local.ids)):
        np.testing.assert_array_equal(a.eigvecs, b.eigvecs)
    arrays = local.to_dask()
    assert arrays["eigvecs"].chunksize[0] == 1
    mean = arrays["eigvals"][arrays["status"] == 1].mean(axis=0).compute()
    np.testing.assert_allclose(mean, np.mean([p.eigvals for p in local.get_many(local.ids)], axis=0), rtol=1e-6)


def _status_pending(path, indices):
    g = zarr.open_group(str(path), mode="r+")
    status = np.asarray(g["status"][:])
    status[list(indices)] = PENDING
    g["status"][:] = status


def test_merge_disjoint_parts_equals_the_whole(store, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    shutil.copytree(store, a)
    shutil.copytree(store, b)
    _status_pending(a, [2, 3, 4])
    _status_pending(b, [0, 1])
    out = tmp_path / "m.zarr"
    assert merge(out, [str(a), str(b)]) == {"done": 5, "failed": 0, "pending": 0}
    assert_same_arrays(store, out)
    whole, merged = open_store(store), open_store(out)
    assert merged.fingerprint == whole.fingerprint and len(merged.manifest["merged_from"]) == 2
    assert verify(str(out)).ok
    with pytest.raises(StoreError, match="already exists"):
        merge(out, [str(a), str(b)])


def test_merge_conflicts_and_fingerprints(store, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    shutil.copytree(store, a)
    shutil.copytree(store, b)
    g = zarr.open_group(str(b), mode="r+")
    ev = np.asarray(g["eigvals"][0:2])
    ev[0, 1] += 0.25
    g["eigvals"][0:2] = ev
    ids = open_store(a).ids
    with pytest.raises(StoreError, match=rf"1 image\(s\) are done in several inputs.*{ids[0]}"):
        merge(tmp_path / "m.zarr", [str(a), str(b)])
    assert not (tmp_path / "m.zarr").exists() and not (tmp_path / "m.zarr.merging").exists()
    merge(tmp_path / "m.zarr", [str(a), str(b)], on_conflict="first")
    np.testing.assert_array_equal(
        open_store(tmp_path / "m.zarr").get(ids[0]).eigvals, open_store(a).get(ids[0]).eigvals
    )
    other = tmp_path / "other.zarr"
    assert priors_cli.main(["run", *FAST, "--limit", "5", "--knn", "7", "--out", str(other)]) == 0
    with pytest.raises(StoreError, match=r"different settings \(graph\.k: 10 != 7\)"):
        merge(tmp_path / "m2.zarr", [str(a), str(other)])


def test_store_cli(store, tmp_path, capsys):
    assert cli.main(["info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"] == {"done": 5, "failed": 0, "pending": 0} and info["num_eigs"] == 8
    assert info["extractor"]["name"] == "color" and info["bytes"] > 0 and not info["finalized"]
    assert cli.main(["info", str(store)]) == 0
    text = capsys.readouterr().out
    assert "5 done, 0 failed, 0 pending" in text and "fingerprint" in text
    png = tmp_path / "show.png"
    assert cli.main(["show", str(store), "--count", "2", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert cli.main(["finalize", str(store), "--no-progress"]) == 0
    assert cli.main(["verify", str(store), "--no-progress"]) == 0
    assert "result      OK" in capsys.readouterr().out
    victim = sorted(k for k in list_objects(*_fs(store)) if k.startswith("eigvecs/c/"))[0]
    data = bytearray((store / victim).read_bytes())
    data[-40] ^= 0xFF
    (store / victim).write_bytes(bytes(data))
    assert cli.main(["verify", str(store), "--no-progress", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["corrupted"] == [victim]
    assert cli.main(["info", str(tmp_path / "missing.zarr")]) == 2
    assert "is not a prior store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "sazs-store verify" in capsys.readouterr().out


def test_finalized_store_is_immutable_for_writers(store):
    finalize(str(store))
    assert priors_cli.main(["run", *FAST, "--limit", "5", "--shard-size", "2", "--out", str(store)]) == 2


def test_format_md_describes_what_the_writer_writes(store):
    """Every array row of stores/FORMAT.md matches the real store's metadata, and vice versa."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "src" / "sazs" / "stores" / "FORMAT.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| \([^)]*\) \| `(\w+)`", text, flags=re.M))
    written = {}
    for meta_path in sorted(store.glob("*/zarr.json")):
        meta = json.loads(meta_path.read_text())
        written[meta_path.parent.name] = meta["data_type"]
    assert rows == written
    manifest = open_store(store).manifest
    for key in manifest:
        assert f"`{key}`" in text, f"manifest field {key} is not documented in FORMAT.md"
    for section in ("dataset", "graph", "solver", "layout"):
        for key in manifest[section]:
            assert f"`{key}`" in text or key in text, f"{section}.{key} is not documented"


def test_run_command_exit_codes(capsys):
    """The shared dispatcher: user errors exit 2 (traceback only with -v), own codes, Ctrl-C 130."""
    import argparse

    from sazs.core.console import run_command

    class Boom(Exception):
        pass

    def ns(exc, verbose=False):
        def func(_):
            raise exc

        return argparse.Namespace(func=func, verbose=verbose)

    assert run_command("x", ns(KeyError("image id 'a' is not in store"))) == 2
    assert "x: error: image id 'a' is not in store" in capsys.readouterr().err
    assert run_command("x", ns(Boom("nan loss")), codes={Boom: 3}) == 3
    assert run_command("x", ns(KeyboardInterrupt()), interrupted="stopped") == 130
    assert "x: stopped" in capsys.readouterr().err
    with pytest.raises(ValueError):
        run_command("x", ns(ValueError("bad"), verbose=True))
    with pytest.raises(RuntimeError):  # a bug is not bad input: never swallowed
        run_command("x", ns(RuntimeError("bug")))
    assert run_command("x", argparse.Namespace(func=lambda _: 0)) == 0
