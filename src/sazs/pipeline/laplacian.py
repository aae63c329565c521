"""The normalised graph Laplacian L = I - D^-1/2 W D^-1/2 as the solvers see it, and the sign
convention of its eigenvectors (`fix_signs`), shared by every solver.

W is the graph's sparse affinity plus its global low-rank term (`types.Graph`): the
solvers then see A = D^-1/2 W D^-1/2 as a `NormalizedAffinity`, a sparse matrix plus
a rank-r product applied in O(N r), never as an N x N array.

Isolated nodes (degree 0) get D^-1/2 = 0: their rows of A = D^-1/2 W D^-1/2 are zero
and their rows of L are rows of the identity (eigenvalue 1, never among the smallest).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .types import Graph


def _inv_sqrt_degrees(W: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(W.sum(axis=1), dtype=np.float64).ravel()
    inv = np.zeros_like(d)
    inv[d > 0] = 1.0 / np.sqrt(d[d > 0])
    return d, inv


def normalized_adjacency(W: sp.spmatrix) -> sp.csr_matrix:
    """A = D^-1/2 W D^-1/2 in float64 (D^-1/2 = 0 for isolated nodes)."""
    W = sp.csr_matrix(W, dtype=np.float64)
    _, inv = _inv_sqrt_degrees(W)
    coo = W.tocoo()
    # (inv_i * inv_j) first: the product commutes exactly, so A stays bitwise symmetric.
    data = coo.data * (inv[coo.row] * inv[coo.col])
    return sp.csr_matrix((data, (coo.row, coo.col)), shape=W.shape)


class NormalizedAffinity:
    """A = D^-1/2 (W_s + g (G G^T - diag(G G^T))) D^-1/2, applied without forming it.

    sparse: D^-1/2 W_s D^-1/2 (CSR); H = D^-1/2 G (N, r); diag = g |H_i|^2. The product
    A X = sparse X + g H (H^T X) - diag X costs O(nnz + N r) per column. D counts the
    global term too (`Graph.degrees`). Supports what the solvers use: `@`, `astype`,
    `shape`, `toarray` (dense references only).
    """

    def __init__(self, sparse: sp.csr_matrix, H: np.ndarray, weight: float):
        self.sparse, self.H, self.weight = sparse, H, float(weight)
        self.diag = self.weight * np.einsum("ij,ij->i", H, H)
        self.shape, self.dtype = sparse.shape, sparse.dtype

    def astype(self, dtype) -> NormalizedAffinity:
        out = NormalizedAffinity(self.sparse.astype(dtype), self.H.astype(dtype), self.weight)
        out.diag = self.diag.astype(dtype)
        return out

    def __matmul__(self, X: np.ndarray) -> np.ndarray:
        diag = self.diag if X.ndim == 1 else self.diag[:, None]
        return self.sparse @ X + self.weight * (self.H @ (self.H.T @ X)) - diag * X

    def toarray(self) -> np.ndarray:
        return self.sparse.toarray() + self.weight * (self.H @ self.H.T) - np.diag(self.diag)


def normalized_operator(graph: Graph):
    """A = D^-1/2 W D^-1/2 of a graph: a CSR matrix, or a `NormalizedAffinity` with its global term."""
    if graph.lowrank is None or graph.global_weight == 0:
        return normalized_adjacency(graph.W)
    d = graph.degrees
    inv = np.zeros_like(d)
    inv[d > 0] = 1.0 / np.sqrt(d[d > 0])
    coo = sp.csr_matrix(graph.W, dtype=np.float64).tocoo()
    sparse = sp.csr_matrix((coo.data * (inv[coo.row] * inv[coo.col]), (coo.row, coo.col)), shape=coo.shape)
    return NormalizedAffinity(sparse, inv[:, None] * graph.lowrank.astype(np.float64), graph.global_weight)


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
