"""Datasets: image ids, images and semantic masks from the layouts people actually have.

Every stage downstream only sees ``Dataset.ids`` (a stable order, hashed into the
store manifest), ``load_image`` (RGB uint8) and ``load_mask`` (class indices).
Decoding is centralised in :func:`read_image` so that every odd file a real
dataset contains (CMYK, 16-bit, alpha, EXIF-rotated, truncated) is handled once,
and a broken file becomes an :class:`ImageError` with a short reason that the
pipeline records as a failed image instead of crashing a long job.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Exceptions PIL raises for a bad file during open/decode/convert. SyntaxError and
# struct.error come from format plugins that parse broken headers and chunks.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "sample"
    root: str | None = None
    split: str | None = None  # None -> the dataset's default split
    limit: int | None = None  # keep the first N ids (quick runs)
    min_side: int = 16  # reject images whose shorter side is below this


class ImageError(Exception):
    """An image that cannot be used; ``str(err)`` is a one-line reason naming the file."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        super().__init__(reason)
        self.reason = reason
        self.path = None if path is None else str(path)


# ----------------------------------------------------------------------------- decoding


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _gray_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth grayscale to 8 bits by scaling, never by clipping.

    PIL's own ``convert('L')`` has historically clipped 16-bit data at 255, which
    turns most of a 16-bit image white. 16-bit data (``I;16*``, and ``I`` whose
    values fit in 16 bits, which is how PIL opens many 16-bit PNG/TIFF files) is
    scaled by 255/65535; float data in [0, 1] by 255; anything else is min-max
    normalised because its range carries no convention.
    """
    if mode.startswith("I;16") or (mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        return np.round(a * 255).astype(np.uint8)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.round((a - lo) * scale).astype(np.uint8)


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.array(img)
    if mode.startswith("I") or mode == "F":
        g = _gray_to_uint8(np.array(img), mode)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite over white: dropping alpha exposes whatever colour the encoder
        # left under transparent pixels (often black or garbage).
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, img.convert("RGBA")).convert("RGB"))
    return np.array(img.convert("RGB"))  # L, 1, P, CMYK, YCbCr, HSV; others raise ValueError


def read_image(path: str | os.PathLike, min_side: int = 16) -> np.ndarray:
    """Decode ``path`` fully into an (H, W, 3) uint8 RGB array, upright per EXIF.

    Raises ImageError (with a reason naming the file) for a missing, empty,
    unrecognised, truncated or too-small image. The full decode happens here,
    not lazily, so a truncated file fails at read time and not inside a worker.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"empty file (0 bytes): {path}", path)
        with Image.open(path) as img:
            h, w = img.height, img.width
            if min(h, w) < min_side:
                raise ImageError(f"image too small: {path} is {h}x{w} < min_side {min_side}", path)
            img.load()
            arr = _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}", path) from None
    except UnidentifiedImageError:
        raise ImageError(f"not a recognised image format: {path}", path) from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"refusing decompression bomb {path}: {_one_line(err)}", path) from None
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot decode {path}: {_one_line(err)}", path) from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:  # defensive: PIL contract
        raise ImageError(f"cannot decode {path}: unexpected array {arr.shape} {arr.dtype}", path)
    return arr


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) as :func:`read_image` would return it, from the header only (no decode)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}", path) from None
    except UnidentifiedImageError:
        raise ImageError(f"not a recognised image format: {path}", path) from None
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot read header of {path}: {_one_line(err)}", path) from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _read_label_png(path: Path) -> np.ndarray:
    """Class-index PNG (palette or grayscale) as raw indices; never through RGB."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                msg = f"mask {path} has mode {img.mode}; expected palette (P) or grayscale (L) class indices"
                raise ImageError(msg, path)
            return np.array(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageError(f"not a recognised image format: {path}", path) from None
    except _DECODE_ERRORS as err:
        raise ImageError(f"cannot decode mask {path}: {_one_line(err)}", path) from None


# ----------------------------------------------------------------------------- datasets


class Dataset:
    """Ordered image ids with their files; subclasses fill the paths and masks.

    The id order is the dataset's natural order (split file, sorted paths,
    ascending COCO image id) and is what the prior store indexes by, so it must
    never depend on the file system's listing order.
    """

    name = ""

    def __init__(self, cfg: DatasetConfig, *, root: str, split: str, paths: dict[str, Path],
                 class_names: list[str]):  # fmt: skip
        if cfg.limit is not None and cfg.limit < 0:
            raise ValueError(f"limit must be >= 0, got {cfg.limit}")
        ids = list(paths)[: cfg.limit]
        self.root, self.split, self.min_side = root, split, cfg.min_side
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
        return read_image(self.image_path(id), self.min_side)

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


DATASETS: dict[str, type[Dataset]] = {}


def _register(cls: type[Dataset]) -> type[Dataset]:
    DATASETS[cls.name] = cls
    return cls


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def build_dataset(cfg: DatasetConfig) -> Dataset:
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose from {list_datasets()}")
    ds = DATASETS[cfg.name](cfg)
    logger.info("dataset %s/%s: %d images from %s", ds.name, ds.split, len(ds), ds.root)
    return ds


def _check_split(name: str, split: str, available: list[str]) -> None:
    if split not in available:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; available: {sorted(available)}")


def _require_root(name: str, root: str | None, hint: str) -> Path:
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root directory: {hint}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset root {path} is not a directory: {hint}")
    return path


# Colour photographs that ship inside the scikit-image wheel (skimage/data/), so
# they load with no network and without pooch. id = skimage.data function name.
# Left out: grayscale, synthetic (colorwheel, logo) and the pooch-only images.
SAMPLE_IMAGES = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "stereo_motorcycle": "motorcycle_left.png",  # left view of the stereo pair
}


@_register
class SampleDataset(Dataset):
    """A few real photographs for smoke runs, from the scikit-image wheel (offline)."""

    name = "sample"

    def __init__(self, cfg: DatasetConfig):
        import skimage.data

        data_dir = Path(skimage.data.__file__).parent
        split = cfg.split or "all"
        _check_split(self.name, split, ["all"])
        paths = {k: data_dir / f for k, f in sorted(SAMPLE_IMAGES.items())}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"scikit-image sample images missing: {missing}")
        super().__init__(cfg, root=str(data_dir), split=split, paths=paths, class_names=["background"])


@_register
class FolderDataset(Dataset):
    """Every image under a directory, recursively; ids are relative paths without extension."""

    name = "folder"

    def __init__(self, cfg: DatasetConfig):
        root = _require_root(self.name, cfg.root, "pass DATA=path/to/images (searched recursively)")
        split = cfg.split or "all"
        _check_split(self.name, split, ["all"])
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune hidden dirs
            files += [Path(dirpath, f) for f in filenames
                      if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]  # fmt: skip
        if not files:
            raise FileNotFoundError(f"no images under {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        rel = [f.relative_to(root).as_posix() for f in files]
        stems = [r.rsplit(".", 1)[0] for r in rel]
        clash = {s for s, n in Counter(stems).items() if n > 1}
        # a.jpg and a.png would share the id 'a': keep the extension for those only.
        ids = [r if s in clash else s for r, s in zip(rel, stems)]
        paths = dict(sorted(zip(ids, files)))
        super().__init__(cfg, root=str(root), split=split, paths=paths, class_names=["background"])


@_register
class VOCDataset(Dataset):
    """PASCAL VOC 2012 segmentation (optionally SBD-augmented: SegmentationClassAug/)."""

    name = "voc"
    LAYOUT = ("expected the PASCAL VOC 2012 layout (VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, "
              "ImageSets/Segmentation}), pass DATA=path/to/VOC2012")  # fmt: skip

    def __init__(self, cfg: DatasetConfig):
        given = _require_root(self.name, cfg.root, self.LAYOUT)
        candidates = [given, given / "VOC2012", given / "VOCdevkit" / "VOC2012"]
        root = next((c for c in candidates if (c / "JPEGImages").is_dir()), None)
        if root is None:
            raise FileNotFoundError(f"no JPEGImages/ under {given}: {self.LAYOUT}")
        sets = root / "ImageSets" / "Segmentation"
        available = sorted(p.stem for p in sets.glob("*.txt"))
        if not available:
            raise FileNotFoundError(f"no split files {sets}/*.txt: {self.LAYOUT}")
        split = cfg.split or "val"
        _check_split(self.name, split, available)
        lines = (sets / f"{split}.txt").read_text().split("\n")
        ids = [ln.split()[0] for ln in lines if ln.strip()]
        paths = {i: root / "JPEGImages" / f"{i}.jpg" for i in ids}
        super().__init__(cfg, root=str(root), split=split, paths=paths, class_names=list(VOC_CLASSES))

    def mask_path(self, id: str) -> Path | None:
        """SegmentationClassAug (SBD, grayscale) if present for the id, else SegmentationClass."""
        self.image_path(id)
        for sub in ("SegmentationClassAug", "SegmentationClass"):
            p = Path(self.root, sub, f"{id}.png")
            if p.is_file():
                return p
        return None

    def load_mask(self, id: str) -> np.ndarray | None:
        p = self.mask_path(id)
        return None if p is None else _read_label_png(p)


@_register
class COCODataset(Dataset):
    """COCO 2014/2017 instances turned into semantic masks (labels 1..80, crowd = 255).

    Overlap rule: crowd regions are painted first as 255 (ignore), then the
    non-crowd instances in order of decreasing annotated area (ties: annotation
    id), so a smaller object lying on a larger one stays visible and a real
    instance inside a crowd region keeps its label.
    """

    name = "coco"
    LAYOUT = ("expected the COCO layout (val2017/, train2017/ or *2014/, annotations/instances_<split>.json), "
              "pass DATA=path/to/coco")  # fmt: skip

    def __init__(self, cfg: DatasetConfig):
        from pycocotools.coco import COCO

        root = _require_root(self.name, cfg.root, self.LAYOUT)
        ann_dir = root / "annotations"
        available = sorted(p.stem.removeprefix("instances_") for p in ann_dir.glob("instances_*.json"))
        if not available:
            raise FileNotFoundError(f"no annotations/instances_*.json under {root}: {self.LAYOUT}")
        split = cfg.split or "val"
        if split in ("train", "val"):  # year-less name -> the year present, 2017 first
            split = next((f"{split}{y}" for y in (2017, 2014) if f"{split}{y}" in available), split)
        _check_split(self.name, split, available)
        if not (root / split).is_dir():
            raise FileNotFoundError(f"no {split}/ image directory under {root}: {self.LAYOUT}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(ann_dir / f"instances_{split}.json"))
        cat_ids = sorted(self.coco.getCatIds())
        if len(cat_ids) > 254:
            raise ValueError(f"{len(cat_ids)} categories do not fit uint8 labels 1..254")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        names = ["background"] + [self.coco.cats[c]["name"] for c in cat_ids]
        paths = {str(i): root / split / self.coco.imgs[i]["file_name"] for i in sorted(self.coco.imgs)}
        super().__init__(cfg, root=str(root), split=split, paths=paths, class_names=names)

    def load_mask(self, id: str) -> np.ndarray:
        self.image_path(id)
        info = self.coco.imgs[int(id)]
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[int(id)], iscrowd=None))
        for a in [a for a in anns if a.get("iscrowd", 0)]:
            mask[self.coco.annToMask(a) > 0] = 255
        for a in sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: (-a["area"], a["id"])):
            mask[self.coco.annToMask(a) > 0] = self.cat_to_label[a["category_id"]]
        return mask
