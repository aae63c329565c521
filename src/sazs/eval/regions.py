"""Ground-truth-free segments of one image for the ``segments`` fusion, and the fusion rule itself.

Two maps cut the image (:func:`segment_maps`):

- **spectral segments**: k-means on the rows of the upsampled non-trivial eigenvectors
  [v1..vm], each row normalised to unit length (spectral clustering as Ng, Jordan and Weiss):
  a handful of object-sized parts whose borders follow the priors, at patch precision;
- **superpixels**: SLIC on the image (scikit-image): a few hundred small regions whose
  borders follow the image's edges to the pixel.

The rule (:func:`grow_labels`): the network's prediction is the seed. For every predicted
class, the spectral segments that hold at least ``seed_share`` of its seed are the object's
segments; inside them, every superpixel predicted as background whose mean probability of the
class exceeds ``grow_threshold`` joins the class (the object's extent is completed where the
network was only half sure), and outside them, predicted pixels in superpixels whose mean
probability is below ``grow_threshold`` are given back to background (a spill into another
segment is pulled back). A prediction that agrees with its segments is left as it is.

Pure numpy / torch; the image and the eigenvectors come from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from skimage.segmentation import slic

KMEANS_POINTS = 20_000  # k-means is fitted on at most this many pixels (a fixed grid), then all are assigned


@dataclass
class SegmentMaps:
    """(H, W) int64 label maps of one image: SLIC superpixels and spectral segments (either may be one region)."""

    superpixels: np.ndarray
    spectral: np.ndarray


def spectral_segments(eigvecs: torch.Tensor, n: int, *, num_eigs: int | None = None, seed: int = 0) -> np.ndarray:
    """(H, W) int labels: k-means (``n`` clusters) on the unit-normalised rows of v1..v_{m-1}.

    Deterministic (scipy's k-means++ with a fixed seed). One region when ``n`` < 2 or there is
    no non-trivial vector.
    """
    k_all = eigvecs.shape[0] if num_eigs is None else min(num_eigs, eigvecs.shape[0])
    h, w = eigvecs.shape[-2:]
    if k_all < 2 or n < 2:
        return np.zeros((h, w), np.int64)
    x = eigvecs[1:k_all].reshape(k_all - 1, -1).T.double().cpu().numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    step = max(1, x.shape[0] // KMEANS_POINTS)
    centres, _ = kmeans2(x[::step], n, minit="++", seed=seed)
    d = (x**2).sum(1)[:, None] - 2 * x @ centres.T + (centres**2).sum(1)[None]
    return d.argmin(1).reshape(h, w).astype(np.int64)


def segment_maps(
    eigvecs: torch.Tensor | None,
    image: np.ndarray | None,
    *,
    spectral: int,
    superpixels: int,
    compactness: float,
    num_eigs: int | None = None,
) -> SegmentMaps:
    """The superpixels (``superpixels`` ~ their number, 0 or no image: one region) and the spectral
    segments (``spectral`` clusters, 0 or no eigenvectors: one region) of an image."""
    if eigvecs is None and image is None:
        raise ValueError("segment maps need the eigenvectors, the image, or both")
    size = tuple(eigvecs.shape[-2:]) if eigvecs is not None else tuple(image.shape[:2])
    if image is not None and tuple(image.shape[:2]) != size:
        raise ValueError(f"image {tuple(image.shape[:2])} and eigenvectors {size} differ in size")
    spec = np.zeros(size, np.int64)
    if eigvecs is not None and spectral > 1:
        spec = spectral_segments(eigvecs, spectral, num_eigs=num_eigs)
    sp = np.zeros(size, np.int64)
    if image is not None and superpixels > 1:
        sp = slic(image, n_segments=superpixels, compactness=compactness, start_label=0).astype(np.int64)
    return SegmentMaps(sp, spec)


def vote_probs(probs: torch.Tensor, regions: np.ndarray) -> torch.Tensor:
    """(C, H, W) probabilities averaged over each region of ``regions`` (H, W) (every pixel of a
    region gets the region's mean)."""
    c = probs.shape[0]
    if tuple(regions.shape) != tuple(probs.shape[-2:]):
        raise ValueError(f"regions {tuple(regions.shape)} and probabilities {tuple(probs.shape[-2:])} differ in size")
    idx = torch.from_numpy(np.ascontiguousarray(regions).reshape(-1)).to(probs.device)
    n = int(idx.max()) + 1
    sums = torch.zeros(c, n, device=probs.device).index_add_(1, idx, probs.reshape(c, -1).float())
    counts = torch.bincount(idx, minlength=n).clamp_min(1).float()
    return (sums / counts)[:, idx].reshape(probs.shape)


def grow_labels(
    probs: torch.Tensor,
    maps: SegmentMaps,
    *,
    background: int | None = 0,
    seed_share: float = 0.2,
    grow_threshold: float = 0.3,
) -> torch.Tensor:
    """(H, W) labels: the argmax of ``probs`` (C, H, W) corrected by the segments (module docstring).

    ``background``: the index of the background class, the only label that classes grow into
    and give pixels back to; None (a benchmark without background): the superpixel vote, the
    argmax of the per-superpixel mean probabilities.
    """
    mean = vote_probs(probs, maps.superpixels)
    if background is None:
        return mean.argmax(0)
    pred = probs.argmax(0)
    out = pred.clone()
    spectral = torch.from_numpy(np.ascontiguousarray(maps.spectral)).to(pred.device)
    n = int(spectral.max()) + 1
    best = torch.zeros(pred.shape, device=pred.device)
    for c in range(probs.shape[0]):
        seed = pred == c
        if c == background or not bool(seed.any()):
            continue
        share = torch.bincount(spectral[seed], minlength=n).float() / float(seed.sum())
        inside = (share >= seed_share)[spectral]
        grow = inside & (pred == background) & (mean[c] > grow_threshold) & (mean[c] > best)
        out[grow], best[grow] = c, mean[c][grow]
        out[seed & ~inside & (mean[c] < grow_threshold)] = background
    return out
