"""The PASCAL VOC segmentation reader (VOC 2012, optionally SBD-augmented, or VOC 2007) and the VOC class names.

VOC 2007 and VOC 2012 share the 20 classes, the palette PNG masks (0 background, 1..20 the
classes, 255 the outline band, ignored) and the layout ``JPEGImages/``, ``SegmentationClass/``,
``ImageSets/Segmentation/<split>.txt``; only the folder name differs. The root may be the release
folder itself (``VOC2012/``, ``VOC2007/``) or a folder above it (``VOCdevkit/``, or the folder
holding ``VOCdevkit/``): the first candidate with ``JPEGImages/`` is read, VOC 2012 before 2007.
Split lists are the release's ``ImageSets/Segmentation/*.txt`` (any name there is a split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Dataset, DatasetConfig, check_split, read_list, require_root
from .images import check_path, read_label_png

VOC_CLASSES = [
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


class VOCDataset(Dataset):
    """PASCAL VOC 2012 (optionally SBD-augmented: SegmentationClassAug/) or VOC 2007 segmentation."""

    name = "voc"
    RELEASES = ("VOC2012", "VOC2007")
    LAYOUT = (
        "expected the PASCAL VOC layout (VOCdevkit/VOC2012 or VOCdevkit/VOC2007 with {JPEGImages, "
        "SegmentationClass, ImageSets/Segmentation}), pass DATA=path/to/VOC2012 or DATA=path/to/VOC2007"
    )

    def __init__(self, cfg: DatasetConfig):
        given = require_root(self.name, cfg.root, self.LAYOUT)
        candidates = [given, *(given / r for r in self.RELEASES), *(given / "VOCdevkit" / r for r in self.RELEASES)]
        root = next((c for c in candidates if (c / "JPEGImages").is_dir()), None)
        if root is None:
            raise FileNotFoundError(f"no JPEGImages/ under {given}: {self.LAYOUT}")
        sets = root / "ImageSets" / "Segmentation"
        available = sorted(p.stem for p in sets.glob("*.txt"))
        if not available:
            raise FileNotFoundError(f"no split files {sets}/*.txt: {self.LAYOUT}")
        split = cfg.split or "val"
        check_split(self.name, split, available)
        ids = read_list(sets / f"{split}.txt")
        paths = {i: root / "JPEGImages" / f"{i}.jpg" for i in ids}
        super().__init__(
            cfg, root=str(root), split=split, paths=paths, class_names=list(VOC_CLASSES), image_root=root / "JPEGImages"
        )

    def mask_path(self, id: str) -> Path | None:
        """SegmentationClassAug (SBD, grayscale) if present for the id, else SegmentationClass."""
        self.image_path(id)
        for sub in ("SegmentationClassAug", "SegmentationClass"):
            p = Path(self.root, sub, f"{id}.png")
            check_path(p, Path(self.root, sub))  # an id with '..' must not reach outside
            if p.is_file():
                return p
        return None

    def load_mask(self, id: str) -> np.ndarray | None:
        p = self.mask_path(id)
        return None if p is None else read_label_png(p)
