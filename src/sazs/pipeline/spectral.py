"""K smallest eigenpairs of the normalised graph Laplacian L = I - D^-1/2 W D^-1/2, by solver.

Every solver (`SOLVERS`: ARPACK, LOBPCG on CPU or GPU, dense LAPACK, Deep Spectral
Methods' generalised problem, the batched solver on one graph) sees the normalised
adjacency A = D^-1/2 W D^-1/2 as the graph operator (`laplacian.normalized_operator`: the
kNN part and the global term, applied in O(nnz + N r)) and returns eigenvectors
u of L (orthonormal); the generalised form of Deep Spectral Methods, (D - W) v = lambda D v,
has v = D^-1/2 u. The common post-processing (`laplacian_eigs`) sorts, fixes signs,
renormalises, and measures the residual ||L u - lambda u|| of what it returns, so solvers
are compared on one footing. `laplacian_eigs_batch` solves many graphs at once
(`batched_solver`).

A graph with c connected components has eigenvalue 0 with multiplicity c; vectors of
a degenerate eigenspace are not unique, only the subspace is.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from sazs.core.registry import Registry

from .batched_solver import array_module, batched_eigs, solve_batched
from .ell import Ell
from .laplacian import NormalizedAffinity, fix_signs, normalized_operator
from .types import Graph, Spectrum

logger = logging.getLogger(__name__)

DENSE_MAX_NODES = 6000
_GENERALIZED_SHIFT = -1e-6  # solver "generalized": shift-invert just below the trivial eigenvalue 0
SOLVER_PRECISIONS = ("float32", "float64")


class SolverError(RuntimeError):
    """The eigensolver produced no usable answer (NaN/Inf, or too few converged vectors)."""


@dataclass(frozen=True)
class SpectralConfig:
    """Eigensolver settings (stored in the prior-store manifest).

    tol is the solver's own stopping tolerance (ARPACK: relative accuracy of the Ritz
    values; LOBPCG: residual norm). 1e-5 keeps eigenvalues within ~1e-8 and residuals
    within ~1e-5 of exact, far inside the 1e-4 / residual_tol checks. max_iter None
    means the solver's default (ARPACK: 10 N restarts; LOBPCG: 500 iterations).
    precision is eigsh's working precision: "float32" (single-precision ARPACK on a
    float32 copy of A, ~20% faster; the eigenvalues are then float64 Rayleigh quotients
    of the returned vectors, which are float32 in either case) or "float64".
    device only matters for GPU solvers; "auto" never switches solver.
    """

    num_eigs: int = 8
    solver: str = "eigsh"
    tol: float = 1e-5
    max_iter: int | None = None
    residual_tol: float = 1e-3
    seed: int = 0
    device: str = "auto"
    precision: str = "float32"

    def __post_init__(self) -> None:
        # Checked here, so that a typo fails the job at once instead of every image in it.
        if self.solver != "auto" and self.solver not in SOLVERS:  # "auto": resolved by the job
            raise ValueError(f"unknown solver {self.solver!r}; choose from {['auto', *list_solvers()]}")
        if self.precision not in SOLVER_PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {list(SOLVER_PRECISIONS)}")


@dataclass
class _Raw:
    """What a solver hands to the common post-processing (eigenvalues of L)."""

    eigvals: np.ndarray
    eigvecs: np.ndarray
    iterations: int | None = None
    info: dict = field(default_factory=dict)


# --- solvers: (A, sqrt_d, cfg) -> _Raw, with A the normalised adjacency (`NormalizedAffinity`)


def _solve_eigsh(A: NormalizedAffinity, sqrt_d: np.ndarray, cfg: SpectralConfig) -> _Raw:
    """ARPACK Lanczos for the largest algebraic eigenvalues of A (= smallest of L).

    No shift-invert: the wanted end of A's spectrum is its largest, so plain Lanczos
    needs only sparse mat-vecs, no factorisation. The seeded random start vector makes
    runs reproducible; sqrt(d) is *not* used because it is an exact eigenvector, which
    would make the Krylov space collapse to one dimension.

    In float32 the ~300 mat-vecs (0.04 ms each at N ~ 3,500) cost the same, ARPACK's
    own vector work less: ~20% faster overall (21 -> 17 ms). Its Ritz values then carry
    float32 rounding (~1e-7 on eigenvalues of A near 1), so the eigenvalues are
    recomputed as float64 Rayleigh quotients of the returned vectors (error ~ residual^2).
    """
    n = A.shape[0]
    dtype = np.float32 if cfg.precision == "float32" else np.float64
    Aw = A.astype(dtype)
    matvecs = 0

    def matvec(x):
        nonlocal matvecs
        matvecs += 1 if x.ndim == 1 else x.shape[1]
        return Aw @ x

    op = sla.LinearOperator(A.shape, matvec=matvec, matmat=matvec, dtype=dtype)
    v0 = np.random.default_rng(cfg.seed).standard_normal(n).astype(dtype)
    try:
        vals, vecs = sla.eigsh(op, k=cfg.num_eigs, which="LA", tol=cfg.tol, maxiter=cfg.max_iter, v0=v0)
    except sla.ArpackNoConvergence as e:
        raise SolverError(
            f"ARPACK converged {len(e.eigenvalues)} of {cfg.num_eigs} eigenpairs "
            f"(tol={cfg.tol}, max_iter={cfg.max_iter}, precision={cfg.precision}, {matvecs} mat-vecs)"
        ) from e
    except sla.ArpackError as e:  # e.g. no Arnoldi factorisation of a graph with overflowing weights
        raise SolverError(f"ARPACK failed after {matvecs} mat-vecs ({str(e).split('.')[0]})") from e
    if dtype == np.float32:
        vecs = vecs.astype(np.float64)
        vecs /= np.linalg.norm(vecs, axis=0, keepdims=True)
        vals = np.einsum("ij,ij->j", vecs, A @ vecs)
    return _Raw(1.0 - vals, vecs, iterations=matvecs, info={"matvecs": matvecs})


def _lobpcg_generic(A: NormalizedAffinity, sqrt_d: np.ndarray, cfg: SpectralConfig, *, xp, sparse, lobpcg) -> _Raw:
    """LOBPCG for the largest eigenvalues of A, written against array modules.

    xp/sparse/lobpcg are numpy/scipy.sparse/scipy's lobpcg on the CPU and
    cupy/cupyx.scipy.sparse/cupyx's lobpcg on the GPU, so the CPU tests run the exact
    code of the GPU solver. The initial block holds sqrt(d) (the trivial eigenvector,
    exact from the start) plus seeded random vectors, and a few more columns than
    wanted: the extra columns make the K-th eigenvalue converge much faster. No
    preconditioner: without self-loops diag(L) = 1, so Jacobi would be the identity.
    """
    n, K = A.shape[0], cfg.num_eigs
    m = min(K + max(2, K // 2), n - 1)
    rng = np.random.default_rng(cfg.seed)
    X0 = rng.standard_normal((n, m))
    X0[:, 0] = sqrt_d / max(np.linalg.norm(sqrt_d), np.finfo(float).tiny)
    if A.H is not None:  # the global term: products through the operator (numpy only)
        if xp is not np:
            raise ValueError("the GPU LOBPCG has no global term; use the solver 'batched' on a GPU")
        A_dev = sla.LinearOperator(A.shape, matvec=A.__matmul__, matmat=A.__matmul__, dtype=np.float64)
    else:  # the kNN part alone: a sparse matrix on the solver's device
        S = A.sparse
        A_dev = sparse.csr_matrix((xp.asarray(S.data), xp.asarray(S.indices), xp.asarray(S.indptr)), shape=S.shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lobpcg(
            A_dev,
            xp.asarray(X0),
            tol=cfg.tol,
            maxiter=cfg.max_iter or 500,
            largest=True,
            retResidualNormsHistory=True,
        )
    # CuPy's small-problem branch (n < 5 m: dense eigh instead) returns no history.
    iterations = len(out[2]) if len(out) > 2 else None
    to_host = getattr(xp, "asnumpy", np.asarray)
    vals, vecs = to_host(out[0]), to_host(out[1])
    order = np.argsort(-vals, kind="stable")[:K]
    msgs = [str(w.message) for w in caught]
    for msg in msgs:
        logger.debug("lobpcg: %s", msg)
    return _Raw(1.0 - vals[order], vecs[:, order], iterations=iterations, info={"warnings": msgs})


def _solve_lobpcg(A: NormalizedAffinity, sqrt_d: np.ndarray, cfg: SpectralConfig) -> _Raw:
    return _lobpcg_generic(A, sqrt_d, cfg, xp=np, sparse=sp, lobpcg=sla.lobpcg)


def _cupy_modules():
    """(xp, sparse, lobpcg) for the GPU; the tests swap in numpy/scipy here."""
    try:
        import cupy
        import cupyx.scipy.sparse as csp
        from cupyx.scipy.sparse.linalg import lobpcg
    except ImportError as e:
        raise ImportError("solver 'cupy-lobpcg' needs CuPy: pip install cupy-cuda12x") from e
    return cupy, csp, lobpcg


def _solve_cupy_lobpcg(A: NormalizedAffinity, sqrt_d: np.ndarray, cfg: SpectralConfig) -> _Raw:
    device = cfg.device
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"solver 'cupy-lobpcg' runs on a CUDA device, got device={device!r}")
    xp, sparse, lobpcg = _cupy_modules()
    index = int(device.split(":")[1]) if ":" in device else 0
    with xp.cuda.Device(index) if hasattr(xp, "cuda") else contextlib.nullcontext():
        return _lobpcg_generic(A, sqrt_d, cfg, xp=xp, sparse=sparse, lobpcg=lobpcg)


def _solve_dense(A: NormalizedAffinity, sqrt_d: np.ndarray, cfg: SpectralConfig) -> _Raw:
    """Float64 LAPACK reference on the dense L (only the K wanted eigenpairs)."""
    n = A.shape[0]
    if n > DENSE_MAX_NODES:
        raise ValueError(f"dense solver refuses N={n} > {DENSE_MAX_NODES} nodes (O(N^2) memory, O(N^3) time)")
    L = np.eye(n) - A.toarray()
    vals, vecs = scipy.linalg.eigh(L, subset_by_index=[0, cfg.num_eigs - 1])
    return _Raw(vals, vecs)


def _solve_generalized(A: NormalizedAffinity, sqrt_d: np.ndarray, cfg: SpectralConfig) -> _Raw:
    """Deep Spectral Methods' solver: eigsh(D - W, k=K, sigma=0, which="LM", M=D) on dense arrays.

    The baseline of the original formulation (with graph kind "dense"): shift-invert
    Lanczos on the generalised problem (D - W) v = lambda D v, i.e. a dense LU of D - W
    (O(N^3)), as in their code. Its vectors v are turned into the store's u = D^1/2 v
    (unit columns, orthonormal up to the solver's accuracy). Isolated nodes make D
    singular: refused. Shift -1e-6 instead of their 0 (see below).
    """
    n = A.shape[0]
    if n > DENSE_MAX_NODES:
        raise ValueError(f"solver 'generalized' refuses N={n} > {DENSE_MAX_NODES} nodes (dense O(N^2) memory)")
    if (sqrt_d <= 0).any():
        raise SolverError(f"solver 'generalized' needs every degree > 0 ({int((sqrt_d <= 0).sum())} isolated nodes)")
    dense = A.toarray()
    d = sqrt_d * sqrt_d
    W = dense * np.outer(sqrt_d, sqrt_d)
    D = np.diag(d)
    v0 = np.random.default_rng(cfg.seed).standard_normal(n)
    # Their sigma = 0 is an exact eigenvalue (the constant vector): on some images the LU
    # of the singular D - W meets an exactly zero pivot and ARPACK returns NaN. A shift
    # just below 0 makes D - W - sigma D positive definite and changes no eigenvector.
    vals, v = sla.eigsh(
        D - W, k=cfg.num_eigs, sigma=_GENERALIZED_SHIFT, which="LM", M=D, tol=cfg.tol, v0=v0, maxiter=cfg.max_iter
    )
    u = sqrt_d[:, None] * v
    return _Raw(vals, u / np.linalg.norm(u, axis=0, keepdims=True))


def _solve_batched(A: NormalizedAffinity, sqrt_d: np.ndarray, cfg: SpectralConfig) -> _Raw:
    """The batched solver on one graph (a batch of one); see `laplacian_eigs_batch` for many."""
    s = solve_batched(
        A,
        cfg.num_eigs,
        tol=cfg.tol,
        residual_tol=cfg.residual_tol,
        max_iter=cfg.max_iter or 100,
        seed=cfg.seed,
    )
    return _Raw(s.eigvals, s.eigvecs.astype(np.float64), iterations=s.iterations, info=dict(s.info))


SOLVERS: Registry[Callable[[NormalizedAffinity, np.ndarray, SpectralConfig], _Raw]] = Registry("solver")
SOLVERS.add("eigsh", _solve_eigsh, help="ARPACK Lanczos on D^-1/2 W D^-1/2, which='LA' (CPU; the default there)")
SOLVERS.add("lobpcg", _solve_lobpcg, help="SciPy LOBPCG (CPU)")
SOLVERS.add("cupy-lobpcg", _solve_cupy_lobpcg, help="CuPy LOBPCG, one image at a time (GPU)")
SOLVERS.add("dense", _solve_dense, help="dense LAPACK eigh (float64 reference; small graphs)")
SOLVERS.add(
    "generalized", _solve_generalized, help="the original DSM shift-invert eigsh(D - W, M = D), with --graph dense"
)
SOLVERS.add("batched", _solve_batched, help="Chebyshev-filtered block solver over a shard's graphs (GPU with CuPy)")


def list_solvers() -> list[str]:
    return SOLVERS.names()


def laplacian_eigs(graph: Graph, cfg: SpectralConfig) -> Spectrum:
    """K smallest eigenpairs of the normalised Laplacian of `graph` with solver `cfg.solver`."""
    SOLVERS.check(cfg.solver)
    if cfg.precision not in SOLVER_PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; choose from {list(SOLVER_PRECISIONS)}")
    W = graph.W
    n, K = W.shape[0], cfg.num_eigs
    if not 1 <= K < n:
        raise ValueError(f"num_eigs={K} needs a graph with more than {K} nodes (got {n})")
    if W.nnz and not np.isfinite(W.data).all():
        raise SolverError("graph weights contain NaN/Inf")
    if W.nnz and (W.data.min() < 0 or abs(W - W.T).max() > 1e-12 * abs(W).max()):
        raise ValueError("graph weights must be symmetric and non-negative")
    A = normalized_operator(graph)
    d = A.degrees

    t0 = time.perf_counter()
    raw = SOLVERS[cfg.solver](A, np.sqrt(d), cfg)
    seconds = time.perf_counter() - t0
    if not (np.isfinite(raw.eigvals).all() and np.isfinite(raw.eigvecs).all()):
        raise SolverError(f"solver {cfg.solver!r} returned NaN/Inf (N={n}, K={K})")

    order = np.argsort(raw.eigvals, kind="stable")
    vals = np.asarray(raw.eigvals, dtype=np.float64)[order]
    vecs = fix_signs(np.asarray(raw.eigvecs, dtype=np.float64)[:, order])
    vecs /= np.linalg.norm(vecs, axis=0, keepdims=True)
    vecs32 = vecs.astype(np.float32)
    # Residuals of what is returned (float32 vectors), computed in float64: Lu = u - Au.
    u = vecs32.astype(np.float64)
    residuals = np.linalg.norm(u - A @ u - u * vals, axis=0)
    converged = bool((residuals <= cfg.residual_tol).all())
    if not converged:
        logger.warning(
            "solver %r: residuals %s exceed residual_tol=%g (N=%d)",
            cfg.solver,
            np.array2string(residuals, precision=2),
            cfg.residual_tol,
            n,
        )
    logger.debug("solver %r: N=%d K=%d in %.3f s (iterations=%s)", cfg.solver, n, K, seconds, raw.iterations)
    return Spectrum(
        eigvals=vals,
        eigvecs=vecs32,
        residuals=residuals,
        converged=converged,
        iterations=raw.iterations,
        solver=cfg.solver,
        info={"seconds": seconds, **raw.info},
    )


def laplacian_eigs_batch(ell: Ell, cfg: SpectralConfig) -> list[Spectrum]:
    """K smallest eigenpairs of many graphs at once (solver "batched"), one `Spectrum` each.

    ell: an `ell.Ell` of affinities W (`graph.build_knn_graphs`, `ell.ell_from_graphs`).
    Runs with cupy on a GPU (cfg.device cuda[:N], or auto with the graphs already on a
    GPU) and numpy otherwise: the same code, so the CPU tests check the GPU solver. The
    Spectra follow `laplacian_eigs`' conventions (ascending, `fix_signs`, float32 vectors,
    float64 residuals of what is returned, converged = residuals <= residual_tol).
    """
    if cfg.solver != "batched":
        raise ValueError(f"laplacian_eigs_batch runs the 'batched' solver, not {cfg.solver!r}")
    xp, device = array_module(cfg.device, ell)
    with device:
        return batched_eigs(
            ell,
            cfg.num_eigs,
            xp=xp,
            tol=cfg.tol,
            residual_tol=cfg.residual_tol,
            max_iter=cfg.max_iter or 100,
            seed=cfg.seed,
        )
