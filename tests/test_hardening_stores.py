"""Hardening of the store side, round 2: decompression bombs in chunks (every codec, every
command that opens a store), tampered finalised stores, what verify finds in stores that
are not finalised, merge of damaged inputs, and writes that stay inside OUT.

Bombs are small here (64 MiB decoded) so that the code before the bounds fails these tests
by its message, not by exhausting the test machine; the measured reproductions (1 GiB, 1 TiB,
2 GiB) are in docs/BENCHMARKS.md.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import zarr
from bombs import blosc_bomb, blosc_lie, gzip_bomb, put_inner_chunk, zstd_bomb, zstd_lie
from storecheck import toy_manifest
from test_store_hardening import IDS, K, make_store, result

from sazs.stores import cli
from sazs.stores.codecs import ChunkTooLarge, gzip_decode, zstd_decode
from sazs.stores.format import CHECKSUM_FILE, SUMMARY_FILE, StoreError
from sazs.stores.integrity import finalize, verify
from sazs.stores.manifest import fingerprint
from sazs.stores.merge import merge
from sazs.stores.reader import open_store
from sazs.stores.writer import StoreWriter

BOMB = 64 << 20


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "s.zarr")


def set_codec(store, array, name, configuration):
    path = store / array / "zarr.json"
    meta = json.loads(path.read_text())
    meta["codecs"][-1] = {"name": name, "configuration": configuration}
    path.write_text(json.dumps(meta))


BLOSC = {"cname": "zstd", "clevel": 5, "shuffle": "noshuffle", "typesize": 1, "blocksize": 0}
STATUS_BOMBS = {
    "zstd": (lambda: zstd_bomb(BOMB), None),
    "zstd-lying-header": (lambda: zstd_lie(1 << 40), None),
    "zstd-no-size": (lambda: zstd_bomb(BOMB, declare=False), None),
    "zstd-two-frames": (lambda: zstd_bomb(2) + zstd_bomb(BOMB), None),
    "gzip": (lambda: gzip_bomb(BOMB), ("gzip", {"level": 5})),
    "blosc": (lambda: blosc_lie(1 << 31), ("blosc", BLOSC)),
    "blosc-real": (lambda: blosc_bomb(1 << 20), ("blosc", BLOSC)),  # a true header, not only a lying one
}


@pytest.mark.parametrize("kind", list(STATUS_BOMBS))
def test_a_bomb_in_a_chunk_is_one_line_in_every_command(store, tmp_path, kind, capsys):
    make, codec = STATUS_BOMBS[kind]
    if codec:
        set_codec(store, "status", *codec)
    (store / "status" / "c" / "0").write_bytes(make())
    for argv in (["info", str(store)], ["export", str(store), str(tmp_path / "out"), "--format", "npz"]):
        assert cli.main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{store}/status" in err and ("bomb" in err or "declares no content size" in err), err
    assert cli.main(["verify", str(store), "--no-progress"]) == 1  # a report, no traceback
    out = capsys.readouterr().out
    assert "unreadable" in out and "status" in out
    with StoreWriter.open(store, ids=IDS, manifest=toy_manifest(IDS, num_eigs=K)) as writer:  # resume
        with pytest.raises(StoreError, match=f"{store}/status"):
            writer.todo()
    copy = tmp_path / "copy.zarr"
    make_store(copy)
    with pytest.raises(StoreError, match="status"):
        merge(tmp_path / "m.zarr", [str(copy), str(store)])
    assert not (tmp_path / "m.zarr").exists()


def test_a_bomb_in_an_inner_chunk_fails_that_image_only(store, tmp_path, capsys):
    put_inner_chunk(store / "eigvecs" / "c" / "0" / "0" / "0" / "0", 3, 1, zstd_bomb(BOMB))
    assert cli.main(["export", str(store), str(tmp_path / "out"), "--format", "npz", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "exported 6 image(s)" in out and "1 FAILED (im1: cannot decode" in out and "bomb" in out
    report = verify(str(store))
    assert not report.ok and "bomb" in report.unreadable[0]
    assert open_store(store).get("im0").eigvecs.shape == (K, 3, 4)  # the other images of the shard read


def test_the_bounded_decoders_decode_what_zarr_writes():
    from numcodecs import zstd

    data = np.random.default_rng(0).standard_normal(5000).astype(np.float16).tobytes()
    assert zstd_decode(zstd.compress(data, 0), len(data)) == data
    assert zstd_decode(zstd.compress(data, 3, True), len(data)) == data
    with pytest.raises(ChunkTooLarge):
        zstd_decode(zstd.compress(data, 3), len(data) - 1)
    assert gzip_decode(gzip_bomb(1000) + gzip_bomb(24), 1024) == bytes(1024)
    with pytest.raises(ChunkTooLarge):
        gzip_decode(gzip_bomb(1025), 1024)


def test_stores_with_each_codec_still_read(store, tmp_path):
    status = open_store(store).status()
    for name, conf in (("gzip", {"level": 5}), ("blosc", BLOSC)):
        copy = make_store(tmp_path / f"{name}.zarr")
        set_codec(copy, "status", name, conf)
        zarr.open_group(str(copy), mode="r+")["status"][:] = status  # written with that codec
        assert (open_store(copy).status() == status).all()


# -- tampered finalised stores -------------------------------------------------------------------


def set_ids(store, ids):
    zarr.open_group(str(store), mode="r+")["ids"][:] = np.asarray(ids, dtype=object)


def test_finalize_refuses_a_finalised_store_that_was_changed(store, capsys):
    assert cli.main(["finalize", str(store), "--no-progress"]) == 0
    set_ids(store, [IDS[1], IDS[0], *IDS[2:]])  # swapped ids
    assert cli.main(["finalize", str(store), "--no-progress"]) == 2
    assert "no longer match its checksums" in capsys.readouterr().err
    report = verify(str(store))
    assert not report.ok and report.corrupted == ["ids/c/0"]


def test_a_deleted_checksum_file_is_damage_not_an_unfinalised_store(store, capsys):
    finalize(str(store))
    (store / CHECKSUM_FILE).unlink()
    report = verify(str(store))
    assert not report.ok and CHECKSUM_FILE in report.missing[0]
    assert cli.main(["finalize", str(store), "--no-progress"]) == 2
    assert "is gone; refusing to re-finalise" in capsys.readouterr().err
    with pytest.raises(StoreError, match="is finalised"):
        StoreWriter.open(store, ids=IDS, manifest=toy_manifest(IDS, num_eigs=K))


def test_an_interrupted_finalize_can_be_run_again(store):
    finalize(str(store))
    (store / CHECKSUM_FILE).unlink()
    (store / SUMMARY_FILE).unlink()  # as if finalize stopped after marking the store
    assert finalize(str(store))["done"] == 7 and verify(str(store)).ok


# -- what verify finds in stores that are not finalised ---------------------------------------------


def real_store(path, ids=IDS):
    manifest = toy_manifest(ids, num_eigs=K)
    manifest["dataset"]["ids_sha256"] = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    manifest["fingerprint"] = fingerprint(manifest)
    with StoreWriter.open(path, ids=ids, manifest=manifest) as w:
        for shard in range(w.num_shards):
            w.write_shard(shard, [result(i) for i in w.shard_range(shard)])
    return path


@pytest.mark.parametrize("ids", [[IDS[1], IDS[0], *IDS[2:]], [IDS[0], IDS[0], *IDS[2:]]], ids=["swapped", "duplicated"])
def test_ids_that_do_not_match_the_manifest_are_damage(tmp_path, ids):
    store = real_store(tmp_path / "s.zarr")
    assert verify(str(store)).ok
    set_ids(store, ids)
    report = verify(str(store))
    assert not report.ok and report.bad_ids


@pytest.mark.parametrize("size", [(2**31 - 1, 2**31 - 1), (-5, 40)])
def test_impossible_image_sizes_are_damage_and_fail_only_that_image(store, tmp_path, size, capsys):
    g = zarr.open_group(str(store), mode="r+")
    sizes = np.asarray(g["image_size"][:])
    sizes[2] = size
    g["image_size"][:] = sizes
    report = verify(str(store))
    assert [x.split()[0] for x in report.out_of_range] == ["im2"]
    out = tmp_path / "png"
    argv = ["export", str(store), str(out), "--format", "sazs-png", "--num-vectors", "1", "--no-progress"]
    assert cli.main(argv) == 1
    printed = capsys.readouterr().out
    assert "exported 6 image(s)" in printed and "1 FAILED (im2" in printed and "image size" in printed


def test_an_edited_fill_value_is_refused(store):
    edit = store / "eigvecs" / "zarr.json"
    meta = json.loads(edit.read_text())
    meta["fill_value"] = 0.5
    edit.write_text(json.dumps(meta))
    put_inner_chunk(store / "eigvecs" / "c" / "0" / "0" / "0" / "0", 3, 1, None)  # then drop a chunk
    with pytest.raises(StoreError, match="fill value 0.5"):
        open_store(store)
    assert "fill value" in verify(str(store)).unreadable[0]


def test_merge_refuses_an_input_with_done_images_without_data(store, tmp_path):
    other = make_store(tmp_path / "other.zarr")
    (other / "eigvals" / "c" / "1" / "0").unlink()
    with pytest.raises(StoreError, match=r"cannot merge .*other.zarr: 3 image\(s\) marked done lack"):
        merge(tmp_path / "m.zarr", [str(store), str(other)])
    other2 = make_store(tmp_path / "other2.zarr")
    put_inner_chunk(other2 / "eigvecs" / "c" / "0" / "0" / "0" / "0", 3, 1, None)
    with pytest.raises(StoreError, match="'im1' is marked done but its data is missing"):
        merge(tmp_path / "m.zarr", [str(store), str(other2)])
    assert not (tmp_path / "m.zarr").exists()


# -- nothing written outside OUT ------------------------------------------------------------------


def test_gallery_never_deletes_through_a_thumbs_symlink(store, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.png").write_bytes(b"precious")
    out = tmp_path / "gallery"
    assert cli.main(["gallery", str(store), "--out", str(out), "--no-images", "--no-progress"]) == 0
    shutil.rmtree(out / "thumbs")
    (out / "thumbs").symlink_to(victim)
    assert cli.main(["gallery", str(store), "--out", str(out), "--no-images", "--no-progress"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert (victim / "keep.png").read_bytes() == b"precious" and len(list(victim.iterdir())) == 1


def test_gallery_thumb_size_is_bounded(store, tmp_path, capsys):
    argv = ["gallery", str(store), "--out", str(tmp_path / "g"), "--no-images", "--thumb-size", "30000"]
    assert cli.main(argv) == 2
    assert "--thumb-size 30000 is over 1024" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def ids_store(path, ids):
    with StoreWriter.open(path, ids=ids, manifest=toy_manifest(ids, num_eigs=K)) as w:
        for shard in range(w.num_shards):
            w.write_shard(shard, [result(i) for i in w.shard_range(shard)])
    return path


def test_export_never_writes_through_a_symlinked_subfolder(tmp_path, capsys):
    store = ids_store(tmp_path / "s.zarr", ["sub/a", "b", "c"])
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(outside)
    assert cli.main(["export", str(store), str(out), "--format", "npz", "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "exported 2 image(s)" in printed and "1 FAILED (sub/a:" in printed and "symbolic link" in printed
    assert not list(outside.iterdir())


def test_export_fails_only_the_image_whose_name_is_too_long(tmp_path, capsys):
    long_id = "x" * 251  # a legal file name; with "_k0.png" it is not
    store = ids_store(tmp_path / "s.zarr", [long_id, "b", "c"])
    out = tmp_path / "out"
    assert cli.main(["export", str(store), str(out), "--format", "sazs-png", "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "exported 2 image(s)" in printed and f"1 FAILED ({long_id}: cannot write" in printed
    npz = tmp_path / "npz"  # 251 + ".npz" = 255 bytes fits, its temporary name too
    assert cli.main(["export", str(store), str(npz), "--format", "npz", "--no-progress"]) == 0
    assert (npz / f"{long_id}.npz").exists()


# -- hangs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["zarr.json", "status/zarr.json", "status/c/0"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_fifo_or_a_directory_in_place_of_an_object_never_hangs(store, where, kind, capsys):
    path = store / where
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    code = cli.main(["info", str(store)])  # a FIFO read would block here forever
    err = capsys.readouterr().err
    if kind == "directory" and where == "status/c/0":
        assert code == 0  # a status chunk that is not a file reads as absent: those images are pending
        assert verify(str(store)).pending == IDS[:3]
        return
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "not a regular file" in err
    assert not verify(str(store)).ok


def test_per_image_tables_are_bounded_before_anything_is_read(store, monkeypatch):
    from sazs.stores import schema

    monkeypatch.setattr(schema, "MAX_TABLE_BYTES", len(IDS) * K * 4 - 1)
    with pytest.raises(StoreError, match=r"7 images x K = 4 eigenvalues exceed .*SAZS_MAX_TABLE_BYTES"):
        open_store(store)
