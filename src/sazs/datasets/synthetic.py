"""Small synthetic datasets in the exact PASCAL VOC 2012 and COCO on-disk layouts.

Tests, and the training / evaluation smoke runs, need real-looking datasets with
no network. The images and label maps are painted by :mod:`sazs.datasets.scenes`;
this module writes them as the real files (JPEGs, VOC palette PNGs and split lists,
COCO instances JSON with polygons and a crowd RLE). Output is byte-identical for a seed.

Example::

    python -m sazs.datasets.synthetic voc /tmp/voc --num-val 20
    python -m sazs.datasets.synthetic coco /tmp/coco --year 2014
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from .scenes import class_plan, scene
from .voc import VOC_CLASSES

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


def _uncompressed_rle(m: np.ndarray) -> dict:
    """Column-major run lengths starting with a zero run, as in real COCO crowd annotations."""
    flat = m.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"counts": counts, "size": [int(m.shape[0]), int(m.shape[1])]}


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
        for id_, labels in zip(split_ids, class_plan(rng, len(split_ids), len(VOC_CLASSES) - 1)):
            rgb, lab, _, _ = scene(rng, size, labels)
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
        for k, (image_id, labels) in enumerate(zip(ids, class_plan(rng, len(ids), len(COCO_CATEGORIES)))):
            rgb, _, instances, crowd = scene(rng, size, labels, crowd_label=labels[0] if k == 0 else None)
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
