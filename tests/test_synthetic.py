import json

import numpy as np
import pytest
from PIL import Image

from sazs.datasets import scenes, synthetic
from sazs.datasets.base import DatasetConfig
from sazs.datasets.registry import build_dataset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_voc_colormap():
    cmap = synthetic.voc_colormap()
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    assert tuple(cmap[0]) == (0, 0, 0) and tuple(cmap[1]) == (128, 0, 0)
    assert tuple(cmap[15]) == (192, 128, 128) and tuple(cmap[255]) == (224, 224, 192)


def test_class_colors_distinct():
    colours = np.array([scenes.class_color(i) for i in range(1, 21)], int)
    dist = np.abs(colours[:, None] - colours[None]).sum(-1) + np.eye(20, dtype=int) * 999
    assert dist.min() > 50
    assert colours.min() >= 40 and colours.max() <= 215


@pytest.mark.parametrize("make", [synthetic.make_voc, synthetic.make_coco])
def test_deterministic(make, tmp_path):
    kw = dict(num_train=2, num_val=3, size=(48, 64))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        make(tmp_path / name, seed=seed, **kw)
    a, b, c = (_tree_bytes(tmp_path / name) for name in "abc")
    assert a == b and len(a) >= 5
    assert a != c


def test_voc_files(tmp_path):
    voc = synthetic.make_voc(tmp_path, num_train=9, num_val=7)
    assert voc == tmp_path / "VOCdevkit" / "VOC2012"
    sets = {s: (voc / f"ImageSets/Segmentation/{s}.txt").read_text().split() for s in ("train", "val", "trainval")}
    assert len(sets["train"]) == 9 and len(sets["val"]) == 7
    assert sets["trainval"] == sorted(sets["train"] + sets["val"]) and sets["val"] == sorted(sets["val"])
    assert all(len(i) == 11 and i[4] == "_" for i in sets["trainval"])  # 2007_000001
    shapes, seen = set(), set()
    for id_ in sets["trainval"]:
        img = Image.open(voc / "JPEGImages" / f"{id_}.jpg")
        png = Image.open(voc / "SegmentationClass" / f"{id_}.png")
        assert img.mode == "RGB" and png.mode == "P" and img.size == png.size
        assert np.array_equal(np.array(png.getpalette()).reshape(-1, 3)[:21], synthetic.voc_colormap()[:21])
        lab = np.array(png)
        # a 255 band separates any two different labels: neighbours are equal or one is 255
        for a, b in ((lab[:, 1:], lab[:, :-1]), (lab[1:], lab[:-1])):
            assert ((a == b) | (a == 255) | (b == 255)).all()
        band = (lab == 255).sum() / max(((lab > 0) & (lab < 255)).sum(), 1)
        assert 0 < band < 0.5
        shapes.add(img.width > img.height)
        if id_ in sets["val"]:
            seen |= set(np.unique(lab).tolist())
    assert shapes == {True, False}  # landscape and portrait
    assert set(range(1, 21)) <= seen  # round-robin: 7 val images x 3 shapes cover 20 classes


def test_coco_json_structure(tmp_path):
    root = synthetic.make_coco(tmp_path, num_train=2, num_val=3, size=(64, 80))
    for split in ("train2017", "val2017"):
        doc = json.loads((root / f"annotations/instances_{split}.json").read_text())
        assert set(doc) == {"info", "licenses", "images", "annotations", "categories"}
        cats = doc["categories"]
        assert len(cats) == 80 and {c["id"] for c in cats} <= set(range(1, 91))
        assert {(c["id"], c["name"]) for c in cats} >= {(1, "person"), (13, "stop sign"), (90, "toothbrush")}
        assert all(c["supercategory"] for c in cats)
        images = {im["id"]: im for im in doc["images"]}
        for im in images.values():
            assert {"id", "file_name", "height", "width"} <= set(im)
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            assert Image.open(root / split / im["file_name"]).size == (im["width"], im["height"])
        crowd = 0
        for a in doc["annotations"]:
            assert {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"} <= set(a)
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert a["area"] > 0 and 0 <= x and x + w <= im["width"] and 0 <= y and y + h <= im["height"]
            if a["iscrowd"]:
                crowd += 1
                assert a["segmentation"]["size"] == [im["height"], im["width"]]
                assert sum(a["segmentation"]["counts"]) == im["height"] * im["width"]
            else:
                assert isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 6
        assert crowd >= 1
        assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    assert "python -m sazs.datasets.synthetic voc" in capsys.readouterr().out
    assert synthetic.main(["voc", str(tmp_path / "v"), "--num-train", "1", "--num-val", "2", "--size", "48", "64"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "v" / "VOCdevkit" / "VOC2012")
    assert len(build_dataset(DatasetConfig(name="voc", root=out))) == 2
    assert synthetic.main(["coco", str(tmp_path / "c"), "--year", "2014", "--num-train", "1", "--num-val", "1"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "c") and (tmp_path / "c" / "annotations" / "instances_val2014.json").is_file()
    assert build_dataset(DatasetConfig(name="coco", root=out)).split == "val2014"
