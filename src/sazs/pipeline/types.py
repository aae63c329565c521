"""What the stages hand each other: an image's `Graph` and its `Spectrum`.

The extractor (`sazs.features.extractors`) produces `Features`, the graph stage (`graph`) turns them into
a `Graph`, the solvers (`spectral`, `batched_solver`) into a `Spectrum`. Batches of graphs
travel as `ell.Ell`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass
class Graph:
    """Symmetric non-negative affinity over the h*w patches (row-major): W + the global term.

    W: sparse part, zero diagonal (kind "knn"; the dense baseline keeps DSM's diagonal).
    lowrank: None, or G (N, r) with the global affinity g (G G^T - diag(G G^T)):
    G = [sqrt(s), P] for the kernel "cosine", [1, P] / sqrt(2) for "affine"
    (`graph.global_factor`). G G^T >= 0 entrywise either way, so the whole affinity stays
    non-negative. Its degrees, products and dense form are the graph operator's
    (`laplacian.degrees`, `laplacian.normalized_operator`, `laplacian.dense_affinity`).
    """

    W: sp.csr_matrix
    grid: tuple[int, int]
    lowrank: np.ndarray | None = None
    global_weight: float = 0.0

    @property
    def num_nodes(self) -> int:
        return self.W.shape[0]


@dataclass
class Spectrum:
    eigvals: np.ndarray  # (K,) float64 ascending
    eigvecs: np.ndarray  # (N, K) float32, orthonormal columns
    residuals: np.ndarray  # (K,) float64, ||L u - lambda u||_2 of the returned vectors
    converged: bool  # all residuals <= residual_tol
    iterations: int | None  # eigsh: operator applications (mat-vecs); LOBPCG: iterations
    solver: str
    info: dict = field(default_factory=dict)  # solve seconds, solver warnings, ...
