"""Readers for image folders: the offline sample photographs, any folder of images, and image + mask folders.

``sample`` (a few photographs from the scikit-image wheel), ``folder`` (every image
under a directory, recursively; no masks) and ``masks`` (the salient-object layout:
an image folder and a mask folder with matching names, binary masks).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from .base import Dataset, DatasetConfig, check_split, files_by_stem, require_root
from .images import IMAGE_EXTENSIONS, read_mask

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


class SampleDataset(Dataset):
    """A few real photographs for smoke runs, from the scikit-image wheel (offline)."""

    name = "sample"

    def __init__(self, cfg: DatasetConfig):
        import skimage.data

        data_dir = Path(skimage.data.__file__).parent
        split = cfg.split or "all"
        check_split(self.name, split, ["all"])
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


class FolderDataset(Dataset):
    """Every image under a directory, recursively; ids: see :func:`folder_ids`."""

    name = "folder"

    def __init__(self, cfg: DatasetConfig):
        root = require_root(self.name, cfg.root, "pass DATA=path/to/images (searched recursively)")
        split = cfg.split or "all"
        check_split(self.name, split, ["all"])
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
        root = require_root(self.name, cfg.root, self.LAYOUT)
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
        check_split(self.name, split, ["all"])
        paths = files_by_stem(images)
        if not paths:
            raise FileNotFoundError(f"no images in {images} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        by_stem = files_by_stem(masks)
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
        a = read_mask(self.mask_path(id), self.image_path(id), labels=False)
        return (a > 0 if a.max() <= 1 else a >= 128).astype(np.uint8)
