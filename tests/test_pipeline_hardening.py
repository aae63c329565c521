"""Hostile inputs to `sazs-priors`: each fails alone, or as one line before anything is written.

Huge images, odd and clashing file names, ids and annotations that point outside the
dataset, bad numbers on the command line, a full or unwritable output, a job where
every image fails.
"""

import errno
import json
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sazs.datasets import base as datasets
from sazs.datasets.base import DatasetConfig
from sazs.datasets.folders import folder_ids
from sazs.datasets.images import ImageError, image_size, read_image
from sazs.datasets.registry import build_dataset
from sazs.datasets.synthetic import make_coco, make_voc
from sazs.pipeline import cli, job
from sazs.pipeline.ray_worker import ShardSource
from sazs.stores.reader import open_store

FAST = ["--extractor", "color", "--short-side", "64", "--no-progress", "--preview", "0"]


def run(*argv):
    return cli.main(["run", *map(str, argv)])


def one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def save(path: Path, h: int = 48, w: int = 64, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def png_header_only(path: Path, h: int, w: int) -> None:
    """A PNG whose header says h x w RGB, with only a few rows of pixel data: decoding it
    would allocate the full image; opening it reads the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + 3 * w) * 4)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- 3: image size and index files


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_png_below_pillows_bomb_limit_is_refused_from_its_header(tmp_path):
    path = tmp_path / "huge.png"
    png_header_only(path, 13000, 13000)  # 169 MP: under Pillow's limit (~179 MP), ~5 GB to decode
    with pytest.raises(
        ImageError,
        match=r"image too large: .*huge.png is 13000x13000 = 169.0 megapixels > "
        r"the limit of 40; downscale it or raise --max-megapixels",
    ):
        read_image(path)
    with pytest.raises(ImageError, match="image too large"):
        image_size(path)
    save(tmp_path / "small.png", 100, 120)
    assert read_image(tmp_path / "small.png", max_pixels=12_000).shape == (100, 120, 3)
    with pytest.raises(ImageError, match="100x120 = 0.0 megapixels > the limit of 0.011999"):
        read_image(tmp_path / "small.png", max_pixels=11_999)
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        DatasetConfig(max_pixels=0)


def test_max_megapixels_fails_the_big_image_alone(tmp_path, capsys):
    root = tmp_path / "imgs"
    save(root / "big.png", 120, 160)  # 19,200 pixels
    save(root / "small.png", 48, 64)
    out = tmp_path / "s.zarr"
    assert run(*FAST, "--dataset", "folder", "--data", root, "--out", out, "--max-megapixels", 0.01) == 0
    store = open_store(out)
    assert store.done_ids() == ["small"]
    assert "image too large" in store.failures()["big"]
    assert "failed     big: image too large" in capsys.readouterr().out


def test_index_files_fail_in_one_line(tmp_path, monkeypatch, capsys):
    voc = make_voc(tmp_path / "voc", num_train=1, num_val=2)
    (voc / "ImageSets" / "Segmentation" / "bin.txt").write_bytes(b"2007_000001\n\xff\xfe\n")
    assert run(*FAST, "--dataset", "voc", "--data", voc, "--split", "bin", "--out", tmp_path / "v.zarr") == 2
    assert "bin.txt is not UTF-8 text" in one_line_error(capsys)
    monkeypatch.setattr(datasets, "MAX_LIST_BYTES", 8)
    assert run(*FAST, "--dataset", "voc", "--data", voc, "--split", "val", "--out", tmp_path / "v.zarr") == 2
    assert "val.txt is" in one_line_error(capsys)
    assert not (tmp_path / "v.zarr").exists()


@pytest.mark.parametrize(
    "mangle, expected",
    [
        (lambda text, data: text[: len(text) // 2], r"instances_val2017.json is not valid JSON \(line 1, column"),
        (lambda text, data: json.dumps([data]), "the top level is a JSON list, not an object"),
        (lambda text, data: json.dumps({**data, "images": {"1": {}}}), "'images' is a JSON dict, not a list"),
        (
            lambda text, data: json.dumps(
                {**data, "images": [{k: v for k, v in data["images"][0].items() if k != "file_name"}]}
            ),
            r"images\[0\] has no str 'file_name' \(got None\)",
        ),
        (
            lambda text, data: json.dumps({**data, "annotations": [{**data["annotations"][0], "image_id": "7"}]}),
            r"annotations\[0\] has no int 'image_id' \(got '7'\)",
        ),
    ],
)
def test_malformed_coco_json_is_one_line(tmp_path, capsys, mangle, expected):
    coco = make_coco(tmp_path / "coco", num_train=1, num_val=2)
    ann = coco / "annotations" / "instances_val2017.json"
    text = ann.read_text()
    ann.write_text(mangle(text, json.loads(text)))
    assert run(*FAST, "--dataset", "coco", "--data", coco, "--split", "val2017", "--out", tmp_path / "c.zarr") == 2
    line = one_line_error(capsys)
    assert str(ann) in line
    assert re.search(expected, line), line
    assert not (tmp_path / "c.zarr").exists()


# ----------------------------------------------------------------------------- 4: folder ids


def test_folder_ids_are_unique_lossless_and_order_free():
    rel = ["a.jpg", "a.png", "a.png.jpg", "b.png", "d/c.png", "d/c.png.webp", "d/c.png.webp.bmp", "e.tif"]
    want = ["a.jpg", "a.png", "a.png.jpg", "b", "d/c", "d/c.png", "d/c.png.webp", "e"]  # no clash in d/
    assert folder_ids(rel) == want
    assert folder_ids(rel[::-1]) == want[::-1]
    assert folder_ids(["x.jpg", "y.png"]) == ["x", "y"]  # the usual case: the stem, as before


def test_folder_keeps_every_clashing_file(tmp_path):
    for j, name in enumerate(["a.jpg", "a.png", "a.png.jpg"]):
        save(tmp_path / name, 20 + j, 24)
    ds = build_dataset(DatasetConfig(name="folder", root=str(tmp_path)))
    assert ds.ids == ["a.jpg", "a.png", "a.png.jpg"]
    assert [ds.image_path(i).name for i in ds.ids] == ds.ids
    assert [ds.load_image(i).shape[0] for i in ds.ids] == [20, 21, 22]


def test_a_non_utf8_file_name_fails_that_image_only(tmp_path, capsys):
    root = tmp_path / "imgs"
    save(root / "good.png")
    save(root / "other.png", seed=1)
    bad = os.path.join(os.fsencode(root), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write((root / "good.png").read_bytes())
    out = tmp_path / "f.zarr"
    assert run(*FAST, "--dataset", "folder", "--data", root, "--out", out) == 0
    store = open_store(out)
    assert sorted(store.done_ids()) == ["good", "other"]
    reason = store.failures()["caf\\xe9.png"]
    assert "file name is not valid UTF-8" in reason and repr(bad) in reason and "rename" in reason
    assert "failed     caf\\xe9.png: file name is not valid UTF-8" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 5: numbers on the command line


@pytest.mark.parametrize(
    "flag, value, valid",
    [
        ("--num-eigs", "0", "integer >= 2"),
        ("--num-eigs", "1", "integer >= 2"),
        ("--shard-size", "0", ">= 1"),
        ("--decode-workers", "-1", ">= 0"),
        ("--knn", "0", ">= 1"),
        ("--threshold", "nan", "in [0, 1)"),
        ("--threshold", "1", "in [0, 1)"),
        ("--threshold", "-0.5", "in [0, 1)"),
        ("--short-side", "0", ">= 1"),
        ("--short-side", "abc", ">= 1"),
        ("--limit", "0", ">= 1"),
        ("--color-weight", "inf", "in [0, 1000]"),
        ("--color-weight", "-1", "in [0, 1000]"),
        ("--global-weight", "1e300", "in [0, 1000]"),
        ("--batch-size", "0", ">= 1"),
        ("--preview", "-1", ">= 0"),
        ("--max-megapixels", "0", "in (0, inf)"),
        ("--ray-actors", "0", ">= 1"),
        ("--max-long-side", "-3", ">= 1"),
    ],
)
def test_bad_numbers_exit_2_in_one_line_and_create_nothing(tmp_path, capsys, flag, value, valid):
    out = tmp_path / "x.zarr"
    with pytest.raises(SystemExit) as exit_:
        run(*FAST, "--limit", 2, "--out", out, flag, value)
    assert exit_.value.code == 2
    line = one_line_error(capsys)
    assert line.startswith(f"sazs-priors run: error: argument {flag}: '{value}' is not ") and valid in line
    assert list(tmp_path.iterdir()) == []


def test_configs_refuse_bad_numbers_too():
    with pytest.raises(ValueError, match="limit must be >= 1"):
        DatasetConfig(limit=0)
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        job.JobConfig(out="x.zarr", shard_size=0)
    with pytest.raises(ValueError, match="decode_workers must be >= 0"):
        job.JobConfig(out="x.zarr", decode_workers=-1)


def test_knn_above_the_patch_count_is_clipped(tmp_path):
    """An image with fewer patches than --knn links every patch to all others."""
    out = tmp_path / "k.zarr"
    assert run(*FAST, "--limit", 2, "--out", out, "--knn", 100000) == 0
    assert len(open_store(out).done_ids()) == 2


# ----------------------------------------------------------------------------- 6: exit codes and write errors


def test_a_job_where_every_image_failed_exits_1(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert run(*FAST, "--limit", 2, "--out", out, "--short-side", 7) == 1
    assert "all 2 images of" in one_line_error(capsys)
    assert open_store(out).failures().keys() == {"astronaut", "chelsea"}
    assert run(*FAST, "--limit", 2, "--out", out, "--short-side", 7) == 1  # still nothing usable


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    class FullDisk:
        def __init__(self, *a, **kw):
            pass

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write() raises it: no file name

        def flush(self):
            pass

        def close(self):
            pass

    out = tmp_path / "s.zarr"
    monkeypatch.setattr(job, "open", FullDisk, raising=False)  # the progress log's open()
    assert run(*FAST, "--limit", 1, "--out", out) == 2
    line = one_line_error(capsys)
    assert f"cannot write {tmp_path / 's.progress.jsonl'}: No space left on device; free space there" in line
    monkeypatch.undo()

    real = Path.write_text

    def full_for_summary(self, *a, **kw):
        if self.name.endswith(".summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full_for_summary)
    assert run(*FAST, "--limit", 1, "--out", out) == 2
    assert f"cannot write {tmp_path / 's.summary.json'}: No space left on device" in one_line_error(capsys)
    monkeypatch.undo()
    assert run(*FAST, "--limit", 1, "--out", out) == 0  # the store was complete; nothing is recomputed


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(*FAST, "--limit", 1, "--out", tmp_path / "file" / "s.zarr") == 2
    assert str(tmp_path / "file") in one_line_error(capsys)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert run(*FAST, "--limit", 1, "--out", ro / "s.zarr") == 2
        assert str(ro) in one_line_error(capsys)
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("bad_id", ["/etc/passwd", "../x", "a/../../x"])
def test_show_refuses_ids_that_are_paths_out(tmp_path, capsys, bad_id):
    out = tmp_path / "s.zarr"
    assert run(*FAST, "--limit", 1, "--out", out) == 0
    capsys.readouterr()
    assert cli.main(["show", str(out), "--ids", bad_id, "--out", str(tmp_path / "x.png")]) == 2
    assert f"--ids {bad_id}: an image id" in one_line_error(capsys)
    assert not (tmp_path / "x.png").exists()


def test_show_on_something_that_is_not_a_store_is_one_line(tmp_path, capsys):
    (tmp_path / "nope.zarr").mkdir()
    assert cli.main(["show", str(tmp_path / "nope.zarr")]) == 2
    assert "nope.zarr" in one_line_error(capsys)


# ----------------------------------------------------------------------------- 8: paths out of the dataset root


def test_voc_list_entries_leaving_the_root_fail_alone(tmp_path):
    voc = make_voc(tmp_path / "voc", num_train=1, num_val=2)
    save(tmp_path / "secret.jpg")  # a readable image outside the dataset
    val = voc / "ImageSets" / "Segmentation" / "val.txt"
    escape = os.path.relpath(tmp_path / "secret", voc / "JPEGImages")
    val.write_text(val.read_text() + f"{escape}\n")
    out = tmp_path / "v.zarr"
    assert run(*FAST, "--dataset", "voc", "--data", voc, "--split", "val", "--out", out) == 0
    store = open_store(out)
    assert len(store.done_ids()) == 2
    assert "path leaves the dataset root" in store.failures()[escape]
    ds = build_dataset(DatasetConfig(name="voc", root=str(voc), split="val"))
    with pytest.raises(ImageError, match="path leaves the dataset root"):
        ds.mask_path(escape)
    with pytest.raises(ImageError, match="path leaves the dataset root"):  # what a Ray worker reads
        ShardSource.of(ds, [2]).load(2)


def test_coco_file_names_leaving_the_image_folder_fail_alone(tmp_path):
    coco = make_coco(tmp_path / "coco", num_train=1, num_val=3)
    save(tmp_path / "secret.jpg")
    ann = coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = "../../secret.jpg"
    data["images"][1]["file_name"] = str(tmp_path / "secret.jpg")
    ann.write_text(json.dumps(data))
    out = tmp_path / "c.zarr"
    assert run(*FAST, "--dataset", "coco", "--data", coco, "--split", "val2017", "--out", out) == 0
    failures = open_store(out).failures()
    assert {str(data["images"][0]["id"]), str(data["images"][1]["id"])} == set(failures)
    assert all("path leaves the dataset root" in r for r in failures.values())
    assert len(open_store(out).done_ids()) == 1


def test_symlinks_inside_the_root_are_followed(tmp_path):
    """Datasets often link their images to shared storage: only the path as written is checked."""
    save(tmp_path / "shared" / "x.png")
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "x.png").symlink_to(tmp_path / "shared" / "x.png")
    ds = build_dataset(DatasetConfig(name="folder", root=str(root)))
    assert ds.load_image("x").shape == (48, 64, 3)
    assert read_image(root / "x.png", root=root).shape == (48, 64, 3)
    with pytest.raises(ImageError, match="leaves the dataset root"):
        read_image(root / ".." / "shared" / "x.png", root=root)


def test_readers_that_list_folders_have_no_root_check(tmp_path):
    """Only paths read from text are checked: a masks dataset's --images-dir may lie outside DATA."""
    from sazs.datasets.folders import MasksDataset

    save(tmp_path / "elsewhere" / "a.png")
    root = tmp_path / "data"
    (root / "masks").mkdir(parents=True)
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(root / "masks" / "a.png")
    ds = MasksDataset(DatasetConfig(name="masks", root=str(root)), images_dir=str(tmp_path / "elsewhere"))
    assert ds.image_root is None and ds.load_image("a").shape == (48, 64, 3)
    assert ShardSource.of(ds, [0]).load(0).shape == (48, 64, 3)
