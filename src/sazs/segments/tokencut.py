"""TokenCut's object mask (Wang et al., CVPR 2022 / TPAMI 2023), as published, from patch features.

The baseline the object masks of :mod:`sazs.segments.objects` are measured against, computed
from the same features as the stores (``sazs-eval priors --baseline tokencut``). It follows
TokenCut's ``ncut`` in ``unsupervised_saliency_detection/object_discovery.py``:

1. dense affinity of the L2-normalised features, binarised: A_ij = 1 where cos_ij > tau,
   else ``eps`` (tau = 0.2, eps = 1e-5 as published; the diagonal included);
2. the second smallest generalised eigenvector of (D - A) v = λ D v;
3. bipartition at the vector's mean; the side holding the patch of largest |v| (the seed) is
   the foreground;
4. the connected component (4-connectivity, ``scipy.ndimage.label``'s default) of that side
   holding the seed is the object.

TokenCut solves step 2 with a dense ``scipy.linalg.eigh(D - A, D)``, O(N^3) per image; here
the same vector comes from the two largest eigenpairs of D^-1/2 A D^-1/2 (``eigsh``, Lanczos,
O(N^2) per product): with u its second eigenvector, v = D^-1/2 u solves the generalised
problem for the second smallest λ (same vector up to scale and sign, and the mean split and
the seed rule are invariant to both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse.linalg import eigsh

DENSE_MAX_NODES = 8192  # A is N x N float64


@dataclass(frozen=True)
class TokenCutConfig:
    tau: float = 0.2  # cosine threshold of the binary graph (TokenCut's default)
    eps: float = 1e-5  # weight of the pairs at or below tau (TokenCut's default)

    def __post_init__(self) -> None:
        if not -1.0 <= self.tau < 1.0:
            raise ValueError(f"tokencut tau must be in [-1, 1), got {self.tau}")
        if not self.eps > 0:
            raise ValueError(f"tokencut eps must be > 0, got {self.eps}")


def tokencut_vector(feats: np.ndarray, cfg: TokenCutConfig = TokenCutConfig()) -> np.ndarray:
    """The second smallest generalised eigenvector (N,) of TokenCut's binarised graph of ``feats`` (N, C)."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or len(f) < 3:
        raise ValueError(f"feats must be (N >= 3, C), got shape {f.shape}")
    if len(f) > DENSE_MAX_NODES:
        raise ValueError(f"tokencut refuses N={len(f)} > {DENSE_MAX_NODES} patches (dense N x N affinity)")
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    a = np.where(f @ f.T > cfg.tau, 1.0, cfg.eps)
    d = a.sum(1)
    s = 1.0 / np.sqrt(d)
    m = a * s[:, None] * s[None, :]
    # A fixed start vector keeps the result deterministic; the top eigenvector is sqrt(d).
    vals, vecs = eigsh(m, k=2, which="LA", v0=np.sqrt(d), tol=1e-8)
    u = vecs[:, np.argsort(vals)[0]]
    return u * s


def tokencut_mask(feats: np.ndarray, grid: tuple[int, int], cfg: TokenCutConfig = TokenCutConfig()) -> np.ndarray:
    """TokenCut's object mask (h, w) bool on the patch grid of ``feats`` (h*w, C), row-major."""
    h, w = grid
    if len(feats) != h * w:
        raise ValueError(f"{len(feats)} feature rows do not fill the grid {h}x{w}")
    v = tokencut_vector(feats, cfg)
    return mask_from_vector(v.reshape(h, w))


def mask_from_vector(v: np.ndarray) -> np.ndarray:
    """Steps 3-4 on a vector (h, w): the mean split, the seed's side, the seed's connected component."""
    v = np.asarray(v, np.float64)
    side = v > v.mean()
    seed = np.unravel_index(int(np.abs(v).argmax()), v.shape)
    if not side[seed]:
        side = ~side
    labels, _ = ndimage.label(side)
    return labels == labels[seed]
