"""Image files for tests: one file per awkward decoding case, and the quadrant image they are made of.

Tests import it as a plain module (``from images import write_bad_images``), like
``httpserver``: pytest puts ``tests/`` on the import path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

QUADRANT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))  # TL, TR, BL, BR


def quadrant_image(h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w, 3), np.uint8)
    out[: h // 2, : w // 2], out[: h // 2, w // 2 :] = QUADRANT_COLORS[:2]
    out[h // 2 :, : w // 2], out[h // 2 :, w // 2 :] = QUADRANT_COLORS[2:]
    return out


def write_bad_images(directory) -> dict[str, str]:
    """Write one file per awkward case; return {id: "ok" | "failed"} (id = file stem).

    Good ones decode to known content: ``quadrants`` colours are TL red, TR green,
    BL blue, BR yellow. ``exif_rot6`` stores a 32x48 quadrant image with EXIF
    orientation 6 (display = rotate 90 degrees clockwise -> 48x32); ``cmyk`` is
    the 48x64 quadrant image in CMYK; ``gray`` a horizontal ramp; ``rgba`` three
    vertical bands (opaque red, transparent with green underneath, half-transparent
    blue); ``gray16`` a 16-bit horizontal ramp 0..65535; ``palette`` a P-mode
    quadrant image. ``truncated``, ``empty``, ``text`` and ``tiny`` (4x4) fail.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    quads = quadrant_image(48, 64)
    rng = np.random.default_rng(0)
    buf = d / "truncated.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, quality=95)
    data = buf.read_bytes()
    buf.write_bytes(data[: len(data) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    Image.fromarray(quadrant_image(4, 4)).save(d / "tiny.png")
    Image.fromarray(quads).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))).save(d / "gray.png")
    rgba = np.zeros((48, 60, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)
    rgba[:, 20:40] = (0, 255, 0, 0)
    rgba[:, 40:] = (0, 0, 255, 128)
    Image.fromarray(rgba).save(d / "rgba.png")
    ramp16 = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (48, 1))
    Image.fromarray(ramp16).save(d / "gray16.png")
    Image.fromarray(quads).quantize(8).save(d / "palette.png")
    rot = Image.fromarray(quadrant_image(32, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    rot.save(d / "exif_rot6.jpg", quality=95, exif=exif.tobytes())
    failed = ("truncated", "empty", "text", "tiny")
    ok = ("cmyk", "gray", "rgba", "gray16", "palette", "exif_rot6")
    return {**{k: "failed" for k in failed}, **{k: "ok" for k in ok}}
