"""The fast bilateral solver (Barron & Poole, ECCV 2016), as TokenCut refines its masks with it.

Given a target t (a soft mask) and a confidence c per pixel, it finds the map x that stays close
to t where c is high and is smooth in *bilateral space* (position and colour) elsewhere:

    min_x  lam/2 · sum_ij W_ij (x_i - x_j)^2  +  sum_i c_i (x_i - t_i)^2

with W a bilateral affinity. The problem is solved on a coarse grid in (y, x, luma, u, v)
space: pixels are splatted onto the grid vertices they fall in (S), the grid is blurred with
a [1 2 1] kernel along each of its 5 axes (B), the pair is made bistochastic (diagonals Dn,
Dm, so that S^T Dn B Dn S approximates a normalised bilateral filter), and the linear system
(lam (Dm - Dn B Dn) + diag(S c)) y = S (c t) is solved by Jacobi-preconditioned conjugate
gradients on the vertices; x = S^T y. The grid of a 480p image has a few thousand vertices,
so the cost is dominated by hashing the pixels (tens of ms).

Written here by hand with scipy.sparse: OpenCV's ximgproc.fastBilateralSolverFilter would
fit the stack, but the opencv-contrib wheels on PyPI are built without Eigen and raise "not
implemented"; TokenCut's ``bilateral_solver.py`` is research code, not a package. The
defaults are TokenCut's (sigma_spatial 24, sigma_luma 4, sigma_chroma 4, lam 256, 25 CG
iterations at tolerance 1e-5, confidence 0.999 everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import cg

# ITU-R BT.601 RGB -> YUV (Y in [0, 255], U and V offset by 128 into [0, 255])
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float64)
YUV_OFFSET = np.array([0.0, 128.0, 128.0])


@dataclass(frozen=True)
class BilateralConfig:
    sigma_spatial: float = 24.0  # grid cell size in pixels
    sigma_luma: float = 4.0  # grid cell size in luma (0..255)
    sigma_chroma: float = 4.0  # grid cell size in chroma (0..255)
    lam: float = 256.0  # weight of smoothness against the data term
    confidence: float = 0.999  # confidence of every pixel of the target
    cg_iters: int = 25
    cg_tol: float = 1e-5
    bistochastic_iters: int = 10

    def __post_init__(self) -> None:
        if min(self.sigma_spatial, self.sigma_luma, self.sigma_chroma, self.lam) <= 0:
            raise ValueError(f"bilateral solver: sigmas and lam must be > 0, got {self}")
        if not 0 < self.confidence <= 1 or self.cg_iters < 1:
            raise ValueError(f"bilateral solver: confidence in (0, 1] and cg_iters >= 1, got {self}")


class BilateralGrid:
    """Splat (pixels -> vertices) and blur (vertices -> vertices) of one image's bilateral grid."""

    def __init__(self, image: np.ndarray, cfg: BilateralConfig):
        h, w = image.shape[:2]
        yuv = image.reshape(-1, 3).astype(np.float64) @ RGB_TO_YUV.T + YUV_OFFSET
        yy, xx = np.divmod(np.arange(h * w), w)
        scale = np.array([cfg.sigma_spatial, cfg.sigma_spatial, cfg.sigma_luma, cfg.sigma_chroma, cfg.sigma_chroma])
        # +1 so that a neighbour one cell below 0 still has a non-negative coordinate
        coords = (np.column_stack([yy, xx, yuv]) / scale).astype(np.int64) + 1
        base = int(coords.max()) + 2
        self.place = base ** np.arange(coords.shape[1] - 1, -1, -1, dtype=np.int64)
        keys, idx = np.unique(coords @ self.place, return_inverse=True)
        self.num_pixels, self.num_vertices, self.dim = h * w, len(keys), coords.shape[1]
        self.S = sparse.csr_matrix(
            (np.ones(self.num_pixels), (idx.ravel(), np.arange(self.num_pixels))),
            shape=(self.num_vertices, self.num_pixels),
        )
        # neighbours along each axis: the vertex whose key differs by one place value
        rows, cols = [], []
        for step in self.place:
            for sign in (-1, 1):
                found = np.searchsorted(keys, keys + sign * step)
                found = np.minimum(found, len(keys) - 1)
                ok = np.flatnonzero(keys[found] == keys + sign * step)
                rows.append(ok)
                cols.append(found[ok])
        r, c = np.concatenate(rows), np.concatenate(cols)
        self.neighbours = sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(self.num_vertices,) * 2)

    def blur(self, y: np.ndarray) -> np.ndarray:
        """[1 2 1] along every axis of the grid (the centre weight 2 per axis)."""
        return 2 * self.dim * y + self.neighbours @ y


def _bistochastic(grid: BilateralGrid, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Diagonals n, m with n * blur(n) = m = the vertices' pixel counts (Sinkhorn-like updates)."""
    m = np.asarray(grid.S.sum(1)).ravel()
    n = np.ones(grid.num_vertices)
    for _ in range(iters):
        n = np.sqrt(n * m / grid.blur(n))
    return n, n * grid.blur(n)


def bilateral_solve(image: np.ndarray, targets: np.ndarray, cfg: BilateralConfig = BilateralConfig()) -> np.ndarray:
    """Solve for each target map (C, H, W) with ``image`` (H, W, 3) uint8 -> (C, H, W) float32."""
    targets = np.asarray(targets, np.float64)
    if image.shape[:2] != targets.shape[-2:]:
        raise ValueError(f"image {image.shape[:2]} and targets {targets.shape[-2:]} differ in size")
    grid = BilateralGrid(image, cfg)
    n, m = _bistochastic(grid, cfg.bistochastic_iters)
    n_diag = sparse.diags(n)
    smooth = sparse.diags(m) - n_diag @ (grid.neighbours + 2 * grid.dim * sparse.identity(grid.num_vertices)) @ n_diag
    conf = np.full(grid.num_pixels, cfg.confidence)
    conf_v = grid.S @ conf
    a = (cfg.lam * smooth + sparse.diags(conf_v)).tocsr()
    precond = sparse.diags(1 / np.maximum(a.diagonal(), 1e-5))
    out = np.empty(targets.shape, np.float32)
    for i, t in enumerate(targets.reshape(len(targets), -1)):
        b = grid.S @ (conf * t)
        y, _ = cg(a, b, x0=b / conf_v, M=precond, maxiter=cfg.cg_iters, rtol=cfg.cg_tol)
        out[i] = (grid.S.T @ y).reshape(targets.shape[-2:])
    return out
