"""What every dataset reader shares: its config, the :class:`Dataset` base class, and layout checks.

Every stage downstream only sees ``Dataset.ids`` (a stable order, hashed into the
store manifest), ``load_image`` (RGB uint8) and ``load_mask`` (class indices). The
helpers here find a reader's root, split and files: :func:`require_root`,
:func:`check_split`, :func:`read_list` (split list files) and :func:`files_by_stem`.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sazs.core.limits import MAX_LIST_BYTES, MAX_PIXELS

from .images import IMAGE_EXTENSIONS, read_image


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "sample"
    root: str | None = None
    split: str | None = None  # None -> the dataset's default split
    limit: int | None = None  # keep the first N ids (quick runs)
    min_side: int = 16  # reject images whose shorter side is below this
    max_pixels: int = MAX_PIXELS  # reject (before decoding) images with more pixels than this

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all images), got {self.limit}")
        if self.min_side < 1 or self.max_pixels < 1:
            raise ValueError(f"min_side and max_pixels must be >= 1, got {self.min_side} and {self.max_pixels}")


class Dataset:
    """Ordered image ids with their files; subclasses fill the paths and masks.

    The id order is the dataset's natural order (split file, sorted paths,
    ascending COCO image id) and is what the prior store indexes by, so it must
    never depend on the file system's listing order.
    """

    name = ""

    def __init__(
        self,
        cfg: DatasetConfig,
        *,
        root: str,
        split: str,
        paths: dict[str, Path],
        class_names: list[str],
        image_root: str | os.PathLike | None = None,
    ):
        ids = list(paths)[: cfg.limit]
        self.root, self.split, self.min_side, self.max_pixels = root, split, cfg.min_side, cfg.max_pixels
        # Readers whose image paths come from text (split lists, annotation files) name the
        # folder those paths must stay inside (read_image's root check), so that an entry
        # with '..' or an absolute path fails alone; readers that list directories need none.
        self.image_root = None if image_root is None else os.path.abspath(image_root)
        self.ids: list[str] = ids
        self._paths = {i: paths[i] for i in ids}
        self.class_names: list[str] = class_names

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, root={self.root!r}, n={len(self)})"

    def image_path(self, id: str) -> Path:
        try:
            return self._paths[id]
        except KeyError:
            raise KeyError(f"unknown image id {id!r} in dataset {self.name}/{self.split}") from None

    def load_image(self, id: str) -> np.ndarray:
        return read_image(self.image_path(id), self.min_side, self.max_pixels, root=self.image_root)

    def load_mask(self, id: str) -> np.ndarray | None:
        self.image_path(id)  # unknown id -> KeyError
        return None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "root": str(Path(self.root).resolve()) if self.root else None,  # absolute: stores outlive the cwd
            "num_images": len(self.ids),
            "ids_sha256": hashlib.sha256("\n".join(self.ids).encode()).hexdigest(),
        }


def read_list(path: Path) -> list[str]:
    """The first field of every non-blank line of a split list file (one image id a line)."""
    size = path.stat().st_size
    if size > MAX_LIST_BYTES:
        raise ValueError(
            f"split list {path} is {size} bytes, over the {MAX_LIST_BYTES >> 20} MiB a list of "
            "image ids needs; is it the right file?"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"split list {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    return [ln.split()[0] for ln in text.splitlines() if ln.strip()]


def check_split(name: str, split: str, available: list[str]) -> None:
    if split not in available:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; available: {sorted(available)}")


def require_root(name: str, root: str | None, hint: str) -> Path:
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root directory: {hint}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset root {path} is not a directory: {hint}")
    try:
        str(path.resolve()).encode("utf-8")  # the manifest records it
    except UnicodeEncodeError:
        raise ValueError(
            f"dataset root {os.fsencode(path.resolve())!r} is not valid UTF-8; "
            "rename it or pass a symlink with a UTF-8 name"
        ) from None
    return path


def files_by_stem(folder: Path) -> dict[str, Path]:
    """Image files directly in ``folder`` by id: the stem, or the file name where two files share a stem."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    clash = {s for s, n in Counter(p.stem for p in files).items() if n > 1}
    return {(p.name if p.stem in clash else p.stem): p for p in files}
