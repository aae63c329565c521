"""The DAVIS 2016/2017 video object segmentation reader: frames as images, binary masks, sequences as groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Dataset, DatasetConfig, check_split, require_root
from .images import IMAGE_EXTENSIONS, read_mask


class DAVISDataset(Dataset):
    """DAVIS (2016/2017) video object segmentation: frames as images, binary masks, sequences as groups.

    Layout: ``JPEGImages/480p/<seq>/<frame>.jpg`` and ``Annotations/480p/<seq>/<frame>.png``
    (``Full-Resolution`` when there is no ``480p``). Ids are ``<seq>/<frame>``, sorted.
    Splits: the sequence lists ``ImageSets/2016/<split>.txt`` (or ``ImageSets/480p``, whose
    lines are frame paths) when the release has them, default ``val``; ``all`` is every
    sequence folder (the default without lists). Masks: any non-zero value is the object
    (2017's per-object ids all count), so ``load_mask`` gives 0 / 1.
    :meth:`group` gives an id's sequence, for per-sequence scores.
    """

    name = "davis"
    LAYOUT = (
        "expected the DAVIS layout (JPEGImages/480p/<seq>/<frame>.jpg, Annotations/480p/<seq>/<frame>.png), "
        "pass DATA=path/to/DAVIS"
    )

    def __init__(self, cfg: DatasetConfig):
        root = require_root(self.name, cfg.root, self.LAYOUT)
        res = next((r for r in ("480p", "Full-Resolution") if (root / "JPEGImages" / r).is_dir()), None)
        if res is None:
            raise FileNotFoundError(f"no JPEGImages/480p/ under {root}: {self.LAYOUT}")
        frames_dir = root / "JPEGImages" / res
        present = sorted(p.name for p in frames_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        lists = next((d for d in (root / "ImageSets" / "2016", root / "ImageSets" / res) if d.is_dir()), None)
        listed = {p.stem: p for p in lists.glob("*.txt")} if lists else {}
        split = cfg.split or ("val" if "val" in listed else "all")
        check_split(self.name, split, ["all", *listed])
        if split == "all":
            sequences = present
        else:
            lines = [ln.split()[0] for ln in listed[split].read_text().splitlines() if ln.strip()]
            # ImageSets/2016: one sequence per line; ImageSets/480p: '/JPEGImages/480p/<seq>/<frame>.jpg ...'
            sequences = list(dict.fromkeys(ln.strip("/").split("/")[-2] if "/" in ln else ln for ln in lines))
            missing = [s for s in sequences if s not in present]
            if missing:
                raise FileNotFoundError(
                    f"split {split} of {root} lists sequence(s) {missing[:5]} with no folder "
                    f"under {frames_dir}; download the whole split or pass --split all"
                )
        paths = {
            f"{seq}/{p.stem}": p
            for seq in sequences
            for p in sorted((frames_dir / seq).iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS
        }
        if not paths:
            raise FileNotFoundError(f"no frames under {frames_dir}: {self.LAYOUT}")
        self.masks_dir = root / "Annotations" / res
        super().__init__(cfg, root=str(root), split=split, paths=paths, class_names=["background", "object"])

    def group(self, id: str) -> str:
        """The sequence of a frame id ``<seq>/<frame>``."""
        self.image_path(id)
        return id.split("/", 1)[0]

    def mask_path(self, id: str) -> Path:
        return self.masks_dir / f"{id}.png"

    def load_mask(self, id: str) -> np.ndarray:
        return (read_mask(self.mask_path(id), self.image_path(id), labels=False) != 0).astype(np.uint8)
