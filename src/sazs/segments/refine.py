"""Image-guided refinement to pixel resolution: of eigenvectors (the guided filter), and of masks
and label maps (a registry of refiners: guided filter, fast bilateral solver, dense CRF, PAMR).

Eigenvectors live on the patch grid (14 px patches for ViT-S/14): upsampled bilinearly, the
zero crossing of a vector lands anywhere within a patch of the object's real edge. The
guided filter of He, Sun and Tang (ECCV 2010, TPAMI 2013) fits, in every window of radius r,
the source as an affine function of the guide image, q = a·I + b, and averages the fits:
where the window holds an image edge the output takes that edge, and in flat regions it is
a plain local mean. It is linear in the source (so the sign convention of the eigenvectors
and the span they define survive: refining v and then thresholding at 0 is well defined)
and costs O(H·W) per vector whatever r is, because every box mean is a difference of
cumulative sums.

``guided_filter(guide, src, radius, eps)`` works on a grayscale (H, W) or colour (H, W, 3)
guide in [0, 1] and a stack of sources (..., H, W); ``refine_eigvecs(vecs, image, cfg)``
refines eigenvectors already upsampled to the image (what :mod:`eval.fusion`,
:mod:`eval.predict` and :mod:`eval.prior_quality` call with ``refine="guided"``).
Pure numpy, float64 inside (box sums of 400 k pixels lose too much in float32).

Masks and label maps (``refine_mask``, ``refine_labels``, ``refine_probs``) take any refiner of
:data:`REFINERS` (``list_refiners()``; ``check_refine(name)``): soft class maps (C, H, W) in
[0, 1] in, refined soft maps out, argmax per pixel. Each refiner is registered with its help
text; ``guided`` and ``bilateral`` are linear and keep constants (a mask is refined as one
channel), ``crf`` and ``pamr`` are not (a mask is refined as two channels, background and
object). Measured gain and cost per refiner: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sazs.core.registry import Registry

from .bilateral import bilateral_solve
from .pamr import pamr


@dataclass(frozen=True)
class RefineConfig:
    # Window radius in pixels; None: one patch of the grid (image height / grid height,
    # rounded up), the largest distance a bilinear zero crossing can be off by.
    radius: int | None = None
    # Regulariser on the guide's local variance (guide in [0, 1]): edges whose local
    # standard deviation is well below sqrt(eps) ~ 0.03 are smoothed over, stronger ones kept.
    # He et al.'s smoothing setting 0.1^2 also smooths away real object edges of low contrast
    # (CamVid boundary recall 0.536 -> 0.493; 1e-3: 0.552; README, Benchmarks).
    eps: float = 1e-3
    color: bool = True  # colour guide (3x3 covariance per pixel); False: grayscale
    # Fit the coefficients on a grid this many times coarser (the fast guided filter); None:
    # a quarter of the radius, so the coarse window is always ~4 px: the source (eigenvectors
    # from a patch grid) is smooth at that scale, and the output still takes the image's edges.
    subsample: int | None = None

    def __post_init__(self) -> None:
        if self.radius is not None and self.radius < 1:
            raise ValueError(f"refinement radius must be >= 1 pixel, got {self.radius}")
        if self.subsample is not None and self.subsample < 1:
            raise ValueError(f"refinement subsample must be >= 1, got {self.subsample}")
        if not self.eps > 0:
            raise ValueError(f"refinement eps must be > 0, got {self.eps}")


def _box_sum_1d(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Sum over the window [i - r, i + r] (clipped at the borders) along ``axis``."""
    n = a.shape[axis]
    c = np.cumsum(a, axis=axis, dtype=np.float64)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (1, 0)
    c = np.pad(c, pad)  # c[i] = sum of a[:i]
    idx = np.arange(n)
    return np.take(c, np.minimum(idx + r + 1, n), axis=axis) - np.take(c, np.maximum(idx - r, 0), axis=axis)


def box_mean(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over (2r+1)^2 windows of the last two axes, windows clipped at the image border."""
    h, w = a.shape[-2:]
    s = _box_sum_1d(_box_sum_1d(a, r, -1), r, -2)
    rows = np.minimum(np.arange(h) + r + 1, h) - np.maximum(np.arange(h) - r, 0)
    cols = np.minimum(np.arange(w) + r + 1, w) - np.maximum(np.arange(w) - r, 0)
    return s / np.outer(rows, cols)


def _coefficients(g: np.ndarray, p: np.ndarray, radius: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-window affine fit p ~ a·g + b, averaged over the windows (He et al., Alg. 1, steps 1-4).

    ``g`` (C, H, W) with C = 1 or 3, ``p`` (M, H, W) -> mean a (M, C, H, W), mean b (M, H, W).
    """
    mean = lambda a: box_mean(a, radius)  # noqa: E731
    mean_g, mean_p = mean(g), mean(p)  # (C, H, W), (M, H, W)
    cov = np.stack([mean(g[c][None] * p) - mean_g[c][None] * mean_p for c in range(len(g))], 1)  # (M, C, H, W)
    if len(g) == 1:
        a = cov / (mean(g * g) - mean_g**2 + eps)[None]
    else:
        # the guide's 3x3 covariance per pixel, regularised, inverted by its adjugate
        sig = {}
        for i in range(3):
            for j in range(i, 3):
                sig[i, j] = sig[j, i] = mean(g[i] * g[j]) - mean_g[i] * mean_g[j] + (eps if i == j else 0.0)
        adj = {
            (0, 0): sig[1, 1] * sig[2, 2] - sig[1, 2] ** 2,
            (0, 1): sig[0, 2] * sig[1, 2] - sig[0, 1] * sig[2, 2],
            (0, 2): sig[0, 1] * sig[1, 2] - sig[0, 2] * sig[1, 1],
            (1, 1): sig[0, 0] * sig[2, 2] - sig[0, 2] ** 2,
            (1, 2): sig[0, 1] * sig[0, 2] - sig[0, 0] * sig[1, 2],
            (2, 2): sig[0, 0] * sig[1, 1] - sig[0, 1] ** 2,
        }
        for i, j in list(adj):
            adj[j, i] = adj[i, j]
        det = sig[0, 0] * adj[0, 0] + sig[0, 1] * adj[0, 1] + sig[0, 2] * adj[0, 2]
        a = np.stack([sum(adj[i, j] * cov[:, j] for j in range(3)) for i in range(3)], 1) / det
    b = mean_p - (a * mean_g[None]).sum(1)
    return mean(a), mean(b)


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes (align_corners=False, as the eigenvector upsampling)."""
    t = torch.from_numpy(np.ascontiguousarray(a)).reshape(-1, 1, *a.shape[-2:])
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*a.shape[:-2], *size).numpy()


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float, subsample: int = 1) -> np.ndarray:
    """He et al.'s guided filter of ``src`` (..., H, W) by ``guide`` (H, W) or (H, W, 3) in [0, 1].

    ``subsample`` > 1 is the fast guided filter (He & Sun 2015): the affine coefficients are
    fitted on the guide and source subsampled by that factor (radius divided likewise) and
    upsampled bilinearly, then applied to the full-resolution guide, so the output keeps
    the guide's pixel-sharp edges at 1/subsample² of the cost. Returns float64 of ``src``'s
    shape. Linear in ``src``: filter(α·p + β·p') = α·q + β·q'.
    """
    guide = np.asarray(guide)
    src = np.asarray(src)
    hw = src.shape[-2:]
    if guide.shape[:2] != hw:
        raise ValueError(f"guide {guide.shape[:2]} and source {hw} differ in size")
    if guide.ndim == 3 and guide.shape[2] != 3 or guide.ndim not in (2, 3):
        raise ValueError(f"guide must be (H, W) or (H, W, 3), got {guide.shape}")
    if subsample < 1:
        raise ValueError(f"subsample must be >= 1, got {subsample}")
    g = (guide[None] if guide.ndim == 2 else np.moveaxis(guide, -1, 0)).astype(np.float64)  # (C, H, W)
    lead = src.shape[:-2]
    p = src.reshape(-1, *hw).astype(np.float64)
    if subsample > 1:
        small = (max(1, round(hw[0] / subsample)), max(1, round(hw[1] / subsample)))
        mean_a, mean_b = _coefficients(_resize(g, small), _resize(p, small), max(1, round(radius / subsample)), eps)
        # full resolution in float32: only the (smooth) coefficients are resized and applied
        mean_a, mean_b = _resize(mean_a.astype(np.float32), hw), _resize(mean_b.astype(np.float32), hw)
        g = g.astype(np.float32)
    else:
        mean_a, mean_b = _coefficients(g, p, radius, eps)
    q = mean_b
    for c in range(len(g)):
        q += mean_a[:, c] * g[c]
    return q.reshape(*lead, *hw).astype(np.float64)


def default_radius(image_hw: tuple[int, int], grid: tuple[int, int]) -> int:
    """One patch in pixels: the image height over the grid height, rounded up."""
    return max(1, math.ceil(max(image_hw[0] / grid[0], image_hw[1] / grid[1])))


def refine_eigvecs(
    vecs: np.ndarray, image: np.ndarray, cfg: RefineConfig = RefineConfig(), *, grid: tuple[int, int] | None = None
) -> np.ndarray:
    """Eigenvectors (K, H, W) already upsampled to ``image`` (H, W, 3) uint8 -> refined float32 (K, H, W).

    ``grid`` (the patch grid the vectors came from) sets the default radius (one patch);
    without it and without ``cfg.radius`` the radius is 1/32 of the image's long side.
    """
    vecs = np.asarray(vecs)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"refinement needs the (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if vecs.shape[-2:] != image.shape[:2]:
        raise ValueError(
            f"eigenvectors {vecs.shape[-2:]} are not at the image's size {image.shape[:2]}; upsample them first"
        )
    radius = cfg.radius or (default_radius(image.shape[:2], grid) if grid else max(1, max(image.shape[:2]) // 32))
    guide = image.astype(np.float32) / np.float32(255)
    if not cfg.color:
        guide = guide @ np.array([0.299, 0.587, 0.114], np.float32)
    subsample = cfg.subsample or max(1, radius // 4)
    return guided_filter(guide, vecs, radius, cfg.eps, subsample).astype(np.float32)


def upsample_eigvecs(eigvecs, size: tuple[int, int], *, image=None, refine: str | None = None) -> torch.Tensor:
    """(K, h, w) eigenvectors on the patch grid -> (K, H, W) float32 at the image's pixels.

    The grid covers the whole image (the pipeline resizes the full image to grid x patch), so
    bilinear interpolation with ``align_corners=False`` maps cell centres to pixel centres,
    as the trainer's sampling does. ``refine="guided"`` then refines the upsampled vectors
    with ``image`` (H, W, 3) uint8 (the guided filter, below): their zero
    crossings move onto the image's edges.
    """
    v = torch.as_tensor(eigvecs, dtype=torch.float32)
    if v.dim() != 3:
        raise ValueError(f"eigvecs must be (K, h, w), got shape {tuple(v.shape)}")
    grid = tuple(v.shape[-2:])
    if grid != tuple(size):
        v = F.interpolate(v[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    if check_refine(refine) is None:
        return v
    if refine != "guided":
        raise ValueError(
            f"eigenvectors are refined by the guided filter only (it is linear, so their span and "
            f"signs survive), not {refine!r}; masks and label maps take any of {list_refiners()}"
        )
    if image is None:
        raise ValueError(f"refine={refine!r} needs the image the eigenvectors belong to")
    return torch.from_numpy(refine_eigvecs(v.numpy(), image, grid=grid))


# -- refiners of masks and label maps -----------------------------------------------------------


def _check_image(image: np.ndarray, hw: tuple[int, int]) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"refinement needs the (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if tuple(image.shape[:2]) != tuple(hw):
        raise ValueError(f"image {image.shape[:2]} and maps {tuple(hw)} differ in size")


def _guided(probs: np.ndarray, image: np.ndarray, grid: tuple[int, int] | None) -> np.ndarray:
    return refine_eigvecs(probs, image, RefineConfig(), grid=grid)


def _bilateral(probs: np.ndarray, image: np.ndarray, grid: tuple[int, int] | None) -> np.ndarray:
    return bilateral_solve(image, probs)


def _pamr(probs: np.ndarray, image: np.ndarray, grid: tuple[int, int] | None) -> np.ndarray:
    return pamr(image, probs)


def _crf(probs: np.ndarray, image: np.ndarray, grid: tuple[int, int] | None) -> np.ndarray:
    """Krähenbühl & Koltun's dense CRF (pydensecrf2), Deep Spectral Methods' settings: unary
    -log p, Gaussian kernel (sxy 3, weight 3) + appearance kernel (sxy 80, srgb 13, weight 10),
    5 mean-field iterations."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise ImportError(
            "refinement 'crf' needs pydensecrf2 (the crf extra; a C++ extension built from source: "
            "`pip install pydensecrf2`, with a compiler and Cython)"
        ) from exc
    c, h, w = probs.shape
    p = np.clip(probs / np.maximum(probs.sum(0, keepdims=True), 1e-6), 1e-5, 1.0)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(p).reshape(c, -1), np.float32))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    return np.asarray(crf.inference(5), np.float32).reshape(c, h, w)


Refine = Callable[[np.ndarray, np.ndarray, "tuple[int, int] | None"], np.ndarray]  # (probs, image, grid) -> probs

# name -> the refiner; meta ``linear``: linear and keeps constants, so a mask is refined as one channel.
REFINERS: Registry[Refine] = Registry("refinement")
REFINERS.add("guided", _guided, help="guided filter, radius one patch, eps 1e-3 (He et al.; numpy)", linear=True)
REFINERS.add(
    "bilateral",
    _bilateral,
    help="fast bilateral solver with TokenCut's settings (Barron & Poole; scipy.sparse)",
    linear=True,
)
REFINERS.add("crf", _crf, help="dense CRF, Deep Spectral Methods' settings (the crf extra: pydensecrf2)")
REFINERS.add(
    "pamr", _pamr, help="pixel-adaptive mask refinement, 10 iterations at 240 px (Araslanov & Roth)", linear=False
)


def list_refiners() -> list[str]:
    """The refiners' names, as ``--refine`` takes them."""
    return REFINERS.names()


def check_refine(mode: str | None) -> str | None:
    """None (no refinement) or a known refiner's name; the error lists them."""
    if mode is not None and mode not in REFINERS:
        raise ValueError(f"unknown refinement {mode!r}; choose from {list_refiners()} (or none)")
    return mode


def refine_probs(probs, image: np.ndarray, name: str, *, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Soft class maps (C, H, W) in [0, 1] at ``image``'s pixels -> refined (C, H, W) float32.

    ``grid`` (the patch grid the maps came from) sets the guided filter's radius (one patch).
    """
    refine = REFINERS[check_refine(name)]
    probs = np.asarray(probs, np.float32)
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, H, W), got shape {probs.shape}")
    _check_image(np.asarray(image), probs.shape[-2:])
    return np.asarray(refine(probs, np.asarray(image), grid), np.float32)


def refine_mask(mask, image: np.ndarray, name: str, *, grid: tuple[int, int] | None = None) -> np.ndarray:
    """A mask (bool, or soft in [0, 1]; at the image's size or on a coarser grid, then upsampled
    bilinearly) refined with ``image`` (H, W, 3) uint8 -> bool (H, W)."""
    m = np.asarray(mask, np.float32)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    hw = tuple(np.asarray(image).shape[:2])
    if m.shape != hw:
        grid = grid or m.shape
        m = _resize(m, hw)
    if REFINERS.entry(check_refine(name)).meta.get("linear", False):
        return refine_probs(m[None], image, name, grid=grid)[0] > 0.5
    out = refine_probs(np.stack([1 - m, m]), image, name, grid=grid)
    return out[1] > out[0]


def refine_labels(labels, image: np.ndarray, name: str, *, grid: tuple[int, int] | None = None) -> np.ndarray:
    """A label map (h, w) (patch grid, upsampled bilinearly per label) or (H, W) refined with
    ``image`` (H, W, 3) uint8 -> (H, W) int64: the argmax of the refined label indicators."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min() < 0:
        raise ValueError(f"labels must be (H, W) non-negative integers, got shape {labels.shape}")
    n = int(labels.max()) + 1
    onehot = (labels[None] == np.arange(n)[:, None, None]).astype(np.float32)
    hw = tuple(np.asarray(image).shape[:2])
    if labels.shape != hw:
        grid = grid or labels.shape
        onehot = _resize(onehot, hw)
    return refine_probs(onehot, image, name, grid=grid).argmax(0)
