"""The mask readers (davis, masks, camvid) on small layouts written here."""

import json

import numpy as np
import pytest
from PIL import Image

from sazs.datasets.base import DatasetConfig
from sazs.datasets.folders import MasksDataset
from sazs.datasets.images import ImageError
from sazs.datasets.registry import DATASETS, build_dataset


def _image(path, h=20, w=30, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _mask(path, array, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode=mode).save(path)


def _object(h=20, w=30, value=255):
    m = np.zeros((h, w), np.uint8)
    m[5:15, 10:20] = value
    return m


@pytest.fixture
def davis_root(tmp_path):
    root = tmp_path / "DAVIS"
    for seq in ("bear", "camel", "dog"):
        for frame in ("00000", "00005"):
            _image(root / "JPEGImages/480p" / seq / f"{frame}.jpg")
            _mask(root / "Annotations/480p" / seq / f"{frame}.png", _object())
    _mask(root / "Annotations/480p/camel/00005.png", _object(value=2), mode="P")  # 2017-style object id
    _mask(root / "Annotations/480p/dog/00000.png", _object(h=10))  # another size
    (root / "Annotations/480p/dog/00005.png").unlink()  # missing
    return root


def test_davis_ids_groups_and_binary_masks(davis_root):
    assert "davis" in DATASETS
    ds = build_dataset(DatasetConfig(name="davis", root=str(davis_root)))
    assert ds.split == "all"  # no ImageSets: every sequence
    assert ds.ids == [f"{s}/{f}" for s in ("bear", "camel", "dog") for f in ("00000", "00005")]
    assert ds.group("camel/00005") == "camel"
    m = ds.load_mask("bear/00000")
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1} and m.sum() == 100
    np.testing.assert_array_equal(ds.load_mask("camel/00005"), m)  # any non-zero value is the object
    with pytest.raises(ImageError, match=r"is 10x30 but its image .* is 20x30"):
        ds.load_mask("dog/00000")
    with pytest.raises(ImageError, match="mask not found"):
        ds.load_mask("dog/00005")
    assert ds.load_image("dog/00005").shape == (20, 30, 3)


def test_davis_split_lists(davis_root):
    sets = davis_root / "ImageSets/2016"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("camel\nbear\n")
    (sets / "train.txt").write_text("dog\nmissing-seq\n")
    ds = build_dataset(DatasetConfig(name="davis", root=str(davis_root)))
    assert ds.split == "val" and ds.ids == ["camel/00000", "camel/00005", "bear/00000", "bear/00005"]
    assert len(build_dataset(DatasetConfig(name="davis", root=str(davis_root), split="all"))) == 6
    with pytest.raises(FileNotFoundError, match="missing-seq"):
        build_dataset(DatasetConfig(name="davis", root=str(davis_root), split="train"))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        build_dataset(DatasetConfig(name="davis", root=str(davis_root), split="test"))


def test_davis_480p_frame_lists(davis_root):
    sets = davis_root / "ImageSets/480p"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("/JPEGImages/480p/dog/00000.jpg /Annotations/480p/dog/00000.png\n")
    ds = build_dataset(DatasetConfig(name="davis", root=str(davis_root)))
    assert ds.ids == ["dog/00000", "dog/00005"]


def test_davis_wrong_layout_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="JPEGImages/480p"):
        build_dataset(DatasetConfig(name="davis", root=str(tmp_path)))


@pytest.fixture
def duts_root(tmp_path):
    root = tmp_path / "DUTS-TE"
    for stem in ("a", "b", "c", "d"):
        _image(root / "DUTS-TE-Image" / f"{stem}.jpg")
    noisy = _object()
    noisy[noisy == 0] = 12  # JPEG-like noise around 0 and 255
    noisy[noisy == 255] = 240
    _mask(root / "DUTS-TE-Mask/a.png", noisy)
    _mask(root / "DUTS-TE-Mask/b.png", _object(value=1))  # a 0/1 mask
    (root / "DUTS-TE-Mask/c.png").write_bytes(b"not a png")
    return root


def test_masks_auto_detects_folders_and_thresholds(duts_root):
    ds = build_dataset(DatasetConfig(name="masks", root=str(duts_root)))
    assert ds.ids == ["a", "b", "c", "d"]
    want = (_object() > 0).astype(np.uint8)
    np.testing.assert_array_equal(ds.load_mask("a"), want)
    np.testing.assert_array_equal(ds.load_mask("b"), want)
    with pytest.raises(ImageError, match="c.png"):
        ds.load_mask("c")
    with pytest.raises(ImageError, match="mask not found"):
        ds.load_mask("d")


def test_masks_explicit_folders_and_ambiguity(tmp_path):
    root = tmp_path / "ECSSD"
    _image(root / "photos/x.jpg")
    _mask(root / "labels/x.png", _object())
    with pytest.raises(FileNotFoundError, match="--images-dir"):
        build_dataset(DatasetConfig(name="masks", root=str(root)))
    ds = MasksDataset(DatasetConfig(name="masks", root=str(root)), images_dir="photos", masks_dir=str(root / "labels"))
    assert ds.ids == ["x"] and ds.load_mask("x").sum() == 100
    (root / "images").mkdir()
    (root / "Image").mkdir()
    with pytest.raises(FileNotFoundError, match="2 candidate"):
        build_dataset(DatasetConfig(name="masks", root=str(root)))


@pytest.fixture
def camvid_root(tmp_path):
    root = tmp_path / "CamVid"
    labels = np.arange(20 * 30).reshape(20, 30) % 12  # 0..10 classes, 11 unlabelled
    for split in ("train", "val"):
        for name in ("0001TP_1.png", "0001TP_2.png"):
            _image(root / split / name)
            _mask(root / f"{split}annot" / name, labels)
    bad = labels.copy()
    bad[0, 0] = 13
    _mask(root / "valannot/0001TP_2.png", bad)
    (root / "classes.json").write_text(json.dumps({"ignore_index": 11, "classes": [f"c{i}" for i in range(11)]}))
    return root, labels


def test_camvid_classes_and_ignore(camvid_root):
    root, labels = camvid_root
    ds = build_dataset(DatasetConfig(name="camvid", root=str(root)))
    assert ds.split == "val" and ds.ids == ["0001TP_1", "0001TP_2"]
    assert ds.class_names == [f"c{i}" for i in range(11)] and ds.has_background is False
    m = ds.load_mask("0001TP_1")
    np.testing.assert_array_equal(m, np.where(labels == 11, 255, labels))
    with pytest.raises(ImageError, match=r"label values \[13\]"):
        ds.load_mask("0001TP_2")
    assert len(build_dataset(DatasetConfig(name="camvid", root=str(root), split="train"))) == 2
    with pytest.raises(ValueError, match="unknown split 'test'"):
        build_dataset(DatasetConfig(name="camvid", root=str(root), split="test"))
    (root / "classes.json").unlink()
    assert build_dataset(DatasetConfig(name="camvid", root=str(root))).class_names[0] == "sky"
