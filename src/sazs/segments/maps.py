"""Segment maps from eigenvectors, ground-truth free: a partition of the image into segments.

Spectral clustering proper (Ng, Jordan & Weiss 2001; Shi & Malik's multiway cut): every patch
is the row of the first eigenvectors [v1..vk] (a point in R^k where patches of one region
sit together), the rows are clustered by k-means, and each cluster's connected components
become the segments; components smaller than ``min_size`` of the grid are merged into the
neighbour they share the longest border with (a stray patch is noise, not a segment).

    segment_grid(eigvecs, eigvals, cfg) -> (h, w) int labels 0..n-1 on the patch grid
    segment_pixels(eigvecs, eigvals, size, cfg, image=None, refine=None) -> (H, W) labels
    prior_segments(prior, cfg) / segment_map(store, id_, cfg) -> (H, W) labels at the image's size
    encode_png(labels) -> PNG bytes (mode L, or I;16 above 256 segments)

Why not the signs of v1..v4 (:func:`sazs.stores.preview.segment_labels`): background patches
sit at values near 0 with an arbitrary sign, so the sign cells cut flat regions in two at
random; k-means puts a boundary only where the rows are far apart.

The store holds u (orthonormal eigenvectors of the normalised adjacency); its rows are
scaled by ``scale``: "none" keeps u, "degree" divides by u0 (the generalised v = D^-1/2 u,
u0 being proportional to sqrt(degree): every patch weighs the same), "normalise" makes every
row unit length (Ng-Jordan-Weiss). The number of clusters is ``num_segments`` (fixed) or,
with ``num_segments=None``, chosen by the eigengap among 2..``max_segments``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from .refine import check_refine, refine_labels

SCALES = ("none", "degree", "normalise")


@dataclass(frozen=True)
class SegmentConfig:
    num_vectors: int = 7  # non-trivial vectors v1..v_n whose rows are clustered (at most K - 1)
    num_segments: int | None = 5  # k-means clusters; None: by the eigengap (2..max_segments)
    max_segments: int = 8
    scale: str = "degree"
    # vector k weighs (lam_1 / lam_k)^eigval_power * (mu_k / mu_1)^adjacency_power, with lam the
    # Laplacian's eigenvalues and mu = 1 - lam the normalised adjacency's: the higher vectors,
    # less tied to the graph's structure, count less. On a kNN graph alone the lam are small
    # and spread (the first factor acts); with the global term every lam is near 1 (the second
    # acts). 0 and 0: all vectors alike.
    eigval_power: float = 1.0
    adjacency_power: float = 2.0
    min_size: float = 0.02  # components below this share of the grid's cells are merged
    seed: int = 0  # k-means++ seeding (deterministic)
    restarts: int = 4  # k-means runs, the one of least inertia is kept

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"unknown row scaling {self.scale!r}; choose from {list(SCALES)}")
        if self.num_vectors < 1:
            raise ValueError(f"num_vectors must be >= 1, got {self.num_vectors}")
        if self.num_segments is not None and self.num_segments < 1:
            raise ValueError(f"num_segments must be >= 1 (or None: eigengap), got {self.num_segments}")
        if self.max_segments < 2 or not 0 <= self.min_size < 1 or self.restarts < 1:
            raise ValueError(f"max_segments >= 2, min_size in [0, 1), restarts >= 1; got {self}")


def eigengap_k(eigvals: np.ndarray, max_k: int) -> int:
    """k in 2..max_k with the widest gap eigvals[k] - eigvals[k-1] (eigvals ascending, eigvals[0] trivial)."""
    lam = np.asarray(eigvals, np.float64)
    top = min(max_k, len(lam) - 1)
    if top < 2:
        return max(1, top)
    gaps = lam[2 : top + 1] - lam[1:top]  # gaps[i] = lam[i+2] - lam[i+1] -> k = i + 2
    return int(np.argmax(gaps)) + 2


def _rows(eigvecs: np.ndarray, n: int, scale: str) -> np.ndarray:
    """(K, h, w) -> (h*w, n) the rows of [v1..vn], scaled."""
    vecs = np.asarray(eigvecs, np.float64)
    x = vecs[1 : 1 + n].reshape(min(n, len(vecs) - 1), -1).T
    if scale == "degree":
        u0 = np.abs(vecs[0].ravel())
        x = x / np.maximum(u0, 1e-6 * max(float(u0.max()), 1e-30))[:, None]
    elif scale == "normalise":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, restarts: int = 4, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; labels (N,) of the run with least inertia.

    A few hundred to a few thousand rows in <= 8 dimensions: plain numpy, deterministic for a seed.
    """
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    best, best_inertia = np.zeros(n, np.int64), np.inf
    for _ in range(restarts):
        centres = [x[rng.integers(n)]]
        d2 = ((x - centres[0]) ** 2).sum(1)
        for _ in range(1, k):
            total = d2.sum()
            pick = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
            centres.append(x[pick])
            d2 = np.minimum(d2, ((x - x[pick]) ** 2).sum(1))
        c = np.stack(centres)
        labels = np.full(n, -1)
        for _ in range(iters):
            dist = ((x[:, None, :] - c[None]) ** 2).sum(2)
            new = dist.argmin(1)
            if (new == labels).all():
                break
            labels = new
            for j in range(k):
                if (labels == j).any():
                    c[j] = x[labels == j].mean(0)
        inertia = float(((x - c[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def merge_small(labels: np.ndarray, min_cells: int) -> np.ndarray:
    """Split ``labels`` (h, w) into 4-connected components, merge those under ``min_cells`` cells
    into the neighbour they share the longest border with (smallest first); relabel 0..n-1."""
    comp = np.zeros(labels.shape, np.int64)
    n = 0
    for value in np.unique(labels):
        lab, count = ndimage.label(labels == value)
        comp[lab > 0] = lab[lab > 0] + n
        n += count
    comp -= 1
    while True:
        sizes = np.bincount(comp.ravel(), minlength=n)
        small = [c for c in np.argsort(sizes) if 0 < sizes[c] < min_cells]
        if not small or (sizes > 0).sum() == 1:
            break
        c = small[0]
        # border counts with the 4-neighbours of the component
        pairs = np.concatenate(
            [
                np.stack([comp[:, :-1].ravel(), comp[:, 1:].ravel()], 1),
                np.stack([comp[:-1, :].ravel(), comp[1:, :].ravel()], 1),
            ]
        )
        touch = pairs[(pairs[:, 0] == c) ^ (pairs[:, 1] == c)]
        other = np.where(touch[:, 0] == c, touch[:, 1], touch[:, 0])
        if not len(other):
            break
        comp[comp == c] = np.bincount(other).argmax()
    _, out = np.unique(comp, return_inverse=True)
    return out.reshape(labels.shape)


def segment_grid(
    eigvecs: np.ndarray, eigvals: np.ndarray | None = None, cfg: SegmentConfig = SegmentConfig()
) -> np.ndarray:
    """Eigenvectors (K, h, w) on the patch grid -> segment labels (h, w) int64, 0..n-1."""
    eigvecs = np.asarray(eigvecs)
    if eigvecs.ndim != 3 or eigvecs.shape[0] < 2:
        raise ValueError(f"eigvecs must be (K >= 2, h, w), got shape {eigvecs.shape}")
    h, w = eigvecs.shape[1:]
    if cfg.num_segments is None:
        if eigvals is None:
            raise ValueError("num_segments=None chooses k by the eigengap: pass the eigenvalues")
        k = eigengap_k(eigvals, cfg.max_segments)
    else:
        k = cfg.num_segments
    x = _rows(eigvecs, cfg.num_vectors, cfg.scale)
    if eigvals is not None and (cfg.eigval_power or cfg.adjacency_power):
        lam = np.clip(np.asarray(eigvals, np.float64)[1 : 1 + x.shape[1]], 1e-9, None)
        mu = np.clip(1 - lam, 1e-9, None)
        x = x * (lam[0] / lam) ** cfg.eigval_power * (mu / mu[0]) ** cfg.adjacency_power
    labels = kmeans(x, k, seed=cfg.seed, restarts=cfg.restarts)
    return merge_small(labels.reshape(h, w), max(1, round(cfg.min_size * h * w)))


def labels_to_pixels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Grid labels (h, w) -> (H, W): each segment's indicator upsampled bilinearly (cell centres on
    pixel centres, as the eigenvectors are), argmax per pixel: borders run between patch centres."""
    n = int(labels.max()) + 1
    onehot = torch.from_numpy(np.ascontiguousarray(labels))[None].long()
    onehot = F.one_hot(onehot, n).permute(0, 3, 1, 2).float()
    up = F.interpolate(onehot, size=tuple(size), mode="bilinear", align_corners=False)[0]
    return up.argmax(0).numpy()


def segment_pixels(
    eigvecs: np.ndarray,
    eigvals: np.ndarray | None,
    size: tuple[int, int],
    cfg: SegmentConfig = SegmentConfig(),
    *,
    image: np.ndarray | None = None,
    refine: str | None = None,
) -> np.ndarray:
    """Eigenvectors (K, h, w) -> segment labels (H, W) = ``size`` int64, 0..n-1.

    ``refine`` (a name of :func:`sazs.segments.refine.list_refiners`) moves the borders onto the
    edges of ``image`` (H, W, 3) uint8; a segment that the refinement empties is dropped and
    the labels are renumbered.
    """
    grid = segment_grid(eigvecs, eigvals, cfg)
    if check_refine(refine) is None:
        return labels_to_pixels(grid, size)
    if image is None:
        raise ValueError(f"refine={refine!r} needs the image the eigenvectors belong to")
    if tuple(image.shape[:2]) != tuple(size):
        raise ValueError(f"image {image.shape[:2]} is not of the requested size {tuple(size)}")
    out = refine_labels(grid, image, refine, grid=grid.shape)
    _, out = np.unique(out, return_inverse=True)
    return out.reshape(size)


def prior_segments(prior, cfg: SegmentConfig = SegmentConfig(), *, image=None, refine=None) -> np.ndarray:
    """The segment map (H, W) of one image's priors (anything with ``eigvecs``, ``eigvals`` and
    ``image_size``, as :class:`sazs.stores.reader.Prior`) at the image's original size."""
    h, w = (int(s) for s in prior.image_size)
    if h < 1 or w < 1:
        raise ValueError(f"its image size {h}x{w} is unknown")
    return segment_pixels(prior.eigvecs, prior.eigvals, (h, w), cfg, image=image, refine=refine)


def segment_map(store, id_: str, cfg: SegmentConfig = SegmentConfig(), *, image=None, refine=None) -> np.ndarray:
    """The segment map (H, W) of image ``id_`` of an open store (``store.get(id_)`` gives its
    priors, as :meth:`sazs.stores.reader.PriorStore.get`), at the image's original size."""
    return prior_segments(store.get(id_), cfg, image=image, refine=refine)


def encode_png(labels: np.ndarray) -> bytes:
    """A label map (H, W) as PNG bytes: mode L (8-bit) up to 256 segments, else I;16 (16-bit)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0 or labels.min() < 0:
        raise ValueError(f"a label map is (H, W) non-negative integers, got shape {labels.shape}")
    top = int(labels.max())
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"{top + 1} segments do not fit a 16-bit PNG")
    if top <= 255:
        img = Image.fromarray(labels.astype(np.uint8), mode="L")
    else:
        img = Image.fromarray(labels.astype(np.uint16))  # Pillow maps uint16 to I;16
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
