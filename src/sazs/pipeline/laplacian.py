"""The graph operator: the affinity W of a graph (or of a padded batch of graphs) as the
solvers see it, the normalised adjacency A = D^-1/2 W D^-1/2, and the sign convention of
its eigenvectors (`fix_signs`). Every solver and every degree goes through this module.

W = W_s + g (G G^T - diag(G G^T)): the sparse kNN part W_s (zero diagonal, except DSM's
dense baseline) plus the *global term*, g times a rank-r product without its diagonal,
kept as its factor G (N, r) (`types.Graph.lowrank`; built by `graph.global_factor`).
The global term is never formed. Its row sums are g (G (G^T 1) - |G_i|^2) and its
product with a block X is g G (G^T X) - g diag(|G_i|^2) X, both O(N r) per column
(`_global_degrees`, `NormalizedAffinity.__matmul__`). D counts both parts.

The same code serves one graph (the kNN part a CSR matrix, G (N, r): `normalized_operator`)
and a padded batch of B graphs (the kNN part an `ell_operator.EllOperator`, G (B, N, r):
`batch_operator`), on numpy or cupy (the array module `xp`): the global term's products are
matmuls over the last two axes, so image b of a batch gets what it gets alone.

Isolated nodes (degree 0) get D^-1/2 = 0: their rows of A are zero and their rows of
L = I - A are rows of the identity (eigenvalue 1, never among the smallest). Padded rows of
a batch are isolated nodes.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .ell import Ell, ell_from_csr, to_xp
from .ell_operator import EllOperator
from .types import Graph


def _row_norms2(G, xp):
    """|G_i|^2 for every row of G (..., N, r)."""
    return xp.einsum("...ij,...ij->...i", G, G)


def _global_degrees(G, xp):
    """Row sums of G G^T - diag(G G^T) in O(N r): G (G^T 1) - |G_i|^2, for G (..., N, r)."""
    return (G @ G.sum(axis=-2)[..., None])[..., 0] - _row_norms2(G, xp)


def _with_global(d_sparse, G, weight: float, xp):
    """Degrees of the whole affinity from those of its sparse part (G None: no global term)."""
    return d_sparse if G is None else d_sparse + weight * _global_degrees(G, xp)


def _inv_sqrt(d, xp):
    """D^-1/2 with 0 for isolated (and padded) nodes."""
    return xp.where(d > 0, 1.0 / xp.sqrt(xp.where(d > 0, d, 1.0)), 0.0)


def _pick(a, sel):
    return None if a is None else a[sel]


def _factor(graph: Graph) -> np.ndarray | None:
    """The global term's factor G in float64, or None (no global term)."""
    if graph.lowrank is None or graph.global_weight == 0:
        return None
    return graph.lowrank.astype(np.float64)


class NormalizedAffinity:
    """A = D^-1/2 (W_s + g (G G^T - diag(G G^T))) D^-1/2, applied without forming it.

    sparse: D^-1/2 W_s D^-1/2, a CSR matrix (one graph) or an `EllOperator` (a batch);
    H = D^-1/2 G, (N, r) or (B, N, r), or None without a global term; diag = g |H_i|^2.
    A X = sparse X + g H (H^T X) - diag X costs O(nnz + N r) per column. degrees: the D
    it was normalised with (float64, what the solvers start from: sqrt(d) is the trivial
    eigenvector). Supports what the solvers use: `@` (and calling it), `astype`, `take`
    (images of a batch), `shape`, `toarray` (one graph; dense references only).
    """

    def __init__(self, sparse, H=None, weight: float = 0.0, *, degrees=None, diag=None, xp=np):
        self.sparse, self.H, self.weight, self.degrees, self.xp = sparse, H, float(weight), degrees, xp
        self.diag = diag if diag is not None or H is None else self.weight * _row_norms2(H, xp)
        self.shape, self.dtype = sparse.shape, sparse.dtype

    def astype(self, dtype, **sparse_options) -> NormalizedAffinity:
        """A copy in `dtype` (degrees stay float64); options go to the sparse part's astype."""
        return NormalizedAffinity(
            self.sparse.astype(dtype, **sparse_options),
            None if self.H is None else self.H.astype(dtype),
            self.weight,
            degrees=self.degrees,
            diag=None if self.H is None else self.diag.astype(dtype),
            xp=self.xp,
        )

    def take(self, sel) -> NormalizedAffinity:
        """The images `sel` of a batch."""
        return NormalizedAffinity(
            self.sparse.take(sel),
            _pick(self.H, sel),
            self.weight,
            degrees=_pick(self.degrees, sel),
            diag=_pick(self.diag, sel),
            xp=self.xp,
        )

    def __matmul__(self, X):
        Y = self.sparse @ X
        if self.H is None:
            return Y
        diag = self.diag if X.ndim == self.diag.ndim else self.diag[..., None]
        return Y + self.weight * (self.H @ (self.xp.swapaxes(self.H, -1, -2) @ X)) - diag * X

    __call__ = __matmul__

    def toarray(self) -> np.ndarray:
        A = self.sparse.toarray()
        if self.H is None:
            return A
        return A + self.weight * (self.H @ self.H.T) - np.diag(self.diag)


def _normalize_csr(W: sp.csr_matrix, dinv: np.ndarray) -> sp.csr_matrix:
    coo = W.tocoo()
    # (inv_i * inv_j) first: the product commutes exactly, so A stays bitwise symmetric.
    return sp.csr_matrix((coo.data * (dinv[coo.row] * dinv[coo.col]), (coo.row, coo.col)), shape=W.shape)


def _csr_row_sums(W: sp.csr_matrix) -> np.ndarray:
    return np.asarray(W.sum(axis=1), dtype=np.float64).ravel()


def normalized_adjacency(W: sp.spmatrix) -> sp.csr_matrix:
    """A = D^-1/2 W D^-1/2 of a sparse affinity alone (no global term), float64 CSR."""
    W = sp.csr_matrix(W, dtype=np.float64)
    return _normalize_csr(W, _inv_sqrt(_csr_row_sums(W), np))


def degrees(graph: Graph) -> np.ndarray:
    """Row sums of the whole affinity of one graph (float64), the global term's in O(N r)."""
    W = sp.csr_matrix(graph.W, dtype=np.float64)
    return _with_global(_csr_row_sums(W), _factor(graph), graph.global_weight, np)


def num_isolated(graph: Graph) -> int:
    """Nodes of degree 0 (every similarity <= the threshold, and no global term)."""
    return int(np.count_nonzero(degrees(graph) == 0))


def dense_affinity(graph: Graph) -> np.ndarray:
    """The whole affinity of one graph as a dense (N, N) float64 array (tests and small references only)."""
    W = sp.csr_matrix(graph.W, dtype=np.float64)
    G = _factor(graph)
    # the operator's own formula with D = I: W_s + g G G^T - g diag(|G_i|^2)
    return NormalizedAffinity(W, G, graph.global_weight if G is not None else 0.0).toarray()


def normalized_operator(graph: Graph) -> NormalizedAffinity:
    """A = D^-1/2 W D^-1/2 of one graph (numpy), with its global term if it has one."""
    W = sp.csr_matrix(graph.W, dtype=np.float64)
    G = _factor(graph)
    d = _with_global(_csr_row_sums(W), G, graph.global_weight, np)
    dinv = _inv_sqrt(d, np)
    H = None if G is None else dinv[:, None] * G
    return NormalizedAffinity(_normalize_csr(W, dinv), H, graph.global_weight if H is not None else 0.0, degrees=d)


def batch_operator(ell: Ell, xp) -> tuple[NormalizedAffinity, object]:
    """(A of every graph of a padded ELL batch on array module xp, valid (B, N) real rows).

    A's sparse part is an unfused float64 `EllOperator` (the plain product, the reference
    a solver's fused one is checked against); A.degrees is D (B, N), 0 on padded rows.
    """
    idx, w = to_xp(ell.idx, xp, xp.int64), to_xp(ell.w, xp, xp.float64)
    B, N, _ = idx.shape
    nv = to_xp(ell.n_valid, xp, xp.int64)
    valid = xp.arange(N)[None, :] < nv[:, None]
    if not bool(xp.isfinite(w).all()):
        raise ValueError("graph weights contain NaN/Inf")
    if bool((w < 0).any()):
        raise ValueError("graph weights must be non-negative")
    w = w * valid[:, :, None]
    global_term = ell.lowrank is not None and ell.global_weight > 0
    G = to_xp(ell.lowrank, xp, xp.float64) * valid[:, :, None] if global_term else None
    d = _with_global(w.sum(axis=2), G, ell.global_weight, xp)
    dinv = _inv_sqrt(d, xp)
    a = w * (dinv[:, :, None] * dinv[xp.arange(B)[:, None, None], idx])
    H = None if G is None else dinv[:, :, None] * G
    sparse = EllOperator(idx, a, xp, fused=False)
    return NormalizedAffinity(sparse, H, ell.global_weight if H is not None else 0.0, degrees=d, xp=xp), valid


def as_batch(A: NormalizedAffinity) -> NormalizedAffinity:
    """One graph's operator (numpy) as a batch of one, its sparse part an unfused `EllOperator`."""
    ell = ell_from_csr([A.sparse])
    sparse = EllOperator(ell.idx, ell.w, np, fused=False)
    one = (None,)  # a[None]: a new leading axis of length 1
    return NormalizedAffinity(sparse, _pick(A.H, one), A.weight, degrees=_pick(A.degrees, one), diag=_pick(A.diag, one))


def fix_signs(u, xp=np):
    """Flip each column of u (N, K), or of every image of a batch (B, N, K), so that its
    positive part is the minority of entries; on any array module (numpy, cupy).

    Entries with |u| <= 1e-6 max|u| count as zero (solver noise on isolated nodes, padded
    rows of a batch). A column of one sign (the trivial sqrt(d) vector) is made
    non-negative instead, as in Deep Spectral Methods, rather than all-negative. Equal
    counts: the entry of largest |u| (first such) is made positive.
    """
    ax = u.ndim - 2  # the rows
    a = xp.abs(u)
    eps = 1e-6 * a.max(axis=ax, keepdims=True)
    pos, neg = (u > eps).sum(axis=ax), (u < -eps).sum(axis=ax)
    at_max = xp.squeeze(xp.take_along_axis(u, xp.expand_dims(xp.argmax(a, axis=ax), ax), axis=ax), axis=ax)
    flip = xp.where((pos == 0) | (neg == 0), pos == 0, xp.where(pos != neg, pos > neg, at_max < 0))
    return xp.where(xp.expand_dims(flip, ax), -u, u)
