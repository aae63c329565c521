"""Painted scenes for the synthetic datasets: textured backgrounds with 1-3 class-coloured shapes.

Each shape's colour and texture depend only on its class, so both colour features and a
ViT can tell the classes apart; the label map is rasterised from the same polygons that
paint the image (with the rasteriser ``COCO.annToMask`` uses), so they match pixel for
pixel. Everything is drawn from the caller's random generator: a seed fixes every pixel.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage


def class_color(label: int) -> np.ndarray:
    """Mean RGB colour (3,) uint8 of class ``label`` (1-based) in generated images.

    Hues step by a low-discrepancy constant and saturation/value alternate, chosen so
    the 20 VOC classes are >= 59 apart in L1; values stay in [40, 215] so the
    zero-mean texture never clips and the region mean stays at this colour.
    """
    hue = (label * 0.569840291) % 1.0
    sat = (0.95, 0.6)[label % 2]
    val = (0.95, 0.6, 0.8)[label % 3]
    rgb = np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 175 + 40
    return np.round(rgb).astype(np.uint8)


def _texture(label: int, h: int, w: int) -> np.ndarray:
    """Zero-mean (h, w) pattern in [-1, 1] whose kind, period and angle depend on the class."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    period = 5 + label % 7
    angle = math.radians((label * 37) % 180)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
    kind = label % 3
    if kind == 0:  # stripes
        return np.sin(t)
    if kind == 1:  # checker
        return np.sign(np.sin(t) * np.sin((-xx * math.sin(angle) + yy * math.cos(angle)) * 2 * math.pi / period))
    return np.sin(t) * np.cos(yy * 2 * math.pi / (period + 3))  # weave


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-saturation colour with smooth blotches and fine grain, unlike any class colour."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), 0.15 * rng.random(), 0.35 + 0.4 * rng.random())) * 255
    coarse = rng.normal(size=(4, 5, 3))
    smooth = ndimage.zoom(coarse, (h / 4, w / 5, 1), order=1)[:h, :w]
    return base + 18 * smooth + rng.normal(0, 6, size=(h, w, 3))


def _shape_polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float) -> list[float]:
    """Ellipse, rotated rectangle, triangle or irregular polygon as flat [x0, y0, x1, ...]."""
    kind = rng.integers(4)
    rot = rng.uniform(0, 2 * math.pi) if kind else rng.uniform(-0.3, 0.3)
    if kind == 0:  # rectangle (near axis-aligned)
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        radius = np.full(4, math.sqrt(2) * 0.75)
    elif kind == 1:  # ellipse
        angles, radius = np.linspace(0, 2 * math.pi, 48, endpoint=False), np.ones(48)
    elif kind == 2:  # triangle
        angles, radius = np.array([0, 2, 4]) * math.pi / 3 + rng.uniform(-0.3, 0.3, 3), np.ones(3)
    else:  # irregular polygon
        n = int(rng.integers(5, 8))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radius = rng.uniform(0.65, 1.0, n)
    x = radius * np.cos(angles) * rx
    y = radius * np.sin(angles) * ry
    px = cx + x * math.cos(rot) - y * math.sin(rot)
    py = cy + x * math.sin(rot) + y * math.cos(rot)
    return np.round(np.stack([px, py], 1).ravel(), 2).tolist()


def _rasterize(poly: list[float], h: int, w: int) -> dict:
    """COCO RLE of a polygon: the same rasteriser that ``COCO.annToMask`` uses."""
    return mask_utils.frPyObjects([poly], h, w)[0]


def _image_size(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    h += int(rng.integers(-(h // 8), h // 8 + 1))
    w += int(rng.integers(-(w // 8), w // 8 + 1))
    return (w, h) if rng.random() < 1 / 3 else (h, w)  # a third are the other orientation


def class_plan(rng: np.random.Generator, n_images: int, num_classes: int) -> list[list[int]]:
    """1-3 distinct labels per image, round-robin over a shuffled class order.

    Images take extra shapes while classes remain uncovered, so every class
    appears at least once whenever 3 * n_images >= num_classes.
    """
    order = rng.permutation(num_classes) + 1
    plan, k = [], 0
    for i in range(n_images):
        need = math.ceil(max(num_classes - k, 0) / (n_images - i))
        n = min(3, max(int(rng.integers(1, 4)), need))
        plan.append([int(order[(k + j) % num_classes]) for j in range(n)])
        k += n
    return plan


def scene(rng: np.random.Generator, size: tuple[int, int], labels: list[int], crowd_label: int | None = None):
    """Paint one image; returns (rgb uint8, label map, instances, crowd mask or None).

    Shapes sit in separate cells along the long side (so none is hidden) and are
    painted in decreasing area, the order the COCO reader uses for overlaps.
    """
    h, w = _image_size(rng, size)
    img = _background(rng, h, w)
    lab = np.zeros((h, w), np.uint8)
    n = len(labels)
    crowd = None
    if crowd_label is not None:  # a cluster of blobs in the bottom-left corner
        yy, xx = np.mgrid[0:h, 0:w]
        crowd = np.zeros((h, w), bool)
        for _ in range(5):
            cy, cx, r = h * rng.uniform(0.75, 0.95), w * rng.uniform(0.02, 0.3), min(h, w) * rng.uniform(0.05, 0.1)
            crowd |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[crowd] = (class_color(crowd_label) + 30 * _texture(crowd_label, h, w)[..., None])[crowd]
    instances = []
    for j, label in enumerate(labels):
        if w >= h:
            cw, ch, cx, cy = w / n, h, (j + 0.5) * w / n, h / 2
        else:
            cw, ch, cx, cy = w, h / n, w / 2, (j + 0.5) * h / n
        cx += rng.uniform(-0.05, 0.05) * cw
        cy += rng.uniform(-0.05, 0.05) * ch
        rx, ry = cw * rng.uniform(0.25, 0.5), ch * rng.uniform(0.25, 0.42)
        poly = _shape_polygon(rng, cx, cy, rx, ry)
        poly = np.clip(np.reshape(poly, (-1, 2)), 0, [w - 1, h - 1]).ravel().tolist()
        rle = _rasterize(poly, h, w)
        instances.append({"label": label, "poly": poly, "rle": rle, "area": int(mask_utils.area(rle))})
    instances.sort(key=lambda d: -d["area"])  # stable: equal areas keep generation order
    for inst in instances:
        m = mask_utils.decode(inst["rle"]).astype(bool)
        img[m] = (class_color(inst["label"]) + 30 * _texture(inst["label"], h, w)[..., None])[m]
        lab[m] = inst["label"]
    return np.clip(np.round(img), 0, 255).astype(np.uint8), lab, instances, crowd
