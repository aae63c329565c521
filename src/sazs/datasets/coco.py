"""The COCO 2014/2017 instances reader: instance annotations painted into semantic masks."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from sazs.core.jsonfiles import read_json
from sazs.core.labels import IGNORE_INDEX
from sazs.core.limits import MAX_ANNOTATION_JSON_BYTES

from .base import Dataset, DatasetConfig, check_split, require_root
from .images import ImageError


def _coco_problem(data) -> str | None:
    """What makes ``data`` unusable as COCO instances (None if nothing): the fields that
    pycocotools' index and this module read, with the index of the first bad record."""
    if not isinstance(data, dict):
        return f"the top level is a JSON {type(data).__name__}, not an object"
    required = {
        "images": {"id": int, "file_name": str, "height": int, "width": int},
        "categories": {"id": int, "name": str},
        "annotations": {"id": int, "image_id": int, "category_id": int, "area": (int, float)},
    }
    for key, fields in required.items():
        records = data.get(key, [])
        if not isinstance(records, list):
            return f"'{key}' is a JSON {type(records).__name__}, not a list"
        for j, record in enumerate(records):
            if not isinstance(record, dict):
                return f"{key}[{j}] is a JSON {type(record).__name__}, not an object"
            for name, kind in fields.items():
                value = record.get(name)
                if not isinstance(value, kind) or isinstance(value, bool) or value == "":
                    what = getattr(kind, "__name__", "number")
                    return f"{key}[{j}] has no {what} '{name}' (got {value!r:.40})"
    return None


def _load_coco(path: Path):
    """pycocotools' index of an instances JSON; a malformed file is a one-line ValueError."""
    from pycocotools.coco import COCO

    data = read_json(
        path,
        max_bytes=MAX_ANNOTATION_JSON_BYTES,
        what="annotation file",
        fix="re-download or regenerate it",
        raise_with="$SAZS_MAX_ANNOTATION_JSON_BYTES",
    )
    problem = _coco_problem(data)
    if problem:
        raise ValueError(f"annotation file {path}: {problem}; expected COCO instances JSON")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


class COCODataset(Dataset):
    """COCO 2014/2017 instances turned into semantic masks (labels 1..80, crowd = 255).

    Overlap rule: crowd regions are painted first as 255 (ignore), then the
    non-crowd instances in order of decreasing annotated area (ties: annotation
    id), so a smaller object lying on a larger one stays visible and a real
    instance inside a crowd region keeps its label.
    """

    name = "coco"
    LAYOUT = (
        "expected the COCO layout (val2017/, train2017/ or *2014/, annotations/instances_<split>.json), "
        "pass DATA=path/to/coco"
    )

    def __init__(self, cfg: DatasetConfig):
        root = require_root(self.name, cfg.root, self.LAYOUT)
        ann_dir = root / "annotations"
        available = sorted(p.stem.removeprefix("instances_") for p in ann_dir.glob("instances_*.json"))
        if not available:
            raise FileNotFoundError(f"no annotations/instances_*.json under {root}: {self.LAYOUT}")
        split = cfg.split or "val"
        if split in ("train", "val"):  # year-less name -> the year present, 2017 first
            split = next((f"{split}{y}" for y in (2017, 2014) if f"{split}{y}" in available), split)
        check_split(self.name, split, available)
        if not (root / split).is_dir():
            raise FileNotFoundError(f"no {split}/ image directory under {root}: {self.LAYOUT}")
        self.coco = _load_coco(ann_dir / f"instances_{split}.json")
        cat_ids = sorted(self.coco.getCatIds())
        if len(cat_ids) > 254:
            raise ValueError(f"{len(cat_ids)} categories do not fit uint8 labels 1..254")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        names = ["background"] + [self.coco.cats[c]["name"] for c in cat_ids]
        paths = {str(i): root / split / self.coco.imgs[i]["file_name"] for i in sorted(self.coco.imgs)}
        super().__init__(cfg, root=str(root), split=split, paths=paths, class_names=names, image_root=root / split)

    def load_mask(self, id: str) -> np.ndarray:
        """The semantic mask of image ``id``; ImageError (a failure of that image) for sizes out of bounds.

        The annotation file, not the image, gives the mask's size: it is checked against the
        pixel bound (``max_pixels``) before the mask is allocated, and every RLE annotation
        must be of that size (pycocotools would decode it at the size it claims).
        """
        path = self.image_path(id)
        info = self.coco.imgs[int(id)]
        h, w = info["height"], info["width"]
        if not (h >= 1 and w >= 1 and h * w <= self.max_pixels):
            raise ImageError(
                f"the annotation file gives image {id} the size {h}x{w}, not 1 to {self.max_pixels / 1e6:g} "
                "megapixels; fix its 'height'/'width' (or raise --max-megapixels)",
                path,
            )
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[int(id)], iscrowd=None))
        for a in anns:
            segm = a.get("segmentation")
            if not isinstance(segm, list | dict):
                raise ImageError(
                    f"annotation {a['id']} of image {id} has no segmentation (polygons or RLE) but "
                    f"{type(segm).__name__}; fix the annotation file",
                    path,
                )
            if isinstance(segm, dict) and list(segm.get("size", ())) != [h, w]:
                raise ImageError(
                    f"annotation {a['id']} of image {id} is an RLE of size {str(segm.get('size'))[:40]}, not the "
                    f"image's {h}x{w}; fix the annotation file",
                    path,
                )
        mask = np.zeros((h, w), np.uint8)
        for a in [a for a in anns if a.get("iscrowd", 0)]:
            mask[self.coco.annToMask(a) > 0] = IGNORE_INDEX
        for a in sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: (-a["area"], a["id"])):
            mask[self.coco.annToMask(a) > 0] = self.cat_to_label[a["category_id"]]
        return mask
