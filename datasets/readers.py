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
import json
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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Largest image decoded, in pixels (H x W), checked from the header before decoding.
# Pillow's own decompression-bomb limit (~179 MP) still lets a 13000x13000 PNG through,
# which takes ~5 GB to decode; every extractor resizes to a short side of a few hundred
# pixels anyway. Raise it per job with `sazs-priors run --max-megapixels`.
MAX_PIXELS = 40_000_000
# Split list files (VOC ImageSets) larger than this are refused: the biggest real one
# (SBD trainaug, 10,582 ids) is ~130 KB.
MAX_LIST_BYTES = 16 << 20

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
    max_pixels: int = MAX_PIXELS  # reject (before decoding) images with more pixels than this

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all images), got {self.limit}")
        if self.min_side < 1 or self.max_pixels < 1:
            raise ValueError(f"min_side and max_pixels must be >= 1, got {self.min_side} and {self.max_pixels}")


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


def _check_path(path: Path, root: str | os.PathLike | None) -> None:
    """Refuse a file name no store can hold, and a path that leaves the dataset's root.

    A name that is not valid UTF-8 reaches Python with surrogate escapes (os.walk); it
    cannot be written to a store, a manifest or a log line, so it is named by the repr
    of its bytes. The root check is lexical: a '..' component or an absolute path in a
    list file or annotation that leads out of ``root`` is refused; symlinks inside the
    root are followed (datasets often link their image folder to shared storage).
    """
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        name = repr(os.fsencode(path))
        raise ImageError(f"file name is not valid UTF-8: {name}; rename the file", name) from None
    if root is not None:
        base = os.path.normpath(os.path.abspath(root))
        if os.path.commonpath([base, os.path.normpath(os.path.abspath(path))]) != base:
            raise ImageError(
                f"path leaves the dataset root: {path} is outside {base}; "
                "fix the entry in the split list or annotation file",
                path,
            )


def _check_pixels(path: Path, h: int, w: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise ImageError(
            f"image too large: {path} is {h}x{w} = {h * w / 1e6:.1f} megapixels > the limit of "
            f"{max_pixels / 1e6:g}; downscale it or raise --max-megapixels",
            path,
        )


def read_image(
    path: str | os.PathLike, min_side: int = 16, max_pixels: int = MAX_PIXELS, *, root: str | os.PathLike | None = None
) -> np.ndarray:
    """Decode ``path`` fully into an (H, W, 3) uint8 RGB array, upright per EXIF.

    Raises ImageError (with a reason naming the file) for a missing, empty,
    unrecognised, truncated, too-small or too-large image, a file name that is not
    UTF-8, and (given ``root``) a path outside ``root``. The size limits are checked on
    the header, before decoding; the full decode happens here, not lazily, so a
    truncated file fails at read time and not inside a worker.
    """
    path = Path(path)
    _check_path(path, root)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"empty file (0 bytes): {path}", path)
        with Image.open(path) as img:
            h, w = img.height, img.width
            if min(h, w) < min_side:
                raise ImageError(f"image too small: {path} is {h}x{w} < min_side {min_side}", path)
            _check_pixels(path, h, w, max_pixels)
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


def image_size(
    path: str | os.PathLike, max_pixels: int = MAX_PIXELS, *, root: str | os.PathLike | None = None
) -> tuple[int, int]:
    """(H, W) as :func:`read_image` would return it, from the header only (no decode);
    the same ImageError as read_image for a bad name or path or too many pixels."""
    path = Path(path)
    _check_path(path, root)
    try:
        with Image.open(path) as img:
            w, h = img.size
            _check_pixels(path, h, w, max_pixels)
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}", path) from None
    except UnidentifiedImageError:
        raise ImageError(f"not a recognised image format: {path}", path) from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"refusing decompression bomb {path}: {_one_line(err)}", path) from None
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


def _read_list(path: Path) -> list[str]:
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


def _check_split(name: str, split: str, available: list[str]) -> None:
    if split not in available:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; available: {sorted(available)}")


def _require_root(name: str, root: str | None, hint: str) -> Path:
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


def folder_ids(rel_paths: list[str]) -> list[str]:
    """Ids of the files at ``rel_paths`` (relative POSIX paths), in the same order.

    An id is the path without its extension; files whose ids would be equal all keep
    their extension instead, repeated until every id is distinct, so no file is dropped
    and the rule does not depend on the listing order: ``a.jpg, a.png, a.png.jpg, b.png``
    -> ``a.jpg, a.png, a.png.jpg, b``. A path that is not valid UTF-8 (surrogate escapes
    from os.walk) keeps its extension with the undecodable bytes written as ``\\xNN``;
    its image is recorded as failed when read (see read_image).
    """
    full = [os.fsencode(r).decode("utf-8", "backslashreplace") for r in rel_paths]
    ids = [f.rsplit(".", 1)[0] if f == r else f for f, r in zip(full, rel_paths)]
    while True:
        counts = Counter(ids)
        clash = [j for j, i in enumerate(ids) if counts[i] > 1 and i != full[j]]
        if not clash:
            break
        for j in clash:
            ids[j] = full[j]
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:  # only names that differ in undecodable bytes vs. literal backslash escapes
        raise ValueError(f"image files with the same id {dupes[0]!r} (one name is not valid UTF-8); rename one")
    return ids


@_register
class FolderDataset(Dataset):
    """Every image under a directory, recursively; ids: see :func:`folder_ids`."""

    name = "folder"

    def __init__(self, cfg: DatasetConfig):
        root = _require_root(self.name, cfg.root, "pass DATA=path/to/images (searched recursively)")
        split = cfg.split or "all"
        _check_split(self.name, split, ["all"])
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune hidden dirs
            files += [
                Path(dirpath, f)
                for f in filenames
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
            ]
        if not files:
            raise FileNotFoundError(f"no images under {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        ids = folder_ids([f.relative_to(root).as_posix() for f in files])
        paths = dict(sorted(zip(ids, files)))
        super().__init__(cfg, root=str(root), split=split, paths=paths, class_names=["background"])


@_register
class VOCDataset(Dataset):
    """PASCAL VOC 2012 segmentation (optionally SBD-augmented: SegmentationClassAug/)."""

    name = "voc"
    LAYOUT = (
        "expected the PASCAL VOC 2012 layout (VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, "
        "ImageSets/Segmentation}), pass DATA=path/to/VOC2012"
    )

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
        ids = _read_list(sets / f"{split}.txt")
        paths = {i: root / "JPEGImages" / f"{i}.jpg" for i in ids}
        super().__init__(
            cfg, root=str(root), split=split, paths=paths, class_names=list(VOC_CLASSES), image_root=root / "JPEGImages"
        )

    def mask_path(self, id: str) -> Path | None:
        """SegmentationClassAug (SBD, grayscale) if present for the id, else SegmentationClass."""
        self.image_path(id)
        for sub in ("SegmentationClassAug", "SegmentationClass"):
            p = Path(self.root, sub, f"{id}.png")
            _check_path(p, Path(self.root, sub))  # an id with '..' must not reach outside
            if p.is_file():
                return p
        return None

    def load_mask(self, id: str) -> np.ndarray | None:
        p = self.mask_path(id)
        return None if p is None else _read_label_png(p)


def _coco_problem(data) -> str | None:
    """What makes ``data`` unusable as COCO instances (None if nothing): the fields that
    pycocotools' index and this module read, with the index of the first bad record."""
    if not isinstance(data, dict):
        return f"the top level is a JSON {type(data).__name__}, not an object"
    required = {
        "images": {"id": int, "file_name": str},
        "categories": {"id": int, "name": str},
        "annotations": {"id": int, "image_id": int, "category_id": int},
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
                    return f"{key}[{j}] has no {kind.__name__} '{name}' (got {value!r:.40})"
    return None


def _load_coco(path: Path):
    """pycocotools' index of an instances JSON; a malformed file is a one-line ValueError."""
    from pycocotools.coco import COCO

    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"annotation file {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
            f"{err.msg}); re-download or regenerate it"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"annotation file {path} is not UTF-8 JSON (byte {err.start}: {err.reason})") from None
    problem = _coco_problem(data)
    if problem:
        raise ValueError(f"annotation file {path}: {problem}; expected COCO instances JSON")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


@_register
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
        self.coco = _load_coco(ann_dir / f"instances_{split}.json")
        cat_ids = sorted(self.coco.getCatIds())
        if len(cat_ids) > 254:
            raise ValueError(f"{len(cat_ids)} categories do not fit uint8 labels 1..254")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        names = ["background"] + [self.coco.cats[c]["name"] for c in cat_ids]
        paths = {str(i): root / split / self.coco.imgs[i]["file_name"] for i in sorted(self.coco.imgs)}
        super().__init__(cfg, root=str(root), split=split, paths=paths, class_names=names, image_root=root / split)

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


# ----------------------------------------------------------------------------- mask layouts (DAVIS, SOD, CamVid)


def _read_mask(path: Path, image_path: Path, *, labels: bool) -> np.ndarray:
    """A mask file as a 2-D uint8 array the size of its image; ImageError (naming the file) otherwise.

    ``labels``: class indices, decoded raw (palette or grayscale PNG, never through RGB).
    Otherwise any grayscale, palette, bilevel or colour encoding of a binary mask is
    accepted and returned as stored (colour through luminance, 16-bit scaled to 8 bits).
    """
    if not path.is_file():
        raise ImageError(f"mask not found: {path} (for image {image_path})", path)
    if labels:
        a = _read_label_png(path)
    else:
        try:
            with Image.open(path) as img:
                if img.mode == "1":
                    a = np.array(img, dtype=np.uint8) * 255
                elif img.mode.startswith("I") or img.mode == "F":
                    a = _gray_to_uint8(np.array(img), img.mode)
                elif img.mode in ("L", "P"):
                    a = np.array(img, dtype=np.uint8)
                else:
                    a = np.array(img.convert("L"), dtype=np.uint8)
        except UnidentifiedImageError:
            raise ImageError(f"not a recognised image format: {path}", path) from None
        except _DECODE_ERRORS as err:
            raise ImageError(f"cannot decode mask {path}: {_one_line(err)}", path) from None
    if a.ndim != 2:
        raise ImageError(f"mask {path} has shape {a.shape}; expected a single-channel (H, W) image", path)
    hw = image_size(image_path)
    if a.shape != hw:
        raise ImageError(
            f"mask {path} is {a.shape[0]}x{a.shape[1]} but its image {image_path} is {hw[0]}x{hw[1]}", path
        )
    return a


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """Image files directly in ``folder`` by id: the stem, or the file name where two files share a stem."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    clash = {s for s, n in Counter(p.stem for p in files).items() if n > 1}
    return {(p.name if p.stem in clash else p.stem): p for p in files}


@_register
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
        root = _require_root(self.name, cfg.root, self.LAYOUT)
        res = next((r for r in ("480p", "Full-Resolution") if (root / "JPEGImages" / r).is_dir()), None)
        if res is None:
            raise FileNotFoundError(f"no JPEGImages/480p/ under {root}: {self.LAYOUT}")
        frames_dir = root / "JPEGImages" / res
        present = sorted(p.name for p in frames_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        lists = next((d for d in (root / "ImageSets" / "2016", root / "ImageSets" / res) if d.is_dir()), None)
        listed = {p.stem: p for p in lists.glob("*.txt")} if lists else {}
        split = cfg.split or ("val" if "val" in listed else "all")
        _check_split(self.name, split, ["all", *listed])
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
        return (_read_mask(self.mask_path(id), self.image_path(id), labels=False) != 0).astype(np.uint8)


IMAGE_DIR_NAMES = (
    "images",
    "image",
    "imgs",
    "img",
    "im",
    "jpegimages",
    "duts-te-image",
    "duts-tr-image",
    "dut-omron-image",
    "ecssd-image",
)
MASK_DIR_NAMES = (
    "masks",
    "mask",
    "gt",
    "gts",
    "ground_truth",
    "ground_truth_mask",
    "groundtruth",
    "annotations",
    "duts-te-mask",
    "duts-tr-mask",
    "pixelwisegt-new-png",
    "ecssd-mask",
)


def _find_dir(root: Path, names: tuple[str, ...], suffixes: tuple[str, ...], what: str, flag: str) -> Path:
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    found = [d for d in subdirs if d.name.lower() in names]
    found = found or [d for d in subdirs if d.name.lower().endswith(suffixes)]
    if len(found) != 1:
        why = "no" if not found else f"{len(found)} candidate ({', '.join(d.name for d in found)})"
        raise FileNotFoundError(
            f"{why} {what} folder under {root} (looked for {', '.join(names[:6])}, ...); name it with {flag}"
        )
    return found[0]


@_register
class MasksDataset(Dataset):
    """Salient-object layout (ECSSD, DUTS-TE, DUT-OMRON, ...): an image folder and a mask folder, same stems.

    The folders are found under the root by their usual names (images|Image|imgs|DUTS-TE-Image
    ... and masks|GT|ground_truth_mask|DUTS-TE-Mask ..., or any name ending in -image / -mask),
    or given as ``images_dir`` / ``masks_dir`` (absolute, or relative to the root; the
    ``sazs-eval priors --images-dir/--masks-dir`` flags). Ids: the image stems, sorted. Masks are
    binary: 0/1 masks as they are, 0..255 masks thresholded at 128 (JPEG-compressed masks
    carry noise around both values); ``load_mask`` gives 0 / 1.
    """

    name = "masks"
    LAYOUT = "expected an image folder and a mask folder with matching file names, pass DATA=path/to/dataset"

    def __init__(self, cfg: DatasetConfig, *, images_dir: str | None = None, masks_dir: str | None = None):
        root = _require_root(self.name, cfg.root, self.LAYOUT)
        pick = lambda given: given if Path(given).is_absolute() else root / given  # noqa: E731
        images = (
            Path(pick(images_dir))
            if images_dir
            else _find_dir(root, IMAGE_DIR_NAMES, ("-image", "_image", "-images", "_images"), "image", "--images-dir")
        )
        masks = (
            Path(pick(masks_dir))
            if masks_dir
            else _find_dir(
                root, MASK_DIR_NAMES, ("-mask", "_mask", "-masks", "_masks", "-gt", "_gt"), "mask", "--masks-dir"
            )
        )
        for d, flag in ((images, "--images-dir"), (masks, "--masks-dir")):
            if not d.is_dir():
                raise FileNotFoundError(f"{d} is not a directory; fix {flag}")
        split = cfg.split or "all"
        _check_split(self.name, split, ["all"])
        paths = _files_by_stem(images)
        if not paths:
            raise FileNotFoundError(f"no images in {images} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        by_stem = _files_by_stem(masks)
        self.images_dir, self.masks_dir = images, masks
        # a mask file per image stem, PNG first (a folder may hold both a .png and a .jpg mask)
        self._masks = {}
        for p in sorted(by_stem.values(), key=lambda p: p.suffix.lower() != ".png"):
            self._masks.setdefault(p.stem, p)
        super().__init__(cfg, root=str(root), split=split, paths=paths, class_names=["background", "object"])

    def mask_path(self, id: str) -> Path:
        image = self.image_path(id)
        return self._masks.get(image.stem, self.masks_dir / f"{image.stem}.png")

    def load_mask(self, id: str) -> np.ndarray:
        a = _read_mask(self.mask_path(id), self.image_path(id), labels=False)
        return (a > 0 if a.max() <= 1 else a >= 128).astype(np.uint8)


CAMVID_CLASSES = [
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
]


@_register
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
        import json

        root = _require_root(self.name, cfg.root, self.LAYOUT)
        available = [s for s in ("train", "val", "test") if (root / s).is_dir() and (root / f"{s}annot").is_dir()]
        if not available:
            raise FileNotFoundError(f"no train/ + trainannot/ (or val, test) folders under {root}: {self.LAYOUT}")
        split = cfg.split or "val"
        _check_split(self.name, split, available)
        names, self.unlabelled = list(CAMVID_CLASSES), 11
        meta = root / "classes.json"
        if meta.is_file():
            info = json.loads(meta.read_text())
            names = [str(n) for n in info.get("classes", names)]
            self.unlabelled = int(info.get("ignore_index", info.get("unlabelled", 11)))
        self.annot_dir = root / f"{split}annot"
        paths = _files_by_stem(root / split)
        if not paths:
            raise FileNotFoundError(f"no images in {root / split}: {self.LAYOUT}")
        super().__init__(cfg, root=str(root), split=split, paths=paths, class_names=names)

    def mask_path(self, id: str) -> Path:
        return self.annot_dir / self.image_path(id).name

    def load_mask(self, id: str) -> np.ndarray:
        path = self.mask_path(id)
        a = _read_mask(path, self.image_path(id), labels=True)
        out = np.where(a == self.unlabelled, 255, a).astype(np.uint8)
        bad = np.unique(out[(out >= len(self.class_names)) & (out != 255)])
        if bad.size:
            raise ImageError(
                f"mask {path} has label values {bad.tolist()[:5]} outside 0..{len(self.class_names) - 1} "
                f"and {self.unlabelled} (unlabelled)",
                path,
            )
        return out
