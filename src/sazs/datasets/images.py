"""Decoding one image or mask file: RGB uint8 pixels, header sizes, and the checks done first.

Decoding is centralised in :func:`read_image` so that every odd file a real dataset
contains (CMYK, 16-bit, alpha, EXIF-rotated, truncated) is handled once, and a broken
file becomes an :class:`ImageError` with a short reason that the pipeline records as a
failed image instead of crashing a long job. The size limits (``min_side``,
``MAX_PIXELS``) are checked on the header, and a file name that is not UTF-8 or a path
that leaves the dataset's root is refused before anything is opened.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from sazs.core.limits import MAX_PIXELS  # the bound (core/limits.py); --max-megapixels per job

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


# Exceptions PIL raises for a bad file during open/decode/convert. SyntaxError and
# struct.error come from format plugins that parse broken headers and chunks.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


class ImageError(Exception):
    """An image that cannot be used; ``str(err)`` is a one-line reason naming the file."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        super().__init__(reason)
        self.reason = reason
        self.path = None if path is None else str(path)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _gray_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth grayscale to 8 bits by scaling, never by clipping.

    PIL's own ``convert('L')`` clips 16-bit data at 255, which
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


def check_path(path: Path, root: str | os.PathLike | None) -> None:
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
    check_path(path, root)
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
    check_path(path, root)
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


def read_label_png(path: Path) -> np.ndarray:
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


def read_mask(path: Path, image_path: Path, *, labels: bool) -> np.ndarray:
    """A mask file as a 2-D uint8 array the size of its image; ImageError (naming the file) otherwise.

    ``labels``: class indices, decoded raw (palette or grayscale PNG, never through RGB).
    Otherwise any grayscale, palette, bilevel or colour encoding of a binary mask is
    accepted and returned as stored (colour through luminance, 16-bit scaled to 8 bits).
    """
    if not path.is_file():
        raise ImageError(f"mask not found: {path} (for image {image_path})", path)
    if labels:
        a = read_label_png(path)
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
