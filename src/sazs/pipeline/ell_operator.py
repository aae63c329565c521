"""The sparse (kNN) part of B graphs in ELL form as an operator (`EllOperator`), on numpy or cupy.

`laplacian.batch_operator` normalises an `ell.Ell` batch (degrees, global term) and hands
its normalised weights to an `EllOperator`, which applies them to a (B, N, p) block. On
cupy the product is one fused CUDA kernel, checked once per process against the plain
gather product (the tests run the kernel's index arithmetic on numpy).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


class EllOperator:
    """B sparse matrices in ELL form: Y[b, i] = sum_j a[b, i, j] X[b, idx[b, i, j]].

    The kNN part of a batch's operator (`laplacian.NormalizedAffinity` adds the global
    term). On cupy (float32/float64, C-contiguous) the product is one fused
    gather-and-sum kernel (`_ell_kernel`): no (B, N, m, p) gather is ever materialised.
    Elsewhere, and whenever the kernel is unavailable or failed its self-check, a few ELL
    columns are gathered at a time (memory B*N*step*p instead of B*N*m*p) and summed
    with einsum.
    """

    def __init__(self, idx, a, xp, cols_per_gather: int = 8, fused: bool | None = None):
        self.idx, self.a, self.xp, self.step = idx, a, xp, cols_per_gather
        self.fused = fused_available(xp) if fused is None else fused

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, N, N): B operators on N nodes."""
        B, N, _ = self.idx.shape
        return (B, N, N)

    @property
    def dtype(self):
        return self.a.dtype

    def take(self, sel) -> EllOperator:
        return EllOperator(self.idx[sel], self.a[sel], self.xp, self.step, self.fused)

    def astype(self, dtype, fused: bool | None = None) -> EllOperator:
        return EllOperator(self.idx, self.a.astype(dtype), self.xp, self.step, self.fused if fused is None else fused)

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
        return _fused_product(self, X) if self.fused and X.dtype == self.a.dtype else self.gathered(X)

    __matmul__ = __call__


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
