"""Sparse kNN affinity graph over the patches of one image.

W_ij = max(cos(f_i, f_j), 0) for j among the k nearest neighbours of i (by cosine),
symmetrised, plus an optional colour/position term (the image-matting kNN affinity of
Deep Spectral Methods). The dense N x N affinity of the original code is never formed:
FAISS searches exactly without keeping it, the torch backend computes it in row blocks.

Isolated nodes (every similarity <= threshold) keep degree 0. The Laplacian in
`spectral.py` sets D^-1/2 = 0 for them, so their rows of L = I - D^-1/2 W D^-1/2 are
rows of the identity: they contribute eigenvalue 1, never one of the smallest, and
their entries in the low eigenvectors are 0. `Graph.num_isolated` records the count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "torch")


@dataclass(frozen=True)
class GraphConfig:
    """Affinity graph settings (stored in the prior-store manifest).

    xy_weight (lambda_xy) scales patch positions in the colour kNN: positions are
    normalised by the grid size (x = column / (w - 1), y = row / (h - 1), both in
    [0, 1]) and colours are in [0, 1], so lambda_xy = 1 makes crossing the whole image
    count as much as going from black to white. The default 2.0 is the first scale
    of Deep Spectral Methods' `knn_affinity`.
    """

    k: int = 10
    backend: str = "faiss"
    threshold: float = 0.0
    color_weight: float = 0.0
    color_k: int = 10
    xy_weight: float = 2.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown graph backend {self.backend!r}; choose from {list(BACKENDS)}")
        if self.k < 1 or self.color_k < 1:
            raise ValueError(f"k and color_k must be >= 1 (got k={self.k}, color_k={self.color_k})")
        # A negative threshold would let negative cosines in as negative weights, and a
        # Laplacian with negative weights is no longer positive semi-definite.
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0 (got {self.threshold})")
        if self.color_weight < 0 or self.xy_weight < 0:
            raise ValueError("color_weight and xy_weight must be >= 0")


@dataclass
class Graph:
    """Symmetric non-negative affinity with zero diagonal over the h*w patches (row-major)."""

    W: sp.csr_matrix
    grid: tuple[int, int]

    @property
    def num_nodes(self) -> int:
        return self.W.shape[0]

    @property
    def degrees(self) -> np.ndarray:
        return np.asarray(self.W.sum(axis=1), dtype=np.float64).ravel()

    @property
    def num_isolated(self) -> int:
        return int(np.count_nonzero(self.degrees == 0))


def _torch_device(device: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available; using cpu", device)
        device = "cpu"
    return torch.device(device)


def _drop_self(scores: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep k of the k+1 results per row, removing the query itself.

    With duplicate points the query need not come first (ties), so it is removed
    wherever it is; a row where it is absent loses its last (worst) result instead.
    """
    n = idx.shape[0]
    keep = idx != np.arange(n)[:, None]
    full = keep.all(axis=1)
    keep[full, -1] = False
    return scores[keep].reshape(n, k), idx[keep].reshape(n, k)


def _knn_faiss(x: np.ndarray, k: int, metric: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    if device.startswith("cuda") or device == "auto":
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            gpu = int(device.split(":")[1]) if ":" in device else 0
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
        elif device != "auto":
            logger.warning("faiss has no GPU support here (pip install faiss-gpu-cu12); using the CPU index")
    index.add(x)
    scores, idx = index.search(x, k + 1)
    return _drop_self(scores, idx, k)


def _knn_torch(x: np.ndarray, k: int, metric: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    dev = _torch_device(device)
    xt = torch.from_numpy(x).to(dev)
    n = xt.shape[0]
    sq = (xt * xt).sum(1)
    # Rows per block so that one block of scores stays ~64 MB: memory O(N * chunk).
    chunk = max(1, min(n, (1 << 24) // n))
    out_s, out_i = [], []
    for start in range(0, n, chunk):
        q = xt[start : start + chunk]
        s = q @ xt.T
        if metric == "l2":
            # Same expansion as faiss (|q|^2 + |x|^2 - 2 q.x); negated so topk is "largest".
            s = 2 * s - sq[start : start + chunk, None] - sq[None, :]
        rows = torch.arange(q.shape[0], device=dev)
        s[rows, rows + start] = -torch.inf  # exclude self
        vals, ids = torch.topk(s, k, dim=1, largest=True, sorted=True)
        out_s.append(vals if metric == "ip" else -vals)
        out_i.append(ids)
    return torch.cat(out_s).cpu().numpy(), torch.cat(out_i).cpu().numpy().astype(np.int64)


def knn(x: np.ndarray, k: int, *, metric: str, backend: str, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest other rows of x: (scores, idx), each (N, k), best first.

    metric "ip" scores are inner products (descending); "l2" scores are squared
    Euclidean distances (ascending, clipped at 0).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    fn = {"faiss": _knn_faiss, "torch": _knn_torch}[backend]
    scores, idx = fn(x, k, metric, device)
    if metric == "l2":
        scores = np.maximum(scores, 0.0)
    return scores, idx


def _sparse_from_knn(weights: np.ndarray, idx: np.ndarray, n: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(n), idx.shape[1])
    keep = weights.ravel() > 0
    W = sp.csr_matrix(
        (weights.ravel()[keep].astype(np.float64), (rows[keep], idx.ravel()[keep])), shape=(n, n)
    )
    # max(W, W^T): the cosine is symmetric, so wherever both directions were found the
    # two weights agree and max keeps that value; elsewhere it keeps the one-sided edge
    # (union of kNN relations). The mean would halve one-sided edges for no reason, and
    # min (mutual kNN) fragments the graph into many small components.
    return W.maximum(W.T).tocsr()


def _grid_xy(grid: tuple[int, int]) -> np.ndarray:
    h, w = grid
    y, x = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=1)


def _color_affinity(colors: np.ndarray, cfg: GraphConfig, grid: tuple[int, int], k: int) -> sp.csr_matrix:
    """Gaussian kNN affinity over (r, g, b, lambda_xy x, lambda_xy y).

    Weights exp(-d^2 / sigma^2) with sigma^2 the mean squared kNN distance of this
    image (self-tuning: the same config works for flat and for busy images). DSM uses
    weight 1 for every kNN edge; a Gaussian keeps weak links weak across colour edges.
    """
    f = np.concatenate([colors, cfg.xy_weight * _grid_xy(grid)], axis=1).astype(np.float32)
    d2, idx = knn(f, k, metric="l2", backend=cfg.backend, device=cfg.device)
    sigma2 = float(d2.mean())
    weights = np.exp(-d2 / sigma2) if sigma2 > 0 else np.ones_like(d2)
    return _sparse_from_knn(weights, idx, f.shape[0])


def build_knn_graph(
    feats: np.ndarray, cfg: GraphConfig, *, grid: tuple[int, int], colors: np.ndarray | None = None
) -> Graph:
    """Build the symmetric kNN cosine affinity (plus optional colour term) of one image.

    feats: (h*w, d) patch features, row-major over the grid; cosine similarity is what
    is measured, so rows are re-normalised here (a no-op for L2-normalised input).
    colors: (h*w, 3) in [0, 1] (see `patch_colors`); required when cfg.color_weight > 0.
    """
    feats = np.asarray(feats)
    h, w = (int(v) for v in grid)
    if feats.ndim != 2:
        raise ValueError(f"feats must be (N, d), got shape {feats.shape}")
    n = feats.shape[0]
    if h < 1 or w < 1 or h * w != n:
        raise ValueError(f"feats have {n} rows but grid {tuple(grid)} has {h * w} patches")
    if n < 2:
        raise ValueError("a graph needs at least 2 patches")
    if not np.isfinite(feats).all():
        raise ValueError(f"feats contain NaN/Inf ({np.count_nonzero(~np.isfinite(feats))} values)")
    norms = np.linalg.norm(feats.astype(np.float32), axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"feats contain {int((norms == 0).sum())} all-zero rows (cosine undefined)")
    x = (feats / norms).astype(np.float32)

    k = cfg.k
    if k >= n:
        logger.warning("k=%d >= number of patches %d; clamping k to %d", k, n, n - 1)
        k = n - 1
    sims, idx = knn(x, k, metric="ip", backend=cfg.backend, device=cfg.device)
    # Dropping <= threshold (>= 0) also removes every negative cosine: W = max(cos, 0).
    W = _sparse_from_knn(np.where(sims > cfg.threshold, sims, 0.0), idx, n)

    if cfg.color_weight > 0:
        if colors is None:
            raise ValueError("cfg.color_weight > 0 needs colors (see patch_colors)")
        colors = np.asarray(colors, dtype=np.float32)
        if colors.shape != (n, 3):
            raise ValueError(f"colors must be ({n}, 3) for grid {(h, w)}, got {colors.shape}")
        if not np.isfinite(colors).all():
            raise ValueError("colors contain NaN/Inf")
        W = (W + cfg.color_weight * _color_affinity(colors, cfg, (h, w), min(cfg.color_k, n - 1))).tocsr()

    graph = Graph(W=W, grid=(h, w))
    if graph.num_isolated:
        logger.debug("graph %s: %d isolated patches (degree 0)", (h, w), graph.num_isolated)
    return graph


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights averaging input cells over each output cell's exact extent."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    px = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def patch_colors(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Area-average an (H, W, 3) uint8 RGB image down to the patch grid: (h*w, 3) float32 in [0, 1].

    Output cells may straddle pixel boundaries (the extractor resizes the image, so
    H / h need not be an integer); partial pixels are weighted by their overlap.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    h, w = (int(v) for v in grid)
    if h < 1 or w < 1:
        raise ValueError(f"invalid grid {grid}")
    img = image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    rh, rw = _area_matrix(image.shape[0], h), _area_matrix(image.shape[1], w)
    out = np.einsum("ih,hwc,jw->ijc", rh, img, rw, optimize=True)
    return np.clip(out.reshape(h * w, 3), 0.0, 1.0).astype(np.float32)
