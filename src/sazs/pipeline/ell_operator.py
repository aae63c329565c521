"""A = D^-1/2 W D^-1/2 of B graphs in ELL form as an operator (`EllOperator`), on numpy or cupy.

`normalised_weights` turns an `ell.Ell` of affinities W (plus its global low-rank term)
into the operator's pieces; `EllOperator` applies A to a (B, N, p) block. On cupy the
sparse product is one fused CUDA kernel, checked once per process against the plain
gather product (the tests run the kernel's index arithmetic on numpy).
"""

from __future__ import annotations

import logging

import numpy as np

from .ell import Ell, to_xp

logger = logging.getLogger(__name__)


class EllOperator:
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
        self.fused = fused_available(xp) if fused is None else fused
        self.lowrank = lowrank

    def take(self, sel) -> EllOperator:
        lowrank = None if self.lowrank is None else (self.lowrank[0][sel], self.lowrank[1], self.lowrank[2][sel])
        return EllOperator(self.idx[sel], self.a[sel], self.xp, self.step, self.fused, lowrank)

    def astype(self, dtype, fused: bool | None = None) -> EllOperator:
        lowrank = (
            None
            if self.lowrank is None
            else (self.lowrank[0].astype(dtype), self.lowrank[1], self.lowrank[2].astype(dtype))
        )
        return EllOperator(
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


def fused_available(xp) -> bool:
    """Only on cupy, and only until a self-check has failed (see `_fused_product`)."""
    return getattr(xp, "__name__", "") == "cupy" and _FUSED_STATE.get("ok", True)


def _ell_kernel(xp, dtype):
    name = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    key = ("kernel", name)
    if key not in _FUSED_STATE:
        _FUSED_STATE[key] = xp.RawKernel(_ELL_SOURCE.replace("{T}", name), f"ell_spmm_{name}")
    return _FUSED_STATE[key]


def _fused_product(op: EllOperator, X):
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


def normalised_weights(ell: Ell, xp):
    """(idx, a, sqrt_d, valid, lowrank) with a = D^-1/2 W D^-1/2 on the ELL slots, float64,
    and the global term's (H, g, diag) for `EllOperator` (None without one); D counts both."""
    idx, w = to_xp(ell.idx, xp, xp.int64), to_xp(ell.w, xp, xp.float64)
    B, N, _ = idx.shape
    nv = to_xp(ell.n_valid, xp, xp.int64)
    valid = xp.arange(N)[None, :] < nv[:, None]
    if not bool(xp.isfinite(w).all()):
        raise ValueError("graph weights contain NaN/Inf")
    if bool((w < 0).any()):
        raise ValueError("graph weights must be non-negative")
    w = w * valid[:, :, None]
    d = w.sum(axis=2)
    G = None
    if ell.lowrank is not None and ell.global_weight > 0:
        G = to_xp(ell.lowrank, xp, xp.float64) * valid[:, :, None]
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
