"""The batched eigensolver: the spectra of B graphs of one `ell.Ell` batch per call (`batched_eigs`).

A GPU only beats SciPy on one CPU core at these graph sizes (N ~ 1,000-5,000 patches)
when it works on many graphs at once: Chebyshev-filtered subspace iteration on all B
graphs together, every product the batch's graph operator (`laplacian.batch_operator`:
an ELL gather plus a sum for the kNN part, two batched (N, r) products for the global term).
Padded nodes (degree 0, D^-1/2 = 0) start with zero rows in the iteration block, so
they stay exactly zero and never enter a spectrum.

Array modules: `xp` = numpy on the CPU or cupy on a GPU (`array_module`; the tests run
the exact GPU code on numpy). The spectra follow `spectral.laplacian_eigs`' conventions:
ascending order, `laplacian.fix_signs`, float32 orthonormal vectors, float64 residuals
||L u - lambda u||.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from .ell import Ell, to_host
from .ell_operator import fused_available
from .laplacian import NormalizedAffinity, as_batch, batch_operator, fix_signs
from .types import Spectrum

logger = logging.getLogger(__name__)


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
    which = [int(b) for b in to_host(which)]
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
    op: NormalizedAffinity,
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
    B, N, _ = op.shape
    p = block or 2 * K
    nmin = int(to_host(valid.sum(axis=1)).min())
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
        conv = to_host((res <= tol).all(axis=1))
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
        conv = to_host((res <= tol).all(axis=1))
        out_theta[xp.asarray(active)] = theta[kx, :K]
        out_vecs[xp.asarray(active)] = X[kx, :, :K]
        done[active] = conv
    info = {"block": p, "degree": degree, **stats}
    return BatchedResult(out_theta, out_vecs, iters, done, info)


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
    op64, valid = batch_operator(ell, xp)
    return _solve(
        op64,
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


def _solve(op64: NormalizedAffinity, valid, K, *, xp, tol, residual_tol, block, degree, max_iter, seed, dtype, t0):
    """op64: the float64 batch operator (plain products; it checks the solver's `dtype` one at the end)."""
    B, N, _ = op64.shape
    nv = to_host(valid.sum(axis=1))
    if K + 2 > int(nv.min()):
        raise ValueError(f"K={K} needs graphs with more than {K + 1} nodes (smallest has {int(nv.min())})")
    sqrt_d = xp.sqrt(op64.degrees)
    nrm = xp.linalg.norm(sqrt_d, axis=1, keepdims=True)
    start = sqrt_d / xp.where(nrm > 0, nrm, 1.0)
    op = op64.astype(dtype, fused=fused_available(xp))
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
    u32 = fix_signs(u / xp.where(norms > 0, norms, 1.0), xp).astype(xp.float32)
    u = u32.astype(xp.float64)
    Au = op64(u)  # plain float64 product: checks the fused one
    lam = 1.0 - xp.einsum("bnk,bnk->bk", u, Au)  # float64 Rayleigh quotients (error ~ residual^2)
    res = xp.linalg.norm(u - Au - u * lam[:, None, :], axis=1)
    lam_h, res_h = to_host(lam), to_host(res)
    order = np.argsort(lam_h, axis=1, kind="stable")  # ascending, per image
    lam_h, res_h = np.take_along_axis(lam_h, order, 1), np.take_along_axis(res_h, order, 1)
    u_h = np.take_along_axis(to_host(u32), order[:, None, :], 2)
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


def solve_batched(
    A: NormalizedAffinity,
    K: int,
    *,
    tol: float,
    residual_tol: float,
    max_iter: int,
    seed: int,
) -> Spectrum:
    """One graph's operator (`laplacian.normalized_operator`) solved as a batch of one (numpy):
    the solver "batched" of `spectral.SOLVERS`."""
    (s,) = _solve(
        as_batch(A),
        np.ones((1, A.shape[0]), dtype=bool),
        K,
        xp=np,
        tol=tol,
        residual_tol=residual_tol,
        block=None,
        degree=10,
        max_iter=max_iter,
        seed=seed,
        dtype=np.float32,
        t0=time.perf_counter(),
    )
    return s
