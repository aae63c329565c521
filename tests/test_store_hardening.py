"""Hardening of the store side: damage in unfinalised stores, bounded JSON and
sizes, atomic finalize and stuck states, codecs checked before decoding, the fingerprint
recomputed from the manifest, and one-line errors for full or read-only disks."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from storecheck import toy_manifest

from sazs.core.console import run_command
from sazs.pipeline import cli as priors_cli
from sazs.pipeline.graph import GraphConfig
from sazs.stores import cli
from sazs.stores.commands import graph_summary
from sazs.stores.format import CHECKSUM_FILE, DONE, StoreError
from sazs.stores.integrity import finalize, is_finalized, verify
from sazs.stores.lock import read_lock
from sazs.stores.merge import merge
from sazs.stores.reader import open_store
from sazs.stores.writer import ImageResult, StoreWriter

K = 4
IDS = [f"im{i}" for i in range(7)]  # shards of 3: [0, 1, 2], [3, 4, 5], [6]
FAST = ["--extractor", "color", "--short-side", "64", "--no-progress", "--preview", "0"]


def result(i):
    rng = np.random.default_rng(i)
    h, w = 3 + i % 3, 4 + i % 2
    return ImageResult(
        index=i,
        image_size=(h * 8, w * 8),
        grid=(h, w),
        eigvals=np.sort(rng.uniform(0, 1.5, K)).astype(np.float32),
        eigvecs=rng.standard_normal((K, h, w)).astype(np.float32),
        residuals=np.full(K, 1e-6, np.float32),
    )


def make_store(path, ids=IDS):
    with StoreWriter.open(path, ids=ids, manifest=toy_manifest(ids, num_eigs=K)) as w:
        for shard in range(w.num_shards):
            w.write_shard(shard, [result(i) for i in w.shard_range(shard)])
    return path


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "s.zarr")


def edit_json(path, change):
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def set_values(path, name, index, value):
    g = zarr.open_group(str(path), mode="r+")
    data = np.asarray(g[name][:])
    data[index] = value
    g[name][:] = data


# -- finding 2: damage in a store that is not finalised -------------------------------------------


def test_a_deleted_eigvecs_shard_of_an_unfinalised_store_is_damage(store, capsys):
    (store / "eigvecs" / "c" / "1" / "0" / "0" / "0").unlink()
    report = verify(str(store))
    assert not report.ok and not report.finalized
    assert [x.split()[0] for x in report.missing_data] == ["im3", "im4", "im5"]
    assert "eigvecs/c/1/0/0/0 is missing" in report.missing_data[0]
    with pytest.raises(StoreError, match="'im4'.*marked done but its eigvecs data is missing"):
        open_store(store).get("im4")
    open_store(store).get("im0")  # the other shards are intact
    assert cli.main(["verify", str(store), "--no-progress"]) == 1
    assert "result      DAMAGED" in capsys.readouterr().out
    assert cli.main(["info", str(store)]) == 0
    assert "7 done, 0 failed, 0 pending  (DAMAGED: 3 of the done have missing data" in capsys.readouterr().out
    assert cli.main(["info", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["damaged"] == {"missing_data": 3, "bad_status": 0}


def test_missing_objects_are_found_on_object_storage_too(store):
    import fsspec

    fs = fsspec.filesystem("memory")
    url = "memory://hardening/missing.zarr"
    fs.put(str(store), url, recursive=True)
    fs.rm(f"{url}/eigvecs/c/0/0/0/0")
    report = verify(url)
    assert [x.split()[0] for x in report.missing_data] == ["im0", "im1", "im2"] and not report.ok
    with pytest.raises(StoreError, match="eigvecs data is missing"):
        open_store(url).get("im0")
    fs.rm(url, recursive=True)


def test_a_deleted_small_array_chunk_and_a_zeroed_inner_chunk_are_damage(store):
    (store / "eigvals" / "c" / "0" / "0").unlink()
    set_values(store, "eigvecs", 4, 0)  # Zarr then drops image 4's chunk from its shard
    assert (store / "eigvecs" / "c" / "1" / "0" / "0" / "0").exists()
    report = verify(str(store))
    assert [x.split()[0] for x in report.missing_data] == ["im0", "im1", "im2", "im4"]
    assert "im4 (eigvecs are all zero)" in report.missing_data
    with pytest.raises(StoreError, match="its eigvals data is missing"):
        open_store(store).get("im1")
    with pytest.raises(StoreError, match="its eigvecs data is missing"):
        open_store(store).get("im4")


def test_undefined_status_and_out_of_range_values_are_damage(store, capsys):
    set_values(store, "status", 1, 254)
    set_values(store, "residual", (3, 0), -4e6)
    set_values(store, "eigvals", (5, 3), 3.0)
    report = verify(str(store))
    assert report.bad_status == ["im1 (status 254)"] and not report.ok
    assert [x.split()[0] for x in report.out_of_range] == ["im3", "im5"]
    with pytest.raises(StoreError, match="status is 254, not a defined value"):
        open_store(store).get("im1")
    assert cli.main(["info", str(store)]) == 0
    assert "1 with an undefined status" in capsys.readouterr().out
    # Resuming recomputes the image whose status is undefined, like a pending one.
    with StoreWriter.open(store, ids=IDS, manifest=toy_manifest(IDS, num_eigs=K)) as w:
        assert w.todo() == {0: [1]}
        w.write_shard(0, [result(1)])
    assert open_store(store).status()[1] == DONE


# -- finding 3: resource exhaustion ------------------------------------------------------------


def nested(depth=200_000) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("key", ["zarr.json", "status/zarr.json"])
def test_deeply_nested_json_is_refused_before_decoding(store, key, capsys):
    (store / key).write_text(nested())
    with pytest.raises(StoreError, match=f"{key} nests 200000 levels deep"):
        open_store(store)
    assert cli.main(["info", str(store)]) == 2
    assert f"{key} nests 200000 levels deep" in capsys.readouterr().err
    report = verify(str(store))
    assert not report.ok and "nests 200000 levels" in report.unreadable[0]
    with pytest.raises(StoreError, match="nests 200000 levels deep"):
        StoreWriter.open(store, ids=IDS, manifest=toy_manifest(IDS, num_eigs=K))


def test_oversized_json_and_nested_side_files(store, tmp_path):
    (store / "zarr.json").write_bytes(b" " * (17 << 20) + b"{}")
    with pytest.raises(StoreError, match="zarr.json is larger than 16 MiB"):
        open_store(store)
    (tmp_path / "lock").mkdir()
    (tmp_path / "lock" / ".sazs-lock").write_text(nested())
    assert read_lock(tmp_path / "lock") == {}  # unreadable lock, not a RecursionError


def test_absurd_sizes_are_refused_before_allocating(store):
    root = store / "zarr.json"
    original = root.read_text()
    edit_json(root, lambda m: m["attributes"]["manifest"]["layout"].update(max_grid=[50000, 50000]))
    with pytest.raises(StoreError, match=r"layout.max_grid = \[50000, 50000\] is not two integers in 1..4096"):
        open_store(store)
    root.write_text(original)
    edit_json(root, lambda m: m["attributes"]["manifest"]["dataset"].update(num_images=10**12))
    with pytest.raises(StoreError, match="dataset.num_images = 1000000000000"):
        open_store(store)
    root.write_text(original)
    for name in ("ids", "image_size", "grid", "eigvals", "eigvecs", "residual", "status", "errors"):
        edit_json(store / name / "zarr.json", lambda m: m.update(shape=[10**12, *m["shape"][1:]]))
    with pytest.raises(StoreError, match="ids claims 1000000000000 images"):
        open_store(store)
    with pytest.raises(StoreError, match="ids claims 1000000000000 images"):
        StoreWriter.open(store, ids=IDS, manifest=toy_manifest(IDS, num_eigs=K))
    with pytest.raises(StoreError, match="max_grid"):
        StoreWriter.open(store.parent / "new.zarr", ids=IDS, manifest=toy_manifest(IDS, max_grid=(50000, 50000)))


# -- finding 5: states that block the next run ---------------------------------------------------


def test_finalize_on_a_full_disk_leaves_no_partial_checksum_file(store, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match=r"No space left on device.*re-run `sazs-store finalize`"):
        finalize(str(store))
    assert not is_finalized(str(store)) and not list(store.glob("*.partial"))
    StoreWriter.open(store, ids=IDS, manifest=toy_manifest(IDS, num_eigs=K)).close()  # still resumable
    monkeypatch.undo()
    assert finalize(str(store))["done"] == 7 and verify(str(store)).ok


def test_a_malformed_checksum_file_says_how_to_recover(store, capsys):
    finalize(str(store))
    text = (store / CHECKSUM_FILE).read_text()
    (store / CHECKSUM_FILE).write_text(text[: len(text) // 2])  # finalize writes it atomically: edited
    assert cli.main(["verify", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pull a good copy" in err and "sazs-store finalize" not in err  # re-finalising would bless damage
    assert cli.main(["finalize", str(store), "--no-progress"]) == 2


def leftover(path):
    """What a run killed while creating its store leaves: a Zarr group, arrays, no manifest."""
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("ids", shape=(7,), dtype=str, chunks=(3,))
    g.create_array("status", shape=(7,), dtype="uint8", chunks=(3,))
    return path


def test_overwrite_replaces_a_leftover_but_never_a_user_directory(tmp_path):
    path = leftover(tmp_path / "s.zarr")
    manifest = toy_manifest(IDS, num_eigs=K)
    with pytest.raises(StoreError, match="no sazs manifest.*re-run with --overwrite"):
        StoreWriter.open(path, ids=IDS, manifest=manifest)
    with StoreWriter.open(path, ids=IDS, manifest=manifest, overwrite=True) as w:
        w.write_shard(0, [result(i) for i in range(3)])
    assert open_store(path).counts()["done"] == 3
    other = leftover(tmp_path / "other.zarr")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"not a prior store \(it holds ids, notes.txt.*rm -r"):
        StoreWriter.open(other, ids=IDS, manifest=manifest, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine" and (other / "ids" / "zarr.json").exists()


# -- finding 7: validate before decoding; the fingerprint recomputed -----------------------------


def test_resume_merge_and_info_check_codecs_before_decoding(store, tmp_path, capsys):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    edit_json(store / "status" / "zarr.json", lambda m: m["codecs"].append({"name": "numcodecs.lzma"}))
    with pytest.raises(StoreError, match=r"status uses codec\(s\) \['numcodecs.lzma'\].*refusing"):
        StoreWriter.open(store, ids=IDS, manifest=toy_manifest(IDS, num_eigs=K))
    with pytest.raises(StoreError, match="numcodecs.lzma"):
        merge(tmp_path / "m.zarr", [str(copy), str(store)])
    assert cli.main(["info", str(store)]) == 2
    assert "numcodecs.lzma" in capsys.readouterr().err
    assert "numcodecs.lzma" in verify(str(store)).unreadable[0]


def test_a_manifest_edited_without_its_fingerprint_is_refused(store):
    edit_json(store / "zarr.json", lambda m: m["attributes"]["manifest"]["graph"].update(k=99))
    with pytest.raises(StoreError, match="settings do not match its fingerprint"):
        open_store(store)
    assert "do not match its fingerprint" in verify(str(store)).unreadable[0]
    with pytest.raises(StoreError, match="do not match its fingerprint"):
        StoreWriter.open(store, ids=IDS, manifest=toy_manifest(IDS, num_eigs=K))


def test_fingerprints_of_existing_stores_do_not_change(store):
    """Pinned: the fingerprint rule (stores/manifest.py) is what existing stores were stamped with."""
    assert toy_manifest(["a", "b", "c"])["fingerprint"] == (
        "473cc1076d31470dc090c0bb111dbdbb17eb95d4f847f48165ed763b163ca269"
    )
    assert open_store(store).fingerprint == toy_manifest(IDS, num_eigs=K)["fingerprint"]


# -- finding 6: full and read-only disks ---------------------------------------------------------


def test_disk_full_while_writing_a_shard_is_one_line(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    w = StoreWriter.open(tmp_path / "s.zarr", ids=IDS, manifest=toy_manifest(IDS, num_eigs=K))

    async def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.root) / key))

    monkeypatch.setattr(LocalStore, "set", full)
    with pytest.raises(
        StoreError,
        match=r"writing shard 0: cannot write .*s.zarr/eigvecs/c/0/0/0/0: No space left "
        r"on device; free space .* re-run the same command",
    ):
        w.write_shard(0, [result(i) for i in range(3)])
    w.close()


def test_read_only_output_directory_is_one_line(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(StoreError, match=r"cannot write .*s.zarr.*Read-only file system; .*choose a writable"):
        StoreWriter.open(tmp_path / "s.zarr", ids=IDS, manifest=toy_manifest(IDS, num_eigs=K))


def test_console_maps_disk_errors_to_one_line(capsys):
    import argparse

    def ns(exc):
        def func(_):
            raise exc

        return argparse.Namespace(func=func, verbose=False)

    assert run_command("x", ns(OSError(errno.ENOSPC, "No space left on device", "/out/a.json"))) == 2
    assert capsys.readouterr().err.strip().startswith("x: error: cannot write /out/a.json: No space left")
    assert run_command("x", ns(PermissionError(errno.EACCES, "Permission denied", "/out"))) == 2
    with pytest.raises(OSError):  # any other OSError is not the user's to fix: traceback
        run_command("x", ns(OSError(errno.EIO, "Input/output error")))


# -- through the real `sazs-priors run` ---------------------------------------------------------


def test_run_on_stuck_and_hostile_stores(tmp_path, capsys):
    out = tmp_path / "p.zarr"
    args = ["run", *FAST, "--limit", "3", "--shard-size", "2", "--out", str(out)]
    leftover(out)
    assert priors_cli.main(args) == 2
    assert "re-run with --overwrite" in capsys.readouterr().err
    assert priors_cli.main([*args, "--overwrite"]) == 0
    assert open_store(out).counts()["done"] == 3
    status_meta = out / "status" / "zarr.json"
    original = status_meta.read_text()
    status_meta.write_text(nested())
    assert priors_cli.main(args) == 2
    assert "status/zarr.json nests 200000 levels deep" in capsys.readouterr().err
    status_meta.write_text(original)
    assert priors_cli.main(args) == 0


def test_info_names_the_graph_and_its_global_term():
    assert graph_summary(GraphConfig().describe()).endswith("global term cosine g=0.3 r=32")
    previous = graph_summary(GraphConfig(global_weight=1.0, global_kernel="affine").describe())
    assert previous.endswith("global term affine g=1 r=32")
    assert graph_summary(GraphConfig(global_weight=0).describe()).endswith("no global term")
    assert graph_summary(GraphConfig(kind="dense").describe()).startswith("dense")
