"""Small synthetic datasets in the exact PASCAL VOC 2012 and COCO on-disk layouts.

Tests, and the training / evaluation smoke runs, need real-looking datasets with
no network. Images are textured backgrounds with 1-3 shapes whose colour and
texture depend only on the class, so both colour features and a ViT can tell
the classes apart; masks are rasterised from the same polygons that paint the
image, so they match pixel for pixel. Output is byte-identical for a seed.

Example::

    python -m sazs.datasets.synthetic voc /tmp/voc --num-val 20
    python -m sazs.datasets.synthetic coco /tmp/coco --year 2014
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from .readers import VOC_CLASSES

JPEG_QUALITY = 92  # fixed (with 4:4:4 chroma) so bytes are reproducible and colours survive

# The 80 COCO "thing" categories: (id, name, supercategory); ids are sparse in 1..90.
COCO_CATEGORIES = [
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"),
    (6, "bus", "vehicle"),
    (7, "train", "vehicle"),
    (8, "truck", "vehicle"),
    (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"),
    (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"),
    (15, "bench", "outdoor"),
    (16, "bird", "animal"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (19, "horse", "animal"),
    (20, "sheep", "animal"),
    (21, "cow", "animal"),
    (22, "elephant", "animal"),
    (23, "bear", "animal"),
    (24, "zebra", "animal"),
    (25, "giraffe", "animal"),
    (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"),
    (32, "tie", "accessory"),
    (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"),
    (35, "skis", "sports"),
    (36, "snowboard", "sports"),
    (37, "sports ball", "sports"),
    (38, "kite", "sports"),
    (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"),
    (41, "skateboard", "sports"),
    (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"),
    (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"),
    (48, "fork", "kitchen"),
    (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"),
    (52, "banana", "food"),
    (53, "apple", "food"),
    (54, "sandwich", "food"),
    (55, "orange", "food"),
    (56, "broccoli", "food"),
    (57, "carrot", "food"),
    (58, "hot dog", "food"),
    (59, "pizza", "food"),
    (60, "donut", "food"),
    (61, "cake", "food"),
    (62, "chair", "furniture"),
    (63, "couch", "furniture"),
    (64, "potted plant", "furniture"),
    (65, "bed", "furniture"),
    (67, "dining table", "furniture"),
    (70, "toilet", "furniture"),
    (72, "tv", "electronic"),
    (73, "laptop", "electronic"),
    (74, "mouse", "electronic"),
    (75, "remote", "electronic"),
    (76, "keyboard", "electronic"),
    (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"),
    (79, "oven", "appliance"),
    (80, "toaster", "appliance"),
    (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"),
    (84, "book", "indoor"),
    (85, "clock", "indoor"),
    (86, "vase", "indoor"),
    (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
]


def voc_colormap(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC palette (n, 3) uint8; index 255 is (224, 224, 192)."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for k in range(3):
                rgb[k] |= ((c >> k) & 1) << (7 - j)
            c >>= 3
        cmap[i] = rgb
    return cmap


def class_color(label: int) -> np.ndarray:
    """Mean RGB colour (3,) uint8 of class ``label`` (1-based) in generated images.

    Hues step by a low-discrepancy constant and saturation/value alternate, chosen so
    the 20 VOC classes are >= 59 apart in L1; values stay in [40, 215] so the
    zero-mean texture never clips and the region mean stays at this colour.
    """
    hue = (label * 0.569840291) % 1.0
    sat = (0.95, 0.6)[label % 2]
    val = (0.95, 0.6, 0.8)[label % 3]
    rgb = np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 175 + 40
    return np.round(rgb).astype(np.uint8)


def _texture(label: int, h: int, w: int) -> np.ndarray:
    """Zero-mean (h, w) pattern in [-1, 1] whose kind, period and angle depend on the class."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    period = 5 + label % 7
    angle = math.radians((label * 37) % 180)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
    kind = label % 3
    if kind == 0:  # stripes
        return np.sin(t)
    if kind == 1:  # checker
        return np.sign(np.sin(t) * np.sin((-xx * math.sin(angle) + yy * math.cos(angle)) * 2 * math.pi / period))
    return np.sin(t) * np.cos(yy * 2 * math.pi / (period + 3))  # weave


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-saturation colour with smooth blotches and fine grain, unlike any class colour."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), 0.15 * rng.random(), 0.35 + 0.4 * rng.random())) * 255
    coarse = rng.normal(size=(4, 5, 3))
    smooth = ndimage.zoom(coarse, (h / 4, w / 5, 1), order=1)[:h, :w]
    return base + 18 * smooth + rng.normal(0, 6, size=(h, w, 3))


def _shape_polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float) -> list[float]:
    """Ellipse, rotated rectangle, triangle or irregular polygon as flat [x0, y0, x1, ...]."""
    kind = rng.integers(4)
    rot = rng.uniform(0, 2 * math.pi) if kind else rng.uniform(-0.3, 0.3)
    if kind == 0:  # rectangle (near axis-aligned)
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        radius = np.full(4, math.sqrt(2) * 0.75)
    elif kind == 1:  # ellipse
        angles, radius = np.linspace(0, 2 * math.pi, 48, endpoint=False), np.ones(48)
    elif kind == 2:  # triangle
        angles, radius = np.array([0, 2, 4]) * math.pi / 3 + rng.uniform(-0.3, 0.3, 3), np.ones(3)
    else:  # irregular polygon
        n = int(rng.integers(5, 8))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radius = rng.uniform(0.65, 1.0, n)
    x = radius * np.cos(angles) * rx
    y = radius * np.sin(angles) * ry
    px = cx + x * math.cos(rot) - y * math.sin(rot)
    py = cy + x * math.sin(rot) + y * math.cos(rot)
    return np.round(np.stack([px, py], 1).ravel(), 2).tolist()


def _rasterize(poly: list[float], h: int, w: int) -> dict:
    """COCO RLE of a polygon: the same rasteriser that ``COCO.annToMask`` uses."""
    return mask_utils.frPyObjects([poly], h, w)[0]


def _uncompressed_rle(m: np.ndarray) -> dict:
    """Column-major run lengths starting with a zero run, as in real COCO crowd annotations."""
    flat = m.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"counts": counts, "size": [int(m.shape[0]), int(m.shape[1])]}


def _image_size(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    h += int(rng.integers(-(h // 8), h // 8 + 1))
    w += int(rng.integers(-(w // 8), w // 8 + 1))
    return (w, h) if rng.random() < 1 / 3 else (h, w)  # a third are the other orientation


def _class_plan(rng: np.random.Generator, n_images: int, num_classes: int) -> list[list[int]]:
    """1-3 distinct labels per image, round-robin over a shuffled class order.

    Images take extra shapes while classes remain uncovered, so every class
    appears at least once whenever 3 * n_images >= num_classes.
    """
    order = rng.permutation(num_classes) + 1
    plan, k = [], 0
    for i in range(n_images):
        need = math.ceil(max(num_classes - k, 0) / (n_images - i))
        n = min(3, max(int(rng.integers(1, 4)), need))
        plan.append([int(order[(k + j) % num_classes]) for j in range(n)])
        k += n
    return plan


def _scene(rng: np.random.Generator, size: tuple[int, int], labels: list[int], crowd_label: int | None = None):
    """Paint one image; returns (rgb uint8, label map, instances, crowd mask or None).

    Shapes sit in separate cells along the long side (so none is hidden) and are
    painted in decreasing area, the order the COCO reader uses for overlaps.
    """
    h, w = _image_size(rng, size)
    img = _background(rng, h, w)
    lab = np.zeros((h, w), np.uint8)
    n = len(labels)
    crowd = None
    if crowd_label is not None:  # a cluster of blobs in the bottom-left corner
        yy, xx = np.mgrid[0:h, 0:w]
        crowd = np.zeros((h, w), bool)
        for _ in range(5):
            cy, cx, r = h * rng.uniform(0.75, 0.95), w * rng.uniform(0.02, 0.3), min(h, w) * rng.uniform(0.05, 0.1)
            crowd |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[crowd] = (class_color(crowd_label) + 30 * _texture(crowd_label, h, w)[..., None])[crowd]
    instances = []
    for j, label in enumerate(labels):
        if w >= h:
            cw, ch, cx, cy = w / n, h, (j + 0.5) * w / n, h / 2
        else:
            cw, ch, cx, cy = w, h / n, w / 2, (j + 0.5) * h / n
        cx += rng.uniform(-0.05, 0.05) * cw
        cy += rng.uniform(-0.05, 0.05) * ch
        rx, ry = cw * rng.uniform(0.25, 0.5), ch * rng.uniform(0.25, 0.42)
        poly = _shape_polygon(rng, cx, cy, rx, ry)
        poly = np.clip(np.reshape(poly, (-1, 2)), 0, [w - 1, h - 1]).ravel().tolist()
        rle = _rasterize(poly, h, w)
        instances.append({"label": label, "poly": poly, "rle": rle, "area": int(mask_utils.area(rle))})
    instances.sort(key=lambda d: -d["area"])  # stable: equal areas keep generation order
    for inst in instances:
        m = mask_utils.decode(inst["rle"]).astype(bool)
        img[m] = (class_color(inst["label"]) + 30 * _texture(inst["label"], h, w)[..., None])[m]
        lab[m] = inst["label"]
    return np.clip(np.round(img), 0, 255).astype(np.uint8), lab, instances, crowd


def _save_jpeg(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)


def make_voc(root, *, num_train: int = 8, num_val: int = 8, size: tuple[int, int] = (160, 224), seed: int = 0) -> Path:
    """Write ``root/VOCdevkit/VOC2012`` (JPEGImages, SegmentationClass, split files); return that dir.

    Masks are palette PNGs with the VOC colour map, class indices 1..20 on the
    shapes and a 255 band about 2 px wide on every label boundary, as in real VOC.
    """
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{i:06d}" for i in range(1, num_train + num_val + 1)]
    perm = rng.permutation(len(ids))
    splits = {"train": sorted(ids[i] for i in perm[num_val:]), "val": sorted(ids[i] for i in perm[:num_val])}
    palette = voc_colormap().ravel().tolist()
    for split_ids in splits.values():
        for id_, labels in zip(split_ids, _class_plan(rng, len(split_ids), len(VOC_CLASSES) - 1)):
            rgb, lab, _, _ = _scene(rng, size, labels)
            lab[ndimage.maximum_filter(lab, 3) != ndimage.minimum_filter(lab, 3)] = 255
            _save_jpeg(rgb, voc / "JPEGImages" / f"{id_}.jpg")
            png = Image.frombytes("P", (lab.shape[1], lab.shape[0]), lab.tobytes())
            png.putpalette(palette)
            png.save(voc / "SegmentationClass" / f"{id_}.png")
    splits["trainval"] = sorted(splits["train"] + splits["val"])
    for split, split_ids in splits.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    return voc


def make_coco(
    root, *, year: int = 2017, num_train: int = 8, num_val: int = 8, size: tuple[int, int] = (160, 224), seed: int = 0
) -> Path:
    """Write ``root/{train,val}<year>/`` and ``root/annotations/instances_*.json``; return root.

    Instances are polygons (one per shape); the first image of each split also
    has a crowd region stored as uncompressed RLE with iscrowd=1. Image ids are
    sparse and listed in non-sorted order, like the real files.
    """
    if year not in (2014, 2017):
        raise ValueError(f"year must be 2014 or 2017, got {year}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"supercategory": s, "id": i, "name": n} for i, n, s in COCO_CATEGORIES]
    label_to_cat = {k + 1: c[0] for k, c in enumerate(COCO_CATEGORIES)}
    image_ids = rng.choice(np.arange(1, 581930), num_train + num_val, replace=False).tolist()
    ann_id = 1
    for split, ids in ((f"train{year}", image_ids[:num_train]), (f"val{year}", image_ids[num_train:])):
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for k, (image_id, labels) in enumerate(zip(ids, _class_plan(rng, len(ids), len(COCO_CATEGORIES)))):
            rgb, _, instances, crowd = _scene(rng, size, labels, crowd_label=labels[0] if k == 0 else None)
            h, w = rgb.shape[:2]
            file_name = f"{image_id:012d}.jpg" if year == 2017 else f"COCO_{split}_{image_id:012d}.jpg"
            _save_jpeg(rgb, root / split / file_name)
            images.append(
                {
                    "license": 1,
                    "file_name": file_name,
                    "coco_url": "",
                    "height": h,
                    "width": w,
                    "date_captured": "2013-11-14 11:18:45",
                    "flickr_url": "",
                    "id": image_id,
                }
            )
            regions = [(inst["label"], [inst["poly"]], inst["rle"], 0) for inst in instances]
            if crowd is not None:
                rle = _uncompressed_rle(crowd)
                regions.append((labels[0], rle, mask_utils.frPyObjects(rle, h, w), 1))
            for label, segmentation, rle, iscrowd in regions:
                anns.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": label_to_cat[label],
                        "segmentation": segmentation,
                        "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                        "iscrowd": iscrowd,
                    }
                )
                ann_id += 1
        doc = {
            "info": {
                "description": "sazs synthetic COCO",
                "url": "",
                "version": "1.0",
                "year": year,
                "contributor": "sazs.datasets.synthetic",
                "date_created": f"{year}/01/01",
            },
            "licenses": [{"url": "https://creativecommons.org/licenses/by/4.0/", "id": 1, "name": "CC BY 4.0"}],
            "images": images,
            "annotations": anns,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


# ----------------------------------------------------------------------------- bad files


def write_bad_images(directory) -> dict[str, str]:
    """Write one file per awkward case; return {id: "ok" | "failed"} (id = file stem).

    Good ones decode to known content: ``quadrants`` colours are TL red, TR green,
    BL blue, BR yellow. ``exif_rot6`` stores a 32x48 quadrant image with EXIF
    orientation 6 (display = rotate 90 degrees clockwise -> 48x32); ``cmyk`` is
    the 48x64 quadrant image in CMYK; ``gray`` a horizontal ramp; ``rgba`` three
    vertical bands (opaque red, transparent with green underneath, half-transparent
    blue); ``gray16`` a 16-bit horizontal ramp 0..65535; ``palette`` a P-mode
    quadrant image. ``truncated``, ``empty``, ``text`` and ``tiny`` (4x4) fail.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    quads = quadrant_image(48, 64)
    rng = np.random.default_rng(0)
    buf = d / "truncated.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, quality=95)
    data = buf.read_bytes()
    buf.write_bytes(data[: len(data) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    Image.fromarray(quadrant_image(4, 4)).save(d / "tiny.png")
    Image.fromarray(quads).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))).save(d / "gray.png")
    rgba = np.zeros((48, 60, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)
    rgba[:, 20:40] = (0, 255, 0, 0)
    rgba[:, 40:] = (0, 0, 255, 128)
    Image.fromarray(rgba).save(d / "rgba.png")
    ramp16 = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (48, 1))
    Image.fromarray(ramp16).save(d / "gray16.png")
    Image.fromarray(quads).quantize(8).save(d / "palette.png")
    rot = Image.fromarray(quadrant_image(32, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    rot.save(d / "exif_rot6.jpg", quality=95, exif=exif.tobytes())
    failed = ("truncated", "empty", "text", "tiny")
    ok = ("cmyk", "gray", "rgba", "gray16", "palette", "exif_rot6")
    return {**{k: "failed" for k in failed}, **{k: "ok" for k in ok}}


QUADRANT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))  # TL, TR, BL, BR


def quadrant_image(h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w, 3), np.uint8)
    out[: h // 2, : w // 2], out[: h // 2, w // 2 :] = QUADRANT_COLORS[:2]
    out[h // 2 :, : w // 2], out[h // 2 :, w // 2 :] = QUADRANT_COLORS[2:]
    return out


# ----------------------------------------------------------------------------- CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "sazs.datasets.synthetic",
        add_help=add_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a small synthetic dataset in the real VOC 2012 or COCO layout.",
        epilog="example:\n  python -m sazs.datasets.synthetic voc /tmp/sazs-voc --num-val 20\n"
        "  then pass the printed path as DATA= (dataset 'voc' or 'coco')",
    )
    p.add_argument("kind", choices=["voc", "coco"])
    p.add_argument("out", type=Path, help="output directory (created)")
    p.add_argument("--num-train", type=int, default=8)
    p.add_argument("--num-val", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=(160, 224), metavar=("H", "W"), help="base image size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--year", type=int, choices=[2014, 2017], default=2017, help="COCO layout year")
    return p


def main(argv: list[str] | None = None) -> int:
    """Write the dataset and print its root (the value to pass as DATA=); returns 0."""
    args = get_args_parser().parse_args(argv)
    common = dict(num_train=args.num_train, num_val=args.num_val, size=tuple(args.size), seed=args.seed)
    if args.kind == "voc":
        root = make_voc(args.out, **common)
    else:
        root = make_coco(args.out, year=args.year, **common)
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
