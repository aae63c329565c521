"""Batched kNN graphs and a batched eigensolver: many images' spectra per call.

A GPU only beats SciPy on one CPU core at these graph sizes (N ~ 1,000-5,000 patches)
when it works on many graphs at once (issue 7): one (B, N, N) product + top-k for the
kNN, then Chebyshev-filtered subspace iteration on all B graphs together, stored as a
padded ELL array (B, N, m): row i of image b has m (neighbour, weight) slots, unused
slots point at i itself with weight 0, so every product is a gather plus a sum.

Images of different sizes share a batch by padding to a common N with a per-image
count `n_valid`: padded nodes get no edges, degree 0, D^-1/2 = 0, and start with zero
rows in the iteration block, so they stay exactly zero and never enter a spectrum.

Array modules: the kNN runs in torch (CPU or CUDA); the solver takes `xp` = numpy on
the CPU or cupy on a GPU (the tests run the exact GPU code on numpy). Semantics match
the per-image path: `build_knn_graph` (threshold 0, no colour term) for the graph, and
`spectral.laplacian_eigs` (ascending order, `fix_signs`, float32 orthonormal vectors,
float64 residuals ||L u - lambda u||) for the spectra.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .spectral import Spectrum

logger = logging.getLogger(__name__)

_KNN_BYTES = 1 << 30  # score block per kNN chunk (images x N x N), ~1 GiB
_RERANK = 16  # extra candidates re-ranked exactly after a bf16/fp16 ranking product
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# --- batched kNN (torch) --------------------------------------------------------------


def _as_torch(x, device):
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device)


def _valid_mask(n_valid, B: int, N: int, device):
    import torch

    if n_valid is None:
        return torch.ones((B, N), dtype=torch.bool, device=device), torch.full((B,), N, device=device)
    nv = _as_torch(n_valid, device).long()
    if nv.shape != (B,) or int(nv.min()) < 2 or int(nv.max()) > N:
        raise ValueError(f"n_valid must be (B,)={B} counts in [2, {N}], got {nv.tolist()}")
    return torch.arange(N, device=device)[None, :] < nv[:, None], nv


def batched_knn(
    feats, k: int, *, n_valid=None, device: str = "cpu", precision: str = "fp32", stats: dict | None = None
):
    """k nearest other patches (by cosine) of each of B images at once, exactly.

    feats: (B, N, d) array or tensor; rows past n_valid[b] are padding and ignored.
    Returns (idx, sims), each (B, N, k) on `device`: idx int64 (best first), sims the
    float64 cosines x_i . x_j recomputed per pair from the float32 unit rows, exactly
    as `build_knn_graph` computes its weights. Slots without a neighbour (padded rows, or
    images with n_valid[b] <= k) hold idx = -1, sims = 0. Rows are re-normalised here.

    precision "fp32": one float32 ranking product (exact up to float32 ties). "fp16" /
    "bf16" (tensor cores on a GPU): a certified search, like `graph.knn_certified` on the
    CPU. The low-precision product ranks; its best k + 16 candidates are re-ranked with
    float64 dot products; a row is *certified* when its exact k-th similarity beats the
    best non-candidate's low-precision score by more than a rounding-error bound, which
    proves that no non-candidate belongs to the top k. Rows that are not certified are
    searched again with a float32 product. The answer is the float32 one (up to ties);
    `stats`, if given, receives the counts of rows and of rows searched again.
    """
    import torch

    from .graph import _torch_device

    if precision not in _TORCH_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(_TORCH_DTYPES)}")
    dev = _torch_device(device)
    x = _as_torch(feats, dev).float()
    if x.ndim != 3:
        raise ValueError(f"feats must be (B, N, d), got shape {tuple(x.shape)}")
    B, N, d = x.shape
    valid, _ = _valid_mask(n_valid, B, N, dev)
    if k < 1 or k >= N:
        raise ValueError(f"k must be in [1, {N - 1}] for N={N}, got {k}")
    norms = torch.linalg.vector_norm(x, dim=2, keepdim=True)
    if not torch.isfinite(x[valid]).all() or (norms[valid] == 0).any():
        raise ValueError("feats contain NaN/Inf or all-zero rows among the valid patches")
    x = torch.where(valid[..., None], x / norms.clamp_min(1e-30), 0.0)
    dtype = getattr(torch, _TORCH_DTYPES[precision])
    eye = torch.eye(N, dtype=torch.bool, device=dev)
    chunk = max(1, _KNN_BYTES // (N * N * 4))
    if dtype == torch.float32:
        idx = torch.empty((B, N, k), dtype=torch.int64, device=dev)
        for s in range(0, B, chunk):
            e = min(B, s + chunk)
            with _full_precision_reductions():
                scores = torch.bmm(x[s:e], x[s:e].transpose(1, 2))
            idx[s:e] = _top(scores, eye | ~valid[s:e, None, :], valid[s:e], k)[1]
        if stats is not None:
            stats.update(rows=int(valid.sum()), searched_again=0)
        return idx, _pair_dots(x, idx)

    # Low precision ranks r_ij = (x_i - mu) . (x_j - mu) + mu . x_j = x_i . x_j - c_i, with mu
    # the image's mean feature and c_i = mu . x_i - mu . mu constant along the row: both
    # factors are small (an image's patches are alike), and so are their rounding errors.
    mu = x.sum(1, keepdim=True) / valid.sum(1)[:, None, None]
    a = torch.where(valid[..., None], x - mu, 0.0)
    al = a.to(dtype)
    col = (x @ mu.transpose(1, 2)).transpose(1, 2)  # (B, 1, N) float32: mu . x_j
    c = min(N - 1, k + _RERANK)
    idx = torch.empty((B, N, c), dtype=torch.int64, device=dev)
    best_other = torch.empty((B, N), dtype=torch.float32, device=dev)
    for s in range(0, B, chunk):
        e = min(B, s + chunk)
        with _full_precision_reductions():  # the bound below assumes fp32 accumulation
            scores = torch.bmm(al[s:e], al[s:e].transpose(1, 2)).float() + col[s:e]
        vals, ids = _top(scores, eye | ~valid[s:e, None, :], valid[s:e], c + 1)  # c + 1 <= N
        idx[s:e] = ids[..., :c]
        best_other[s:e] = vals[..., c]  # the best score outside the candidates (-inf: there is none)
    sims = _pair_dots(x, idx)
    sims, order = torch.topk(torch.where(idx >= 0, sims, -torch.inf), k, dim=2, sorted=True)
    idx = torch.where(torch.isfinite(sims), torch.gather(idx, 2, order), -1)
    sims = torch.where(idx >= 0, sims, 0.0)

    # Certificate. Rounding a, b to the low precision (unit roundoff u), the product's fp32
    # accumulation and its rounding back to that precision move r_ij by at most
    # (3u + 2 d 2^-24) |a_i| |a_j| + 2 d 2^-24 |mu| |x_j| (first order); doubled for safety.
    u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    eps32 = 2.0 * d * 2.0**-24
    an = torch.linalg.vector_norm(a, dim=2).double()  # (B, N)
    amax = an.max(dim=1, keepdim=True).values
    bound = 2.0 * ((3 * u + eps32) * an * amax + eps32 * torch.linalg.vector_norm(mu, dim=2).double())
    c_i = (x.double() @ mu.double().transpose(1, 2))[..., 0] - (mu.double() * mu.double()).sum(2)
    kth = sims[..., k - 1] - c_i  # exact k-th similarity, in the ranking's units
    full = (idx >= 0).all(dim=2)
    certified = ~torch.isfinite(best_other) | (full & (kth - best_other.double() > bound))
    redo = valid & ~certified
    if bool(redo.any()):
        _search_again(x, valid, k, redo, idx, sims)
    if stats is not None:
        stats.update(rows=int(valid.sum()), searched_again=int(redo.sum()))
    return idx, sims


@contextlib.contextmanager
def _full_precision_reductions():
    """No TF32 for float32 products, and no fp16/bf16 accumulation of split-K fp16/bf16
    products: the certificate's bound assumes fp32 accumulation, and the float32 search
    must be float32 (torch's flags are global; they are restored on the way out)."""
    import torch

    m = torch.backends.cuda.matmul
    names = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    saved = [getattr(m, n) for n in names]
    for n in names:
        setattr(m, n, False)
    try:
        yield
    finally:
        for n, v in zip(names, saved):
            setattr(m, n, v)


def _top(scores, exclude, row_valid, k: int):
    """Top k of (b, R, N) scores outside `exclude` (broadcastable bool): (vals, ids), ids -1 where none."""
    import torch

    scores.masked_fill_(exclude, -torch.inf)
    vals, ids = torch.topk(scores, k, dim=2, largest=True, sorted=True)
    return vals, torch.where(torch.isfinite(vals) & row_valid[..., None], ids, -1)


def _search_again(x, valid, k: int, redo, idx, sims) -> None:
    """Exact float32 search of the rows `redo` (B, N) bool, image by image, into idx/sims."""
    import torch

    for b in torch.nonzero(redo.any(dim=1)).flatten().tolist():
        rows = torch.nonzero(redo[b]).flatten()
        with _full_precision_reductions():
            scores = (x[b, rows] @ x[b].T)[None]  # (1, R, N)
        scores[0, torch.arange(len(rows), device=x.device), rows] = -torch.inf  # never itself
        _, ids = _top(scores, ~valid[b][None, None, :], torch.ones_like(rows, dtype=torch.bool)[None], k)
        xj = x[b][ids[0].clamp_min(0)].double()  # (R, k, d)
        dots = torch.where(ids[0] >= 0, torch.einsum("rd,rkd->rk", x[b, rows].double(), xj), -torch.inf)
        dots, order = torch.sort(dots, dim=1, descending=True, stable=True)  # best first, as the other rows
        ids = torch.gather(ids[0], 1, order)
        idx[b, rows], sims[b, rows] = ids, torch.where(ids >= 0, dots, 0.0)


def _pair_dots(x, idx, block_bytes: int = 1 << 28):
    """float64 x_i . x_idx for (B, N, k) idx (-1: 0), in row blocks to bound memory."""
    import torch

    B, N, k = idx.shape
    rows = max(1, block_bytes // (8 * k * x.shape[-1]))
    xf, out = x.reshape(B * N, -1), torch.zeros((B * N, k), dtype=torch.float64, device=x.device)
    flat = torch.where(idx >= 0, idx + (torch.arange(B, device=x.device) * N)[:, None, None], -1).reshape(B * N, k)
    for s in range(0, B * N, rows):
        j = flat[s : s + rows]
        xi = xf[s : s + rows].double()
        xj = xf[j.clamp_min(0)].double()
        out[s : s + rows] = torch.where(j >= 0, torch.einsum("nd,nkd->nk", xi, xj), 0.0)
    return out.reshape(B, N, k)


@dataclass
class Ell:
    """B symmetric graphs in padded ELL form (torch tensors or xp arrays).

    idx (B, N, m) int64 neighbour indices (unused slots: the row itself), w (B, N, m)
    float64 weights (unused slots: 0), n_valid (B,) int64 real node counts. lowrank:
    None, or the global term's factors G (B, N, r) (padded rows 0), which add
    global_weight (G G^T - diag(G G^T)) to each W (see `graph.Graph`).
    """

    idx: object
    w: object
    n_valid: object
    lowrank: object = None
    global_weight: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.idx.shape)


def ell_graph(idx, sims, *, n_valid=None, threshold: float = 0.0) -> Ell:
    """Symmetrised kNN affinity W = max(W, W^T), W_ij = sims_ij if > threshold, as ELL.

    The same graph as `build_knn_graph(..., GraphConfig(k, threshold))` per image
    (no colour term). Runs in torch on the tensors' device; the width m is the largest
    row degree in the batch (k plus the one-sided in-edges of the busiest hub).
    """
    import torch

    idx, sims = _as_torch(idx, None), _as_torch(sims, None)
    dev = idx.device
    sims = sims.to(dev, torch.float64)
    B, N, k = idx.shape
    _, nv = _valid_mask(n_valid, B, N, dev)
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
    """Pack per-image `graph.Graph`s (sparse part and global term) into one ELL (numpy).

    All graphs with a global term must share its weight (one job's graphs do)."""
    ell = ell_from_csr([g.W for g in graphs], n)
    weights = {g.global_weight for g in graphs if g.lowrank is not None and g.global_weight > 0}
    if len(weights) > 1:
        raise ValueError(f"graphs of one batch need one global weight, got {sorted(weights)}")
    if weights:
        B, N, _ = ell.shape
        r = max(g.lowrank.shape[1] for g in graphs if g.lowrank is not None)
        ell.lowrank = np.zeros((B, N, r), dtype=np.float32)
        for b, g in enumerate(graphs):
            if g.lowrank is not None and g.global_weight > 0:
                ell.lowrank[b, : g.lowrank.shape[0], : g.lowrank.shape[1]] = g.lowrank
        ell.global_weight = weights.pop()
    return ell


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


# --- batched solver (numpy / cupy) ----------------------------------------------------


def _to_xp(a, xp, dtype=None):
    """torch tensor or array -> xp array (DLPack for torch on a GPU, no host round trip)."""
    if hasattr(a, "detach"):  # torch
        a = a.detach()
        a = a.cpu().numpy() if xp is np else xp.from_dlpack(a)
    out = xp.asarray(a)
    return out.astype(dtype, copy=False) if dtype is not None else out


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


class _Operator:
    """A = D^-1/2 W D^-1/2 of B graphs in ELL form: Y[b, i] = sum_j a[b, i, j] X[b, idx[b, i, j]].

    With a global term, lowrank = (H, g, diag), H = D^-1/2 G (B, N, r) and diag = g |H_i|^2,
    adds g H (H^T X) - diag X: two batched (N, r) products, O(N r p) per image.

    On cupy (float32/float64, C-contiguous) the product is one fused gather-and-sum kernel
    (`_ell_kernel`): no (B, N, m, p) gather is ever materialised. Elsewhere, and whenever
    the kernel is unavailable or failed its self-check, a few ELL columns are gathered at
    a time (memory B*N*step*p instead of B*N*m*p) and summed with einsum.
    """

    def __init__(self, idx, a, xp, cols_per_gather: int = 8, fused: bool | None = None, lowrank=None):
        self.idx, self.a, self.xp, self.step = idx, a, xp, cols_per_gather
        self.fused = _fused_available(xp) if fused is None else fused
        self.lowrank = lowrank

    def take(self, sel) -> _Operator:
        lowrank = None if self.lowrank is None else (self.lowrank[0][sel], self.lowrank[1], self.lowrank[2][sel])
        return _Operator(self.idx[sel], self.a[sel], self.xp, self.step, self.fused, lowrank)

    def astype(self, dtype, fused: bool | None = None) -> _Operator:
        lowrank = (
            None
            if self.lowrank is None
            else (self.lowrank[0].astype(dtype), self.lowrank[1], self.lowrank[2].astype(dtype))
        )
        return _Operator(
            self.idx, self.a.astype(dtype), self.xp, self.step, self.fused if fused is None else fused, lowrank
        )

    def _global(self, X):
        xp = self.xp
        H, g, diag = self.lowrank
        return g * xp.einsum("bnr,brp->bnp", H, xp.einsum("bnr,bnp->brp", H, X)) - diag[:, :, None] * X

    def gathered(self, X):
        """The unfused product (the reference the fused kernel is checked against)."""
        xp = self.xp
        B, N, m = self.idx.shape
        bsel = xp.arange(B)[:, None, None]
        Y = xp.zeros_like(X)
        for s in range(0, m, self.step):
            g = X[bsel, self.idx[:, :, s : s + self.step]]  # (B, N, step, p)
            Y += xp.einsum("bnj,bnjp->bnp", self.a[:, :, s : s + self.step], g)
        return Y

    def __call__(self, X):
        Y = _fused_product(self, X) if self.fused and X.dtype == self.a.dtype else self.gathered(X)
        return Y if self.lowrank is None else Y + self._global(X)


# The fused ELL product for cupy: one thread per output entry (b, i, c); the p threads of
# a row read its m (index, weight) slots once from cache and X's rows coalesced.
_ELL_SOURCE = r"""
extern "C" __global__ void ell_spmm_{T}(const long long* idx, const {T}* a, const {T}* X, {T}* Y,
                                       long long rows, int N, int m, int p) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * p) return;
    long long row = t / p;
    int c = (int)(t - row * p);
    const long long* ir = idx + row * m;
    const {T}* ar = a + row * m;
    const {T}* Xb = X + (row / N) * (long long)N * p;
    {T} s = 0;
    for (int j = 0; j < m; ++j) s += ar[j] * Xb[ir[j] * p + c];
    Y[t] = s;
}
"""
_FUSED_STATE: dict = {}  # "ok": result of the first self-check in this process; kernels by dtype


def _fused_available(xp) -> bool:
    """Only on cupy, and only until a self-check has failed (see `_fused_product`)."""
    return getattr(xp, "__name__", "") == "cupy" and _FUSED_STATE.get("ok", True)


def _ell_kernel(xp, dtype):
    name = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    key = ("kernel", name)
    if key not in _FUSED_STATE:
        _FUSED_STATE[key] = xp.RawKernel(_ELL_SOURCE.replace("{T}", name), f"ell_spmm_{name}")
    return _FUSED_STATE[key]


def _fused_product(op: _Operator, X):
    xp = op.xp
    B, N, m = op.idx.shape
    p = X.shape[2]
    X = xp.ascontiguousarray(X)
    idx, a = xp.ascontiguousarray(op.idx), xp.ascontiguousarray(op.a)
    Y = xp.empty_like(X)
    total, threads = B * N * p, 256
    _ell_kernel(xp, X.dtype)(
        ((total + threads - 1) // threads,),
        (threads,),
        (idx, a, X, Y, np.int64(B * N), np.int32(N), np.int32(m), np.int32(p)),
    )
    if "ok" not in _FUSED_STATE:
        # First use in this process: the kernel must agree with the gather product, or it
        # is switched off for good (a warning, then the slower but plain path).
        ref = op.gathered(X)
        err = float(xp.abs(Y - ref).max()) / max(float(xp.abs(ref).max()), 1e-30)
        _FUSED_STATE["ok"] = err <= 1e-4
        if not _FUSED_STATE["ok"]:
            logger.warning(
                "fused ELL kernel disagrees with the gather product (relative error %.2e); "
                "using the gather product from now on",
                err,
            )
            op.fused = False
            return ref
    return Y


def _gram(X, Y, xp):
    """X^T Y per image in float64, (B, p, q)."""
    return xp.einsum("bnp,bnq->bpq", X.astype(xp.float64), Y.astype(xp.float64))


def _orthonormalise(X, xp, stats: dict):
    """Batched Cholesky-QR, twice (CholQR2), with float64 Gram matrices.

    Images whose block is numerically rank deficient (Cholesky fails or its diagonal
    spans more than 1e6, i.e. cond(X) > 1e6) are orthonormalised with Householder QR.
    A failed factorisation is recognised by L L^T != G: numpy raises for the whole batch,
    but CuPy's batched Cholesky only flags the image in an info array it does not check
    (cupyx.errstate 'ignore'), and leaves a partial factor that need not hold a NaN.
    """
    dt = X.dtype
    for _ in range(2):
        G = _gram(X, X, xp)
        try:
            Lc = xp.linalg.cholesky(G)
            diag = xp.abs(xp.diagonal(Lc, axis1=1, axis2=2))
            err = xp.linalg.norm(Lc @ xp.swapaxes(Lc, 1, 2) - G, axis=(1, 2)) / xp.linalg.norm(G, axis=(1, 2))
            bad = ~(err <= 1e-10) | ~(diag.min(axis=1) > 1e-6 * diag.max(axis=1))  # NaN counts as bad
        except np.linalg.LinAlgError:
            Lc, bad = None, xp.ones(X.shape[0], dtype=bool)
        if bool(bad.all()):
            return _qr(X, xp, stats, xp.arange(X.shape[0]))
        if bool(bad.any()):
            Lc[bad] = xp.eye(G.shape[1])
        # X L^-T: inverse of a small (p x p) triangular factor, batched
        Rinv = xp.linalg.inv(xp.swapaxes(Lc, 1, 2))
        X = xp.einsum("bnp,bpq->bnq", X, Rinv.astype(dt))
        if bool(bad.any()):
            X = _qr(X, xp, stats, xp.nonzero(bad)[0])
    return X


def _qr(X, xp, stats, which):
    """Householder QR of the images `which`, one at a time (rare; CuPy's qr takes 2-D input only)."""
    which = [int(b) for b in _host(which)]
    stats["qr_fallbacks"] = stats.get("qr_fallbacks", 0) + len(which)
    for b in which:
        X[b] = xp.linalg.qr(X[b].astype(xp.float64))[0].astype(X.dtype)
    return X


def _chebyshev(op, X, lo, hi, degree: int):
    """p(A) X with p the degree-d Chebyshev polynomial damping [lo, hi] (per image), scaled."""
    e = ((hi - lo) / 2)[:, None, None]
    c = ((hi + lo) / 2)[:, None, None]
    Y = (op(X) - c * X) / e
    for _ in range(2, degree + 1):
        Y, X = 2 * (op(Y) - c * Y) / e - X, Y
    return Y


def _rayleigh_ritz(op, X, xp):
    """Ritz pairs of A on span(X) (orthonormal), largest first: (theta, X V, A X V)."""
    AX = op(X)
    H = _gram(X, AX, xp)
    H = (H + xp.swapaxes(H, 1, 2)) / 2
    theta, V = xp.linalg.eigh(H)
    theta, V = theta[:, ::-1], V[:, :, ::-1]
    Vd = V.astype(X.dtype)
    return theta, xp.einsum("bnp,bpq->bnq", X, Vd), xp.einsum("bnp,bpq->bnq", AX, Vd)


@dataclass
class BatchedResult:
    """Raw batched output (xp arrays) before the per-image post-processing."""

    theta: object  # (B, K) Ritz values of A, descending
    vecs: object  # (B, N, K)
    iterations: np.ndarray  # (B,) outer iterations (each = degree + 1 block products)
    converged: np.ndarray  # (B,) bool: every Ritz residual <= tol within max_iter
    info: dict = field(default_factory=dict)


def chebyshev_subspace(
    op: _Operator,
    sqrt_d,
    valid,
    K: int,
    *,
    xp=np,
    tol: float = 1e-4,
    block: int | None = None,
    degree: int = 10,
    max_iter: int = 100,
    seed: int = 0,
    dtype=np.float32,
) -> BatchedResult:
    """K largest eigenpairs of B normalised adjacencies A (spectra in [-1, 1]) at once.

    Chebyshev-filtered subspace iteration: each outer step applies p(A), the degree-d
    Chebyshev polynomial that stays within [-1, 1] on [-1, a] and grows fast above it,
    with a = the smallest Ritz value of the block (so the block's own top part is
    amplified), then CholQR2 and Rayleigh-Ritz. An image stops when its K Ritz
    residuals ||A x - theta x|| are <= tol; it then leaves the active set, so later
    steps cost only what the remaining images need.
    """
    B, N, _ = op.idx.shape
    p = block or 2 * K
    nmin = int(_host(valid.sum(axis=1)).min())
    if not K < p < nmin:
        raise ValueError(f"block of {p} columns needs K={K} < block < nodes of the smallest image ({nmin})")
    # One (N, p) draw shared by the batch: image b starts from its first n_b rows, which
    # do not depend on the batch's padded N (the generator fills row by row), so an image
    # starts the same way in any batch, and as a batch of one.
    rng = xp.random.default_rng(seed) if hasattr(xp.random, "default_rng") else xp.random.RandomState(seed)
    X = xp.broadcast_to(rng.standard_normal((N, p), dtype=dtype), (B, N, p)).copy()
    X[:, :, 0] = sqrt_d.astype(dtype)  # the trivial eigenvector, exact from the start
    X *= valid[:, :, None].astype(dtype)  # padded rows stay exactly zero
    stats: dict = {}
    X = _orthonormalise(X, xp, stats)
    theta, X, AX = _rayleigh_ritz(op, X, xp)

    out_theta = xp.zeros((B, K))
    out_vecs = xp.zeros((B, N, K), dtype=dtype)
    iters = np.zeros(B, dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    active = np.arange(B)
    aop = op
    for it in range(1, max_iter + 1):
        res = xp.linalg.norm(AX[:, :, :K] - X[:, :, :K] * theta[:, None, :K].astype(dtype), axis=1)
        conv = _host((res <= tol).all(axis=1))
        if conv.any():
            sel = np.flatnonzero(conv)
            dst, src = xp.asarray(active[sel]), xp.asarray(sel)
            out_theta[dst] = theta[src, :K]
            out_vecs[dst] = X[src, :, :K]
            done[active[sel]] = True
            keep = np.flatnonzero(~conv)
            active = active[keep]
            if not len(active):
                break
            kx = xp.asarray(keep)
            aop, X, theta = aop.take(kx), X[kx], theta[kx]
        iters[active] = it
        lo = xp.full(len(active), -1.0)
        hi = xp.clip(theta[:, -1], -1.0 + 1e-3, 1.0 - 1e-3)  # keep [lo, hi] non-degenerate
        X = _chebyshev(aop, X, lo, hi, degree)
        X = _orthonormalise(X, xp, stats)
        theta, X, AX = _rayleigh_ritz(aop, X, xp)
    if len(active) and not done[active].all():  # max_iter reached: keep the last iterate, flagged
        kx = xp.arange(len(active))
        res = xp.linalg.norm(AX[:, :, :K] - X[:, :, :K] * theta[:, None, :K].astype(dtype), axis=1)
        conv = _host((res <= tol).all(axis=1))
        out_theta[xp.asarray(active)] = theta[kx, :K]
        out_vecs[xp.asarray(active)] = X[kx, :, :K]
        done[active] = conv
    info = {"block": p, "degree": degree, **stats}
    return BatchedResult(out_theta, out_vecs, iters, done, info)


def _normalised_weights(ell: Ell, xp):
    """(idx, a, sqrt_d, valid, lowrank) with a = D^-1/2 W D^-1/2 on the ELL slots, float64,
    and the global term's (H, g, diag) for `_Operator` (None without one); D counts both."""
    idx, w = _to_xp(ell.idx, xp, xp.int64), _to_xp(ell.w, xp, xp.float64)
    B, N, _ = idx.shape
    nv = _to_xp(ell.n_valid, xp, xp.int64)
    valid = xp.arange(N)[None, :] < nv[:, None]
    if not bool(xp.isfinite(w).all()):
        raise ValueError("graph weights contain NaN/Inf")
    if bool((w < 0).any()):
        raise ValueError("graph weights must be non-negative")
    w = w * valid[:, :, None]
    d = w.sum(axis=2)
    G = None
    if ell.lowrank is not None and ell.global_weight > 0:
        G = _to_xp(ell.lowrank, xp, xp.float64) * valid[:, :, None]
        # the global term's degrees in O(N r): g (G (G^T 1) - |G_i|^2)
        d = d + ell.global_weight * (xp.einsum("bnr,br->bn", G, G.sum(axis=1)) - (G * G).sum(axis=2))
    dinv = xp.where(d > 0, 1.0 / xp.sqrt(xp.where(d > 0, d, 1.0)), 0.0)
    bsel = xp.arange(B)[:, None, None]
    a = w * (dinv[:, :, None] * dinv[bsel, idx])
    lowrank = None
    if G is not None:
        H = dinv[:, :, None] * G
        lowrank = (H, float(ell.global_weight), ell.global_weight * (H * H).sum(axis=2))
    return idx, a, xp.sqrt(d), valid, lowrank


def batched_eigs(
    ell: Ell,
    K: int,
    *,
    xp=np,
    tol: float = 1e-4,
    residual_tol: float = 1e-3,
    block: int | None = None,
    degree: int = 10,
    max_iter: int = 100,
    seed: int = 0,
    dtype=np.float32,
) -> list[Spectrum]:
    """K smallest eigenpairs of L = I - D^-1/2 W D^-1/2 for each of B graphs in one ELL batch.

    ell.w holds the affinities W (see `ell_graph`, `ell_from_csr`). Returns one `Spectrum`
    per image, like `laplacian_eigs`: eigvals ascending (float64), eigvecs (n_valid, K)
    float32 with `fix_signs`, residuals ||L u - lambda u|| of the returned float32
    vectors computed in float64, converged = solver converged and residuals <= residual_tol,
    iterations = outer iterations of this image (it stops costing work once converged).
    """
    t0 = time.perf_counter()
    if not 1 <= K:
        raise ValueError(f"K must be >= 1, got {K}")
    idx, a64, sqrt_d, valid, lowrank = _normalised_weights(ell, xp)
    return _solve(
        _Operator(idx, a64, xp, fused=False, lowrank=lowrank),
        sqrt_d,
        valid,
        K,
        xp=xp,
        tol=tol,
        residual_tol=residual_tol,
        block=block,
        degree=degree,
        max_iter=max_iter,
        seed=seed,
        dtype=dtype,
        t0=t0,
    )


def _solve(op64: _Operator, sqrt_d, valid, K, *, xp, tol, residual_tol, block, degree, max_iter, seed, dtype, t0):
    """op64: the float64 operator (plain products; it checks the solver's `dtype` one at the end)."""
    B, N, _ = op64.idx.shape
    nv = _host(valid.sum(axis=1))
    if K + 2 > int(nv.min()):
        raise ValueError(f"K={K} needs graphs with more than {K + 1} nodes (smallest has {int(nv.min())})")
    nrm = xp.linalg.norm(sqrt_d, axis=1, keepdims=True)
    start = sqrt_d / xp.where(nrm > 0, nrm, 1.0)
    op = op64.astype(dtype, fused=_fused_available(xp))
    # Block size per image: 2K columns, fewer only for graphs too small for that. Images
    # of one block size are solved together (in practice: the whole batch at once).
    blocks = np.minimum(block or 2 * K, nv - 1)
    vecs = xp.zeros((B, N, K), dtype=dtype)
    iterations, converged = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=bool)
    qr_fallbacks = 0
    for p in np.unique(blocks):
        sel = np.flatnonzero(blocks == p)
        s = xp.asarray(sel)
        part = (op, start, valid) if len(sel) == B else (op.take(s), start[s], valid[s])
        r = chebyshev_subspace(
            *part, K, xp=xp, tol=tol, block=int(p), degree=degree, max_iter=max_iter, seed=seed, dtype=dtype
        )
        vecs[s] = r.vecs
        iterations[sel], converged[sel] = r.iterations, r.converged
        qr_fallbacks += r.info.get("qr_fallbacks", 0)
    # What is returned, made on the device for the whole batch at once: unit vectors with
    # spectral's sign convention, rounded to float32; then the residuals of exactly those
    # float32 vectors, in float64, as laplacian_eigs measures them: Lu - lu = u - Au - lu.
    u = vecs.astype(xp.float64)
    norms = xp.linalg.norm(u, axis=1, keepdims=True)
    u32 = fix_signs_batched(u / xp.where(norms > 0, norms, 1.0), xp).astype(xp.float32)
    u = u32.astype(xp.float64)
    Au = op64(u)  # plain float64 product: checks the fused one
    lam = 1.0 - xp.einsum("bnk,bnk->bk", u, Au)  # float64 Rayleigh quotients (error ~ residual^2)
    res = xp.linalg.norm(u - Au - u * lam[:, None, :], axis=1)
    lam_h, res_h = _host(lam), _host(res)
    order = np.argsort(lam_h, axis=1, kind="stable")  # ascending, per image
    lam_h, res_h = np.take_along_axis(lam_h, order, 1), np.take_along_axis(res_h, order, 1)
    u_h = np.take_along_axis(_host(u32), order[:, None, :], 2)
    seconds = time.perf_counter() - t0
    out = []
    for b in range(B):
        conv = bool(converged[b]) and bool((res_h[b] <= residual_tol).all())
        if not conv:
            logger.warning(
                "batched solver: image %d not converged (residuals %s, %d iterations)",
                b,
                np.array2string(res_h[b], precision=2),
                iterations[b],
            )
        out.append(
            Spectrum(
                eigvals=lam_h[b].astype(np.float64),
                eigvecs=np.ascontiguousarray(u_h[b, : nv[b]]),
                residuals=res_h[b],
                converged=conv,
                iterations=int(iterations[b]),
                solver="batched",
                info={
                    "seconds": seconds,
                    "batch": B,
                    "solver_converged": bool(converged[b]),
                    "block": int(blocks[b]),
                    "degree": degree,
                    "matvecs": int(iterations[b] * (degree + 1) + 1),
                    "qr_fallbacks": qr_fallbacks,
                },
            )
        )
    return out


def fix_signs_batched(u, xp):
    """`spectral.fix_signs` for a (B, N, K) batch at once, on any array module.

    Per column: entries with |u| <= 1e-6 max|u| count as zero (so do padded rows);
    one-signed columns are made non-negative, otherwise the positive part is made the
    minority, and on a tie the entry of largest |u| (first such) is made positive.
    """
    a = xp.abs(u)
    eps = 1e-6 * a.max(axis=1, keepdims=True)
    pos, neg = (u > eps).sum(axis=1), (u < -eps).sum(axis=1)
    at_max = xp.take_along_axis(u, xp.argmax(a, axis=1)[:, None, :], axis=1)[:, 0, :]
    flip = xp.where((pos == 0) | (neg == 0), pos == 0, xp.where(pos != neg, pos > neg, at_max < 0))
    return xp.where(flip[:, None, :], -u, u)


def array_module(device: str, ell: Ell | None = None):
    """(xp, context) for the batched solver: cupy and its device on a GPU, else numpy.

    "cuda"/"cuda:N" ask for cupy (an ImportError with the install hint if it is
    missing); "auto" uses cupy when the graphs are already on a GPU (torch CUDA tensors
    or cupy arrays) and cupy is installed; "cpu" is numpy.
    """
    if device == "cpu":
        return np, contextlib.nullcontext()
    on_gpu = ell is not None and (
        getattr(getattr(ell.idx, "device", None), "type", None) == "cuda" or type(ell.idx).__module__.startswith("cupy")
    )
    if device == "auto" and not on_gpu:
        return np, contextlib.nullcontext()
    try:
        import cupy
    except ImportError as e:
        if device == "auto":
            logger.warning(
                "graphs are on a GPU but CuPy is missing: solving on the CPU "
                "(pip install cupy-cuda12x for the GPU solver)"
            )
            return np, contextlib.nullcontext()
        raise ImportError(f"solver 'batched' on device {device!r} needs CuPy: pip install cupy-cuda12x") from e
    index = int(device.split(":")[1]) if ":" in device else None
    if index is None and on_gpu and hasattr(ell.idx, "device") and ell.idx.device.index is not None:
        index = ell.idx.device.index
    return cupy, cupy.cuda.Device(index or 0)


def solve_batched(A: sp.csr_matrix, sqrt_d: np.ndarray, cfg):
    """`spectral.SOLVERS` signature: one normalised adjacency (CSR or `NormalizedAffinity`)
    solved as a batch of one (numpy)."""
    from .spectral import NormalizedAffinity, _Raw

    lowrank = None
    if isinstance(A, NormalizedAffinity):  # already normalised: H = D^-1/2 G
        lowrank = (A.H[None], A.weight, A.diag[None])
        A = A.sparse
    ell = ell_from_csr([A])
    valid = np.ones((1, A.shape[0]), dtype=bool)
    op64 = _Operator(ell.idx, ell.w, np, fused=False, lowrank=lowrank)
    (s,) = _solve(
        op64,
        np.asarray(sqrt_d, np.float64)[None],
        valid,
        cfg.num_eigs,
        xp=np,
        tol=cfg.tol,
        residual_tol=cfg.residual_tol,
        block=None,
        degree=10,
        max_iter=cfg.max_iter or 100,
        seed=cfg.seed,
        dtype=np.float32,
        t0=time.perf_counter(),
    )
    return _Raw(s.eigvals, s.eigvecs.astype(np.float64), iterations=s.iterations, info=dict(s.info))


def ell_to_csr(ell: Ell, b: int) -> sp.csr_matrix:
    """Image b of an ELL batch as an (n_valid, n_valid) CSR matrix (host; for tests and checks)."""
    n = int(_host(_to_xp(ell.n_valid, np))[b])
    idx, w = _to_xp(ell.idx, np)[b, :n], _to_xp(ell.w, np)[b, :n]
    rows = np.repeat(np.arange(n), idx.shape[1])
    keep = w.ravel() != 0
    return sp.csr_matrix((w.ravel()[keep], (rows[keep], idx.ravel()[keep])), shape=(n, n))
