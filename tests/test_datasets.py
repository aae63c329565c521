import json
import socket

import numpy as np
import pytest
from images import QUADRANT_COLORS, quadrant_image, write_bad_images
from PIL import Image
from scipy import ndimage

from sazs.datasets import scenes, synthetic
from sazs.datasets.base import DatasetConfig
from sazs.datasets.images import ImageError, image_size, read_image
from sazs.datasets.registry import DATASETS, build_dataset, list_datasets
from sazs.datasets.voc import VOC_CLASSES

RED, GREEN, BLUE, YELLOW = QUADRANT_COLORS
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return d, write_bad_images(d)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return synthetic.make_voc(tmp_path_factory.mktemp("voc"), size=(64, 96))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    # 27 val images x up to 3 shapes cover all 80 classes
    return synthetic.make_coco(tmp_path_factory.mktemp("coco"), num_train=3, num_val=27, size=(64, 96))


def _close(pixel, colour, tol=12):
    return np.abs(np.asarray(pixel, int) - colour).max() <= tol


def _check_mask_matches_image(ds, id_):
    """Each labelled region has its class colour: the mask is aligned with the painted shapes."""
    img, mask = ds.load_image(id_), ds.load_mask(id_)
    assert mask.shape == img.shape[:2] and mask.dtype == np.uint8
    for label in set(np.unique(mask).tolist()) - {0, 255}:
        region = ndimage.binary_erosion(mask == label)  # skip JPEG-blurred edges
        assert region.sum() > 0
        assert np.abs(img[region].mean(0) - scenes.class_color(label)).max() < 20, (id_, label)
    return mask


# ----------------------------------------------------------------------------- read_image


def test_read_image_good_cases(bad_dir):
    d, expected = bad_dir
    for id_, outcome in expected.items():
        if outcome == "ok":
            img = read_image(next(d.glob(f"{id_}.*")))
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, id_

    rot = read_image(d / "exif_rot6.jpg")  # stored 32x48; orientation 6 = rotate 90 clockwise
    assert rot.shape == (48, 32, 3)
    assert image_size(d / "exif_rot6.jpg") == (48, 32)
    # stored TL red, TR green, BL blue, BR yellow -> displayed TL blue, TR red, BL yellow, BR green
    for (y, x), colour in {(5, 5): BLUE, (5, 26): RED, (42, 5): YELLOW, (42, 26): GREEN}.items():
        assert _close(rot[y, x], colour), (y, x, rot[y, x])

    cmyk = read_image(d / "cmyk.jpg")
    assert cmyk.shape == (48, 64, 3)
    assert np.abs(cmyk.astype(int) - quadrant_image(48, 64)).mean() < 6

    gray = read_image(d / "gray.png")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 0] == gray[..., 2]).all()
    assert gray[0, 0, 0] == 0 and gray[0, -1, 0] == 255

    rgba = read_image(d / "rgba.png")  # composited over white, never the hidden colour
    assert tuple(rgba[0, 0]) == (255, 0, 0)
    assert tuple(rgba[0, 30]) == (255, 255, 255)
    assert _close(rgba[0, 50], (127, 127, 255), tol=1)

    g16 = read_image(d / "gray16.png")  # scaled by 255/65535, not clipped at 255
    ramp = np.linspace(0, 65535, 64).round()
    assert np.array_equal(g16[0, :, 0], np.round(ramp / 257).astype(np.uint8))

    pal = read_image(d / "palette.png")
    assert np.array_equal(pal, quadrant_image(48, 64))


@pytest.mark.parametrize(
    "id_, reason",
    [
        ("truncated", "cannot decode"),
        ("empty", "empty file (0 bytes)"),
        ("text", "not a recognised image format"),
        ("tiny", "image too small"),
    ],
)
def test_read_image_failures(bad_dir, id_, reason):
    d, expected = bad_dir
    assert expected[id_] == "failed"
    path = next(d.glob(f"{id_}.*"))
    with pytest.raises(ImageError) as info:
        read_image(path)
    msg = str(info.value)
    assert reason in msg and str(path) in msg and "\n" not in msg
    assert info.value.path == str(path)
    if id_ == "truncated":
        assert "truncated" in msg
    if id_ == "tiny":
        assert "4x4 < min_side 16" in msg


def test_read_image_missing_and_min_side(bad_dir, tmp_path):
    d, _ = bad_dir
    with pytest.raises(ImageError, match="image not found"):
        read_image(tmp_path / "nope.jpg")
    assert read_image(d / "tiny.png", min_side=4).shape == (4, 4, 3)


def test_read_image_float_and_int_modes(tmp_path):
    f = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (20, 1))
    Image.fromarray(f).save(tmp_path / "f.tif")
    out = read_image(tmp_path / "f.tif")
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    i = np.tile(np.linspace(-1000, 1000, 32).astype(np.int32), (20, 1))  # outside 16 bits: min-max
    Image.fromarray(i).save(tmp_path / "i.tif")
    out = read_image(tmp_path / "i.tif")
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255


# ----------------------------------------------------------------------------- registry


def test_registry_and_unknown_name():
    assert list_datasets() == DATASETS.names() and {"sample", "folder", "voc", "coco"} <= set(DATASETS)
    with pytest.raises(ValueError) as err:
        build_dataset(DatasetConfig(name="x"))
    assert str(err.value) == f"unknown dataset 'x'; choose from {list_datasets()}"


# ----------------------------------------------------------------------------- sample


def test_sample_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    ds = build_dataset(DatasetConfig())
    assert ds.name == "sample" and ds.split == "all" and ds.class_names == ["background"]
    assert ds.ids == sorted(ds.ids) and {"astronaut", "chelsea", "coffee", "rocket"} <= set(ds.ids)
    import skimage.data

    for id_ in ds.ids:
        img = ds.load_image(id_)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 256
        ref = getattr(skimage.data, id_)()
        ref = ref[0] if isinstance(ref, tuple) else ref  # stereo_motorcycle -> left view
        assert np.array_equal(img, ref), id_
        assert ds.load_mask(id_) is None
    desc = ds.describe()
    assert desc["num_images"] == len(ds) and len(desc["ids_sha256"]) == 64
    assert len(build_dataset(DatasetConfig(limit=2))) == 2
    with pytest.raises(KeyError, match="nope"):
        ds.load_image("nope")


# ----------------------------------------------------------------------------- folder


def test_folder_recursion_order_filtering(tmp_path):
    img = Image.fromarray(quadrant_image(20, 24))
    for rel in ["a/b/x.png", "a/y.jpg", "Z.JPG", "c.webp", "dup.jpg", "dup.png", ".hidden.png", ".git/h.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / rel, format="WEBP" if rel.endswith("webp") else None)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a" / "model.npy").write_bytes(b"x")
    ds = build_dataset(DatasetConfig(name="folder", root=str(tmp_path)))
    assert ds.ids == ["Z", "a/b/x", "a/y", "c", "dup.jpg", "dup.png"]
    assert ds.image_path("a/b/x") == tmp_path / "a" / "b" / "x.png"
    assert all(ds.load_image(i).shape == (20, 24, 3) for i in ds.ids)
    assert ds.load_mask("Z") is None


def test_folder_bad_images_outcomes(bad_dir):
    d, expected = bad_dir
    ds = build_dataset(DatasetConfig(name="folder", root=str(d)))
    assert ds.ids == sorted(expected)
    for id_ in ds.ids:
        try:
            ds.load_image(id_)
            outcome = "ok"
        except ImageError:
            outcome = "failed"
        assert outcome == expected[id_], id_


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset(DatasetConfig(name="folder"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_dataset(DatasetConfig(name="folder", root=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="no images under"):
        build_dataset(DatasetConfig(name="folder", root=str(tmp_path)))


# ----------------------------------------------------------------------------- voc


def test_voc_layout_and_masks(voc_root):
    devkit = voc_root.parent
    for root in (voc_root, devkit, devkit.parent):  # VOC2012, VOCdevkit, or the dir above
        ds = build_dataset(DatasetConfig(name="voc", root=str(root)))
        assert ds.root == str(voc_root)
    assert ds.split == "val" and ds.class_names == VOC_CLASSES
    assert VOC_CLASSES == [
        "background",
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    ]
    val_txt = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert ds.ids == val_txt and len(ds) == 8
    seen = set()
    for id_ in ds.ids:
        mask = _check_mask_matches_image(ds, id_)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(21)) | {255} and 255 in values
        seen |= values
    assert set(range(1, 21)) <= seen  # every class appears in val
    train = build_dataset(DatasetConfig(name="voc", root=str(voc_root), split="train"))
    trainval = build_dataset(DatasetConfig(name="voc", root=str(voc_root), split="trainval"))
    assert sorted(train.ids + ds.ids) == trainval.ids and not set(train.ids) & set(ds.ids)
    assert len(build_dataset(DatasetConfig(name="voc", root=str(voc_root), limit=3))) == 3
    assert ds.describe()["ids_sha256"] != train.describe()["ids_sha256"]


def test_voc_prefers_segmentation_class_aug(voc_root, tmp_path):
    ds = build_dataset(DatasetConfig(name="voc", root=str(voc_root)))
    id_ = ds.ids[0]
    aug = voc_root / "SegmentationClassAug"
    aug.mkdir(exist_ok=True)
    try:
        h, w = ds.load_mask(id_).shape
        Image.fromarray(np.full((h, w), 7, np.uint8)).save(aug / f"{id_}.png")  # grayscale indices
        assert (ds.load_mask(id_) == 7).all()
        assert ds.load_mask(ds.ids[1]).max() == 255  # no Aug file -> SegmentationClass
    finally:
        for p in aug.iterdir():
            p.unlink()
        aug.rmdir()


def test_voc_errors(voc_root, tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'test'.*available: \['train', 'trainval', 'val'\]"):
        build_dataset(DatasetConfig(name="voc", root=str(voc_root), split="test"))
    with pytest.raises(FileNotFoundError, match="no JPEGImages/ under .*VOCdevkit/VOC2012.*DATA="):
        build_dataset(DatasetConfig(name="voc", root=str(tmp_path)))
    with pytest.raises(KeyError, match="2099_000001"):
        build_dataset(DatasetConfig(name="voc", root=str(voc_root))).load_mask("2099_000001")


# ----------------------------------------------------------------------------- coco


def test_coco_layout_and_masks(coco_root):
    ds = build_dataset(DatasetConfig(name="coco", root=str(coco_root)))
    assert ds.split == "val2017"
    doc = json.loads((coco_root / "annotations/instances_val2017.json").read_text())
    assert ds.ids == [str(i) for i in sorted(im["id"] for im in doc["images"])]
    assert [im["id"] for im in doc["images"]] != sorted(im["id"] for im in doc["images"])  # json order differs
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    assert ds.class_names == ["background"] + [c["name"] for c in cats] and len(ds.class_names) == 81
    assert ds.class_names[1] == "person" and ds.class_names[80] == "toothbrush"
    assert ds.cat_to_label[90] == 80 and ds.cat_to_label[13] == 12  # ids 1..90 with gaps -> 1..80
    seen = set()
    for id_ in ds.ids:
        values = set(np.unique(_check_mask_matches_image(ds, id_)).tolist())
        assert values <= set(range(81)) | {255}
        seen |= values
    assert set(range(1, 81)) <= seen


def test_coco_crowd_is_ignore(coco_root):
    from pycocotools import mask as mask_utils

    ds = build_dataset(DatasetConfig(name="coco", root=str(coco_root), split="val"))
    assert ds.split == "val2017"
    crowd = [a for a in ds.coco.dataset["annotations"] if a["iscrowd"]]
    assert crowd and isinstance(crowd[0]["segmentation"]["counts"], list)
    a = crowd[0]
    info = ds.coco.imgs[a["image_id"]]
    m = mask_utils.decode(mask_utils.frPyObjects(a["segmentation"], info["height"], info["width"])) > 0
    mask = ds.load_mask(str(a["image_id"]))
    assert (mask == 255).any() and m[mask == 255].all()  # 255 exactly on crowd pixels ...
    assert np.isin(mask[m], [255] + [ds.cat_to_label[b["category_id"]] for b in ds.coco.imgToAnns[a["image_id"]]]).all()


def test_coco_overlap_rule(tmp_path):
    """Crowd first (255), then instances by decreasing area: small on top of large."""
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "val2017" / "000000000007.jpg")

    def box(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    anns = [  # small listed first, crowd covering both
        {"id": 1, "image_id": 7, "category_id": 90, "segmentation": box(5, 5, 9, 9), "area": 16.0, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "segmentation": box(2, 2, 15, 15), "area": 169.0, "iscrowd": 0},
        {"id": 3, "image_id": 7, "category_id": 3, "segmentation": box(0, 0, 19, 19), "area": 361.0, "iscrowd": 1},
    ]
    cats = [{"id": i, "name": n, "supercategory": s} for i, n, s in synthetic.COCO_CATEGORIES]
    doc = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "height": 20, "width": 20}],
        "annotations": anns,
        "categories": cats,
    }
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    mask = build_dataset(DatasetConfig(name="coco", root=str(tmp_path))).load_mask("7")
    assert mask[7, 7] == 80 and mask[3, 12] == 1 and mask[18, 1] == 255


def test_coco_2014_layout(tmp_path):
    root = synthetic.make_coco(tmp_path, year=2014, num_train=2, num_val=2, size=(48, 64))
    ds = build_dataset(DatasetConfig(name="coco", root=str(root)))
    assert ds.split == "val2014" and len(ds) == 2
    assert ds.image_path(ds.ids[0]).name.startswith("COCO_val2014_")
    assert build_dataset(DatasetConfig(name="coco", root=str(root), split="train")).split == "train2014"
    for id_ in ds.ids:
        _check_mask_matches_image(ds, id_)


def test_coco_errors(coco_root, tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'test2017'.*available: \['train2017', 'val2017'\]"):
        build_dataset(DatasetConfig(name="coco", root=str(coco_root), split="test2017"))
    with pytest.raises(FileNotFoundError, match=r"no annotations/instances_\*.json under .*DATA="):
        build_dataset(DatasetConfig(name="coco", root=str(tmp_path)))
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset(DatasetConfig(name="coco"))
