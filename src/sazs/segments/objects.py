"""Object masks without ground truth: the salient object(s) of an image, read from its eigenvectors.

The method (``ObjectConfig``'s defaults; chosen by measurement on DAVIS and DUTS-TE dev frames
among per-vector thresholds, spectral clustering variants, border-prior ranking and TokenCut's
seed rule: docs/BENCHMARKS.md, "Object masks"):

1. **Rows.** The non-trivial vectors v1..vn (n = 4) of the image, as Deep Spectral Methods'
   generalised vectors v_k = u_k / u_0: the store holds u, the eigenvectors of
   D^-1/2 W D^-1/2, whose trivial u_0 is proportional to sqrt(degree), so dividing by |u_0|
   gives D^-1/2 u_k up to one scale (an imported DSM store, which already holds v, has a
   constant v_0 and is unchanged). Every patch is the row (v1..vn) of its values.
2. **Clusters.** k-means (k = 4, k-means++ seeding, the best of 3 runs by inertia;
   ``scipy.cluster.vq.kmeans2``, deterministic for the seed) on those rows: spectral
   clustering proper, with background patches, whose values hover near 0 with any sign, in
   their own cluster(s) instead of split across a threshold at 0.
3. **Which clusters are the object.** The border prior of the salient-object literature: the
   background fills the frame, the object mostly does not. A cluster's relative border
   contact is (its share of the border patches) / (its share of all patches): 1 for a
   cluster spread evenly, 0 for one that never touches the border. The object is the union
   of the clusters below ``max_border_ratio`` (0.3; several objects are all kept). When none
   is, the cluster of least contact is the object if it touches the border less than an even
   spread would (ratio < 1), else the image has no object and the mask is empty.

Nothing here sees a mask. :func:`object_mask_grid` works on the patch grid;
:func:`object_mask` brings the result to the image's pixels (bilinear upsampling of the 0/1
grid mask, > 0.5; or a refiner of :mod:`sazs.segments.refine` with the image);
:func:`prior_object_mask` takes a store's ``Prior``, :func:`store_object_mask` a store and an id.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2

from .refine import check_refine, refine_mask


@dataclass(frozen=True)
class ObjectConfig:
    num_vectors: int = 4  # non-trivial eigenvectors v1..vn whose rows are clustered
    num_clusters: int = 4  # k of the k-means
    max_border_ratio: float = 0.3  # clusters touching the border less than this (relative) are object
    restarts: int = 3  # k-means runs, the one of least inertia kept
    iters: int = 30  # Lloyd iterations per run
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_vectors < 1:
            raise ValueError(f"num_vectors must be >= 1, got {self.num_vectors}")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {self.num_clusters}")
        if not 0 < self.max_border_ratio <= 1:
            raise ValueError(f"max_border_ratio must be in (0, 1], got {self.max_border_ratio}")
        if self.restarts < 1 or self.iters < 1:
            raise ValueError(f"restarts and iters must be >= 1, got {self.restarts}, {self.iters}")


def generalised_rows(eigvecs: np.ndarray, n: int) -> np.ndarray:
    """(N, n) rows of v_k = u_k / |u_0| for k = 1..n (N = h*w), scaled so the rms of |u_0| is 1."""
    u = np.asarray(eigvecs, np.float64)
    u0 = np.abs(u[0]).reshape(-1)
    scale = np.sqrt(np.mean(u0**2)) or 1.0
    return u[1 : n + 1].reshape(n, -1).T * (scale / np.maximum(u0, 1e-6 * scale))[:, None]


def cluster_rows(x: np.ndarray, k: int, *, restarts: int = 3, iters: int = 30, seed: int = 0) -> np.ndarray:
    """k-means labels (N,) of the rows of ``x`` (N, d): the best of ``restarts`` runs by inertia."""
    rng = np.random.default_rng(seed)
    best, best_inertia = np.zeros(len(x), np.int64), np.inf
    k = max(1, min(k, len(x)))
    for _ in range(restarts):
        centres, labels = kmeans2(x, k, iter=iters, minit="++", seed=rng)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels.astype(np.int64), inertia
    return best


def border_ratios(labels: np.ndarray, k: int) -> np.ndarray:
    """Per label 0..k-1 of the grid ``labels`` (h, w): share of the border cells / share of all cells."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, bool)
    edge[0] = edge[-1] = True
    edge[:, 0] = edge[:, -1] = True
    on_border = np.bincount(labels[edge], minlength=k) / edge.sum()
    overall = np.bincount(labels.ravel(), minlength=k) / labels.size
    return np.where(overall > 0, on_border / np.maximum(overall, 1e-12), np.inf)


def object_mask_grid(eigvecs: np.ndarray, cfg: ObjectConfig = ObjectConfig()) -> np.ndarray:
    """The object mask (h, w) bool on the patch grid of ``eigvecs`` (K >= 2, h, w); see the module doc."""
    eigvecs = np.asarray(eigvecs)
    if eigvecs.ndim != 3 or eigvecs.shape[0] < 2:
        raise ValueError(f"eigvecs must be (K >= 2, h, w), got shape {eigvecs.shape}")
    _, h, w = eigvecs.shape
    if h < 3 or w < 3:
        return np.zeros((h, w), bool)  # no inside: every cell is on the border
    n = min(cfg.num_vectors, eigvecs.shape[0] - 1)
    labels = cluster_rows(
        generalised_rows(eigvecs, n), cfg.num_clusters, restarts=cfg.restarts, iters=cfg.iters, seed=cfg.seed
    ).reshape(h, w)
    ratio = border_ratios(labels, cfg.num_clusters)
    chosen = ratio < cfg.max_border_ratio
    if not chosen.any() and ratio.min() < 1.0:
        chosen = ratio == ratio.min()
    return np.isin(labels, np.flatnonzero(chosen))


def to_pixels(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A grid mask (h, w) -> (H, W) bool: bilinear upsampling of 0/1 (cell centres on pixel centres), > 0.5."""
    t = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    up = F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return up[0, 0].numpy() > 0.5


def object_mask(
    eigvecs: np.ndarray,
    size: tuple[int, int],
    cfg: ObjectConfig = ObjectConfig(),
    *,
    image: np.ndarray | None = None,
    refine: str | None = None,
) -> np.ndarray:
    """The object mask (H, W) bool at the image's pixels (``size``); ``refine``: a refiner of
    :mod:`sazs.segments.refine` applied with ``image`` (H, W, 3) uint8 to the upsampled mask."""
    grid_mask = object_mask_grid(eigvecs, cfg)
    if check_refine(refine) is None:
        return to_pixels(grid_mask, size)
    if image is None:
        raise ValueError(f"refine={refine!r} needs the image (H, W, 3) uint8")
    if tuple(np.asarray(image).shape[:2]) != tuple(size):
        raise ValueError(f"image {np.asarray(image).shape[:2]} is not of the size {tuple(size)}")
    return refine_mask(grid_mask, image, refine, grid=grid_mask.shape)


def prior_object_mask(prior, cfg: ObjectConfig = ObjectConfig(), *, image=None, refine=None) -> np.ndarray:
    """The object mask of a store's ``Prior`` at its image's original size (``prior.image_size``)."""
    h, w = prior.image_size
    if h < 1 or w < 1:
        raise ValueError(f"its image size {h}x{w} is unknown")
    return object_mask(prior.eigvecs, (h, w), cfg, image=image, refine=refine)


def store_object_mask(store, id_: str, cfg: ObjectConfig = ObjectConfig(), *, image=None, refine=None) -> np.ndarray:
    """Store id -> the object mask (H, W) bool at the image's pixels."""
    return prior_object_mask(store.get(id_), cfg, image=image, refine=refine)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A bool mask as PNG bytes: mode L, 0 background, 255 object."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()
