"""The CamVid reader in SegNet's 11-class layout (no background class; unlabelled becomes 255)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sazs.core.labels import IGNORE_INDEX

from .base import Dataset, DatasetConfig, check_split, files_by_stem, require_root
from .images import ImageError, read_mask

CAMVID_CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)


class CamVidDataset(Dataset):
    """CamVid in SegNet's 11-class layout: ``<split>/`` images and ``<split>annot/`` labels, same file names.

    Splits: those of train, val, test present with their ``annot`` folder (default val).
    Labels: CamVid has no background class, so here ``load_mask`` values 0..10 ARE the 11
    classes (``class_names[0]`` is "sky", not "background"; ``has_background`` is False) and
    SegNet's 11 (unlabelled) becomes 255, the ignore value of every reader. Class names come
    from ``classes.json`` in the root when there is one (SegNet's order otherwise).
    """

    name = "camvid"
    has_background = False
    LAYOUT = "expected SegNet's CamVid layout (train/, trainannot/, val/, valannot/, ...), pass DATA=path/to/CamVid"

    def __init__(self, cfg: DatasetConfig):
        root = require_root(self.name, cfg.root, self.LAYOUT)
        available = [s for s in ("train", "val", "test") if (root / s).is_dir() and (root / f"{s}annot").is_dir()]
        if not available:
            raise FileNotFoundError(f"no train/ + trainannot/ (or val, test) folders under {root}: {self.LAYOUT}")
        split = cfg.split or "val"
        check_split(self.name, split, available)
        names, self.unlabelled = list(CAMVID_CLASSES), 11
        meta = root / "classes.json"
        if meta.is_file():
            info = json.loads(meta.read_text())
            names = [str(n) for n in info.get("classes", names)]
            self.unlabelled = int(info.get("ignore_index", info.get("unlabelled", 11)))
        self.annot_dir = root / f"{split}annot"
        paths = files_by_stem(root / split)
        if not paths:
            raise FileNotFoundError(f"no images in {root / split}: {self.LAYOUT}")
        super().__init__(cfg, root=str(root), split=split, paths=paths, class_names=names)

    def mask_path(self, id: str) -> Path:
        return self.annot_dir / self.image_path(id).name

    def load_mask(self, id: str) -> np.ndarray:
        path = self.mask_path(id)
        a = read_mask(path, self.image_path(id), labels=True)
        out = np.where(a == self.unlabelled, IGNORE_INDEX, a).astype(np.uint8)
        bad = np.unique(out[(out >= len(self.class_names)) & (out != IGNORE_INDEX)])
        if bad.size:
            raise ImageError(
                f"mask {path} has label values {bad.tolist()[:5]} outside 0..{len(self.class_names) - 1} "
                f"and {self.unlabelled} (unlabelled)",
                path,
            )
        return out
