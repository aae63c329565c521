"""The PASCAL VOC 2012 segmentation reader (optionally SBD-augmented) and the VOC class names."""

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
    """PASCAL VOC 2012 segmentation (optionally SBD-augmented: SegmentationClassAug/)."""

    name = "voc"
    LAYOUT = (
        "expected the PASCAL VOC 2012 layout (VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, "
        "ImageSets/Segmentation}), pass DATA=path/to/VOC2012"
    )

    def __init__(self, cfg: DatasetConfig):
        given = require_root(self.name, cfg.root, self.LAYOUT)
        candidates = [given, given / "VOC2012", given / "VOCdevkit" / "VOC2012"]
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
