"""Affinity graph over the patches of one image: a sparse kNN graph plus a global term.

W_ij = max(cos(f_i, f_j), 0) for j among the k nearest neighbours of i (by cosine),
symmetrised, plus an optional colour/position term (the image-matting kNN affinity of
Deep Spectral Methods), plus the *global term* g k(p_i . p_j) between every pair
(i != j), with p_i the unit feature f_i projected on the image's top `global_rank`
principal directions and k the kernel `global_kernel`: "cosine" (default)
k(c) = c + s, the rank-r approximation of Deep Spectral Methods' own dense affinity
max(c, 0) (s = 0 unless some pair has c < 0, see `global_factor`), at g = 0.3; or
"affine" k(c) = (1 + c) / 2, the first global term (g = 1 before the cosine default;
docs/BENCHMARKS.md, "Quality of the priors"). The global term is never formed: it is the
low-rank factor `Graph.lowrank` (N x r, one more column for affine or a shift, from the
kernel's entry in `GLOBAL_KERNELS`); its degrees and products are the graph operator's
(`laplacian`, O(N r) per column, for every solver).
Why it is there: a kNN graph only links near-duplicates (cos ~ 0.99), so its cheapest
cut separates two large background regions that share few kNN links (water above, bank
below) and the object goes with one of them; the global term adds how similar *every*
pair is, which is what separates an object from its background in the dense affinity of
Deep Spectral Methods, at O(N r) instead of O(N^2).

The dense N x N affinity of the original code is formed only for kind "dense" (the
Deep Spectral Methods baseline, `build_dense_graph`). The kNN search never keeps it in
float32: FAISS searches exactly without keeping it, the torch backend computes it in
row blocks, and the default "certified" backend searches a bfloat16 product and proves
its answer exact (`knn`, `knn_certified`; many images at once: `knn_batched`).

Isolated nodes (every similarity <= threshold) keep degree 0. The Laplacian in
`laplacian.py` sets D^-1/2 = 0 for them, so their rows of L = I - D^-1/2 W D^-1/2 are
rows of the identity: they contribute eigenvalue 1, never one of the smallest, and
their entries in the low eigenvectors are 0 (`laplacian.num_isolated` counts them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch

from sazs.core.devices import resolve_device
from sazs.core.registry import Registry

from .ell import Ell, attach_global_term, ell_graph
from .knn import BACKENDS, knn
from .knn_batched import batched_knn
from .laplacian import num_isolated
from .types import Graph

logger = logging.getLogger(__name__)

KINDS = ("knn", "dense")
# Settings that did not exist in stores written before the global term: a manifest
# leaves them out at these values (what those stores computed), so their fingerprints still match.
_LEGACY_DEFAULTS = {"kind": "knn", "global_weight": 0.0, "global_kernel": "affine"}
DENSE_MAX_NODES = 8192  # the dense baseline keeps N x N float64 (512 MiB here)


@dataclass(frozen=True)
class GraphConfig:
    """Affinity graph settings (stored in the prior-store manifest).

    xy_weight (lambda_xy) scales patch positions in the colour kNN: positions are
    normalised by the grid size (x = column / (w - 1), y = row / (h - 1), both in
    [0, 1]) and colours are in [0, 1], so lambda_xy = 1 makes crossing the whole image
    count as much as going from black to white. The default 2.0 is the first scale
    of Deep Spectral Methods' `knn_affinity`.

    kind "knn" (default) is the sparse kNN graph plus the global term; "dense" is the
    original Deep Spectral Methods affinity max(F F^T, 0) / max over all pairs (the
    baseline, `build_dense_graph`; k, threshold, colour and global settings unused).

    global_weight g (default 0.3; 0 = the kNN graph alone, the setting before the global
    term) weighs the global affinity k(p_i . p_j) against the kNN cosines;
    global_rank r (default 32; 0 = all d dimensions) is the number of principal
    directions of the unit features kept in p: 32 carry > 99% of their energy on ViT
    features, and the solver's products cost O(N r). global_kernel k: "cosine" (default)
    p_i . p_j (+ a shift only where some pair is negative, `global_factor`), the low-rank
    form of DSM's max(cos, 0); "affine" (1 + p_i . p_j) / 2, the first global term and
    default until g = 0.3 cosine replaced it (manifests leave the key out at "affine", so
    stores written before the field existed keep their fingerprint).

    backend: "certified" (default; exact, fastest on CPUs with native bfloat16, see
    `knn_certified`), "faiss" (exact float32 flat index), "torch" (exact float32
    product in row blocks, also on a GPU) or "batched" (the GPU fast path: every image
    of a batch at once, `build_knn_graphs`, on the features' device, a certified fp16
    search on a GPU; one image at a time it is "torch"). All return the same neighbours
    up to exact ties.
    """

    k: int = 10
    backend: str = "certified"
    threshold: float = 0.0
    color_weight: float = 0.0
    color_k: int = 10
    xy_weight: float = 2.0
    device: str = "cpu"
    kind: str = "knn"
    global_weight: float = 0.3
    global_rank: int = 32
    global_kernel: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown graph kind {self.kind!r}; choose from {list(KINDS)}")
        GLOBAL_KERNELS.check(self.global_kernel)
        if self.global_weight < 0 or self.global_rank < 0:
            raise ValueError(
                f"global_weight and global_rank must be >= 0 (got {self.global_weight}, {self.global_rank})"
            )
        if self.backend not in (*BACKENDS, "auto"):  # "auto": resolved by the job (compute.resolve_auto)
            raise ValueError(f"unknown graph backend {self.backend!r}; choose from {[*BACKENDS, 'auto']}")
        if self.k < 1 or self.color_k < 1:
            raise ValueError(f"k and color_k must be >= 1 (got k={self.k}, color_k={self.color_k})")
        # A negative threshold would let negative cosines in as negative weights, and a
        # Laplacian with negative weights is no longer positive semi-definite.
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0 (got {self.threshold})")
        if self.color_weight < 0 or self.xy_weight < 0:
            raise ValueError("color_weight and xy_weight must be >= 0")

    @property
    def builds_in_batch(self) -> bool:
        """Backend "batched" and a graph `build_knn_graphs` builds for many images at once (the
        GPU fast path); otherwise the job builds each image's graph with `build_graph`."""
        return self.backend == "batched" and _batch_refusal(self) is None

    def describe(self) -> dict:
        """The manifest's "graph" section: every field, except new ones at their legacy value.

        A store written before the global term existed has no kind / global_* keys and
        means kind "knn" without global term; leaving those keys out when they hold the
        old behaviour keeps such stores' fingerprints equal to a run with --global-weight 0.
        Likewise a store written before global_kernel existed has no such key: "affine".
        """
        out = asdict(self)
        if self.kind == "dense":
            out["global_weight"] = 0.0  # unused by the dense baseline
        if out["global_weight"] == 0:
            out.pop("global_rank")  # meaningless without the global term
            out.pop("global_kernel")
        for key, legacy in _LEGACY_DEFAULTS.items():
            if out.get(key) == legacy:
                out.pop(key)
        return out


def _batch_refusal(cfg: GraphConfig) -> str | None:
    """Why `build_knn_graphs` cannot build cfg's graphs for a whole batch, or None."""
    if cfg.kind != "knn":
        return f"build_knn_graphs builds kind 'knn', not {cfg.kind!r}; build it per image (build_graph)"
    if cfg.color_weight > 0:
        return "build_knn_graphs has no colour term; build those graphs per image with build_knn_graph"
    return None


def _sparse_from_knn(weights: np.ndarray, idx: np.ndarray, n: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(n), idx.shape[1])
    keep = weights.ravel() > 0
    W = sp.csr_matrix((weights.ravel()[keep].astype(np.float64), (rows[keep], idx.ravel()[keep])), shape=(n, n))
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


def _pair_dots(x: np.ndarray, idx: np.ndarray, block: int = 1024) -> np.ndarray:
    """x_i . x_idx[i, j] in float64 with a fixed summation order (thread-independent)."""
    out = np.empty(idx.shape, dtype=np.float64)
    x64 = x.astype(np.float64)
    for lo in range(0, len(idx), block):
        rows = x64[lo : lo + block]
        out[lo : lo + block] = np.einsum("nd,nkd->nk", rows, x64[idx[lo : lo + block]])
    return out


def _cosine_factor(p: torch.Tensor) -> torch.Tensor:
    """k(c) = c + s: G = [sqrt(s), P], s = max(0, -min_ij p_i . p_j) (exact, in row blocks)."""
    n = p.shape[0]
    lowest = min(float((p[lo : lo + 1024] @ p.T).min()) for lo in range(0, n, 1024))
    shift = torch.full((n, 1), np.sqrt(max(0.0, -lowest)), dtype=p.dtype, device=p.device)
    return torch.cat([shift, p], dim=1)


def _affine_factor(p: torch.Tensor) -> torch.Tensor:
    """k(c) = (1 + c) / 2: G = [1, P] / sqrt(2)."""
    return torch.cat([torch.ones((p.shape[0], 1), dtype=p.dtype, device=p.device), p], dim=1) / np.sqrt(2.0)


# The global term's kernels k: name -> the factor G (N, r') of k(P P^T) = G G^T from the
# projected unit features P (N, r), float64. G G^T must be >= 0 entrywise (the Laplacian
# stays positive semi-definite); the solvers never see more than G (`laplacian`).
GLOBAL_KERNELS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("global kernel")
GLOBAL_KERNELS.add("cosine", _cosine_factor, help="p_i.p_j, the low-rank form of the original max(cos, 0)")
GLOBAL_KERNELS.add("affine", _affine_factor, help="(1 + p_i.p_j) / 2, flatter")


def global_factor(x, rank: int, kernel: str = "affine", seed: int = 0):
    """G (N, r + 1) float32 with G G^T = k(P P^T), P = x projected on its top `rank` directions.

    kernel "cosine": k(c) = c + s, G = [sqrt(s), P], with s = max(0, -min_ij p_i . p_j)
    the smallest constant shift that keeps every pair's weight >= 0 (so the Laplacian
    stays positive semi-definite). The minimum is computed exactly in row blocks, never
    kept: O(N^2 r), a tenth of the kNN search's O(N^2 d). ViT key cosines are positive
    (>= 0.57 on every DAVIS dev frame), so s = 0 there and G G^T = P P^T, the rank-r
    approximation of Deep Spectral Methods' max(x x^T, 0). kernel "affine":
    k(c) = (1 + c) / 2, G = [1, P] / sqrt(2), in [0, 1] without a shift.

    x: (N, d) unit rows, a numpy array (returns numpy) or a torch tensor (returns a tensor
    on its device: the batched GPU path). The directions are the top right singular
    vectors of x (not centred: P P^T is then the best rank-r approximation of the cosine
    matrix x x^T), found by a seeded randomised subspace iteration on <= 1024 evenly
    spaced rows: O(N d r), not the O(N d^2) of an exact SVD. Any orthonormal basis keeps
    |p_i| <= 1, i.e. the global affinity in [0, 1]. rank 0 or >= d keeps x whole.
    """
    GLOBAL_KERNELS.check(kernel)
    is_numpy = not isinstance(x, torch.Tensor)
    t = torch.from_numpy(np.asarray(x)) if is_numpy else x
    t = t.double()
    n, d = t.shape
    if 0 < rank < d:
        rows = t[:: max(1, n // 1024)]
        omega = torch.from_numpy(np.random.default_rng(seed).standard_normal((d, min(d, rank + 8)))).to(t.device)
        q = torch.linalg.qr(rows.T @ (rows @ omega)).Q
        for _ in range(2):  # power iterations: the spectrum of ViT features decays fast, two suffice
            q = torch.linalg.qr(rows.T @ (rows @ q)).Q
        v = torch.linalg.svd(rows @ q, full_matrices=False).Vh
        t = t @ (q @ v.T[:, :rank])
    G = GLOBAL_KERNELS[kernel](t).float()
    return G.numpy() if is_numpy else G


def build_graph(
    feats: np.ndarray, cfg: GraphConfig, *, grid: tuple[int, int], colors: np.ndarray | None = None
) -> Graph:
    """The graph of one image for `cfg.kind`: `build_knn_graph` or the dense baseline `build_dense_graph`."""
    if cfg.kind == "dense":
        return build_dense_graph(feats, grid=grid)
    return build_knn_graph(feats, cfg, grid=grid, colors=colors)


def _unit_rows(feats: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Checked (N, d) features re-normalised to unit rows (cosine is what is measured)."""
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
    return (feats / norms).astype(np.float32)


def build_dense_graph(feats: np.ndarray, *, grid: tuple[int, int]) -> Graph:
    """The affinity of Deep Spectral Methods, W = max(F F^T, 0) / max, over all N^2 pairs.

    The baseline only (kind "dense"): O(N^2) memory. As in the original code, the
    diagonal (self-similarity) is kept; with the solver "generalized" this is their
    eigsh(D - W, M = D, sigma = 0).
    """
    x = _unit_rows(feats, grid)
    n = x.shape[0]
    if n > DENSE_MAX_NODES:
        raise ValueError(f"the dense baseline refuses N={n} > {DENSE_MAX_NODES} patches (O(N^2) memory)")
    x64 = x.astype(np.float64)
    W = np.maximum(x64 @ x64.T, 0.0)
    W /= W.max()
    return Graph(W=sp.csr_matrix(W), grid=(int(grid[0]), int(grid[1])))


def build_knn_graph(
    feats: np.ndarray, cfg: GraphConfig, *, grid: tuple[int, int], colors: np.ndarray | None = None
) -> Graph:
    """Build the symmetric kNN cosine affinity (plus colour and global terms) of one image.

    feats: (h*w, d) patch features, row-major over the grid; cosine similarity is what
    is measured, so rows are re-normalised here (a no-op for L2-normalised input).
    colors: (h*w, 3) in [0, 1] (see `patch_colors`); required when cfg.color_weight > 0.
    The global term (cfg.global_weight > 0) is returned as `Graph.lowrank`, never formed.
    """
    if cfg.kind != "knn":
        raise ValueError(f"build_knn_graph builds kind 'knn', not {cfg.kind!r} (see build_graph)")
    x = _unit_rows(feats, grid)
    h, w = (int(v) for v in grid)
    n = x.shape[0]

    k = cfg.k
    if k >= n:
        logger.warning("k=%d >= number of patches %d; clamping k to %d", k, n, n - 1)
        k = n - 1
    _, idx = knn(x, k, metric="ip", backend=cfg.backend, device=cfg.device)
    # Recompute the kept similarities per pair in float64: BLAS products change in the last
    # bit with the thread count (and backend), and the store must not depend on either.
    sims = _pair_dots(x, idx)
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

    lowrank = global_factor(x, cfg.global_rank, cfg.global_kernel) if cfg.global_weight > 0 else None
    graph = Graph(W=W, grid=(h, w), lowrank=lowrank, global_weight=cfg.global_weight if lowrank is not None else 0.0)
    if logger.isEnabledFor(logging.DEBUG) and num_isolated(graph):
        logger.debug("graph %s: %d isolated patches (degree 0)", (h, w), num_isolated(graph))
    return graph


def build_knn_graphs(
    feats: list, cfg: GraphConfig, *, grids: list[tuple[int, int]], precision: str | None = None
) -> Ell:
    """The kNN graphs of B images at once, as one padded ELL batch (`ell.Ell`).

    feats: per image (h*w, d) arrays or torch tensors; tensors stay on their device (a
    GPU extractor's output never visits the host), arrays go to cfg.device. Same graph
    as `build_knn_graph` per image, up to exact ties, with float64 weights. The search
    (`knn_batched.batched_knn`) runs in `precision`: by default the certified fp16 search on
    a GPU (tensor cores; rows it cannot certify are searched again in float32) and one
    float32 product on a CPU. The global term (cfg.global_weight > 0) rides along as
    `Ell.lowrank`. No colour term: that one is built per image (`build_knn_graph`, then
    `ell.ell_from_graphs`).
    """
    refusal = _batch_refusal(cfg)
    if refusal:
        raise ValueError(refusal)
    if not feats or len(feats) != len(grids):
        raise ValueError(f"need one grid per image and at least one image, got {len(feats)} and {len(grids)}")
    tensors = [f if isinstance(f, torch.Tensor) else torch.from_numpy(np.asarray(f, dtype=np.float32)) for f in feats]
    for t, (h, w) in zip(tensors, grids):
        if t.ndim != 2 or t.shape[0] != h * w or t.shape[0] < 2:
            raise ValueError(f"features of shape {tuple(t.shape)} do not fit grid {(h, w)} (need >= 2 patches)")
    device = tensors[0].device if isinstance(feats[0], torch.Tensor) else resolve_device(cfg.device)
    n_valid = [t.shape[0] for t in tensors]
    n, d = max(n_valid), tensors[0].shape[1]
    padded = torch.zeros((len(tensors), n, d), dtype=torch.float32, device=device)
    for b, t in enumerate(tensors):
        padded[b, : t.shape[0]] = t.to(device, torch.float32)
    # k clamps to the smallest image's size like build_knn_graph's (missing slots are empty)
    k = min(cfg.k, n - 1)
    precision = precision or ("fp16" if device.type == "cuda" else "fp32")
    idx, sims = batched_knn(padded, k, n_valid=n_valid, device=str(device), precision=precision)
    ell = ell_graph(idx, sims, n_valid=n_valid, threshold=cfg.threshold)
    if cfg.global_weight > 0:
        factors = []
        for b, nb in enumerate(n_valid):  # small per-image work (a few (N, r) products), on the device
            x = padded[b, :nb]
            x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
            factors.append(global_factor(x, cfg.global_rank, cfg.global_kernel))
        attach_global_term(ell, factors, cfg.global_weight)
    return ell


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
