"""B graphs as one padded ELL batch (`Ell`): building it, and reading images back.

Row i of image b has m (neighbour, weight) slots; unused slots point at i itself with
weight 0, so every product with the batch is a gather plus a sum (`ell_operator`).
Images of different sizes share a batch by padding to a common N with a per-image count
`n_valid`: padded nodes get no edges, degree 0, and stay out of every spectrum.

The arrays are torch tensors (the batched kNN, `ell_graph`), numpy arrays (graphs packed
on the host, `ell_from_graphs` / `ell_from_csr`) or cupy arrays; `to_xp` and `to_host`
move them between array modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch


@dataclass
class Ell:
    """B symmetric graphs in padded ELL form (torch tensors or xp arrays).

    idx (B, N, m) int64 neighbour indices (unused slots: the row itself), w (B, N, m)
    float64 weights (unused slots: 0), n_valid (B,) int64 real node counts. lowrank:
    None, or the global term's factors G (B, N, r) (padded rows 0), which add
    global_weight (G G^T - diag(G G^T)) to each W (see `types.Graph`).
    """

    idx: object
    w: object
    n_valid: object
    lowrank: object = None
    global_weight: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.idx.shape)


def as_torch(x, device):
    """A tensor or array as a torch tensor on `device` (None: where it is)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device)


def valid_mask(n_valid, B: int, N: int, device):
    """(mask (B, N) bool of the real rows, counts (B,)) of a padded batch; n_valid None: all rows."""
    if n_valid is None:
        return torch.ones((B, N), dtype=torch.bool, device=device), torch.full((B,), N, device=device)
    nv = as_torch(n_valid, device).long()
    if nv.shape != (B,) or int(nv.min()) < 2 or int(nv.max()) > N:
        raise ValueError(f"n_valid must be (B,)={B} counts in [2, {N}], got {nv.tolist()}")
    return torch.arange(N, device=device)[None, :] < nv[:, None], nv


def to_xp(a, xp, dtype=None):
    """torch tensor or array -> xp array (DLPack for torch on a GPU, no host round trip)."""
    if hasattr(a, "detach"):  # torch
        a = a.detach()
        a = a.cpu().numpy() if xp is np else xp.from_dlpack(a)
    out = xp.asarray(a)
    return out.astype(dtype, copy=False) if dtype is not None else out


def to_host(a) -> np.ndarray:
    """A numpy or cupy array as a numpy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def ell_graph(idx, sims, *, n_valid=None, threshold: float = 0.0) -> Ell:
    """Symmetrised kNN affinity W = max(W, W^T), W_ij = sims_ij if > threshold, as ELL.

    The same graph as `build_knn_graph(..., GraphConfig(k, threshold))` per image
    (no colour term). Runs in torch on the tensors' device; the width m is the largest
    row degree in the batch (k plus the one-sided in-edges of the busiest hub).
    """
    idx, sims = as_torch(idx, None), as_torch(sims, None)
    dev = idx.device
    sims = sims.to(dev, torch.float64)
    B, N, k = idx.shape
    _, nv = valid_mask(n_valid, B, N, dev)
    keep = (idx >= 0) & (sims > threshold)
    b = torch.arange(B, device=dev)[:, None, None].expand(B, N, k)[keep]
    i = torch.arange(N, device=dev)[None, :, None].expand(B, N, k)[keep]
    j, w = idx[keep], sims[keep]
    # both directions, then max over duplicate (b, row, col) keys
    rows, cols, ws, bs = torch.cat([i, j]), torch.cat([j, i]), torch.cat([w, w]), torch.cat([b, b])
    key = (bs * N + rows) * N + cols
    ukey, inv = torch.unique(key, sorted=True, return_inverse=True)
    uw = torch.full(ukey.shape, -torch.inf, dtype=torch.float64, device=dev).scatter_reduce(0, inv, ws, "amax")
    urow = ukey // N  # b * N + row
    ucol = ukey % N
    counts = torch.bincount(urow, minlength=B * N)
    m = max(1, int(counts.max()) if len(counts) else 1)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(ukey), device=dev) - start[urow]
    out_idx = torch.arange(N, device=dev).repeat(B, 1).reshape(B * N, 1).expand(B * N, m).clone()
    out_w = torch.zeros((B * N, m), dtype=torch.float64, device=dev)
    out_idx[urow, slot] = ucol
    out_w[urow, slot] = uw
    return Ell(out_idx.reshape(B, N, m), out_w.reshape(B, N, m), nv.clone())


def ell_from_graphs(graphs: list, n: int | None = None) -> Ell:
    """Pack per-image `types.Graph`s (sparse part and global term) into one ELL (numpy)."""
    ell = ell_from_csr([g.W for g in graphs], n)
    with_global = [g for g in graphs if g.lowrank is not None and g.global_weight > 0]
    if with_global:
        weights = {g.global_weight for g in with_global}
        if len(weights) > 1:
            raise ValueError(f"graphs of one batch need one global weight, got {sorted(weights)}")
        factors = [g.lowrank if g.lowrank is not None and g.global_weight > 0 else None for g in graphs]
        attach_global_term(ell, factors, weights.pop())
    return ell


def attach_global_term(ell: Ell, factors: list, weight: float) -> None:
    """Set ell.lowrank to the images' global factors G (n_b, r_b) padded into one (B, N, r)
    float32 array, and ell.global_weight to their weight (one for the batch).

    factors: per image a numpy array, a torch tensor (then all are, and the batch stays on
    their device) or None (no global term for that image). Padded rows and columns are 0:
    they add nothing to G G^T.
    """
    B, N, _ = ell.shape
    present = [G for G in factors if G is not None]
    r = max(G.shape[1] for G in present)
    if isinstance(present[0], torch.Tensor):
        out = torch.zeros((B, N, r), dtype=torch.float32, device=present[0].device)
    else:
        out = np.zeros((B, N, r), dtype=np.float32)
    for b, G in enumerate(factors):
        if G is not None:
            out[b, : G.shape[0], : G.shape[1]] = G
    ell.lowrank, ell.global_weight = out, weight


def ell_from_csr(mats: list[sp.spmatrix], n: int | None = None) -> Ell:
    """Pack per-image sparse symmetric matrices (e.g. `Graph.W`, any weights) into one ELL (numpy)."""
    sizes = [m.shape[0] for m in mats]
    n = n or max(sizes)
    if max(sizes) > n:
        raise ValueError(f"graph of {max(sizes)} nodes does not fit N={n}")
    mats = [sp.csr_matrix(m, dtype=np.float64) for m in mats]
    width = max(1, max(int(np.diff(m.indptr).max()) if m.nnz else 1 for m in mats))
    B = len(mats)
    idx = np.broadcast_to(np.arange(n)[None, :, None], (B, n, width)).copy()
    w = np.zeros((B, n, width))
    for b, m in enumerate(mats):  # host-side packing only; the solver has no per-image loop
        counts = np.diff(m.indptr)
        rows = np.repeat(np.arange(m.shape[0]), counts)
        slot = np.arange(m.nnz) - m.indptr[rows]
        idx[b, rows, slot], w[b, rows, slot] = m.indices, m.data
    return Ell(idx, w, np.asarray(sizes, dtype=np.int64))


def ell_to_csr(ell: Ell, b: int) -> sp.csr_matrix:
    """Image b of an ELL batch as an (n_valid, n_valid) CSR matrix (host; for tests and checks)."""
    n = int(to_host(to_xp(ell.n_valid, np))[b])
    idx, w = to_xp(ell.idx, np)[b, :n], to_xp(ell.w, np)[b, :n]
    rows = np.repeat(np.arange(n), idx.shape[1])
    keep = w.ravel() != 0
    return sp.csr_matrix((w.ravel()[keep], (rows[keep], idx.ravel()[keep])), shape=(n, n))
