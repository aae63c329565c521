"""Exact kNN on a CPU through a certified bfloat16 product (`knn_certified`).

The exact search is one N x N x d product plus a top-k; at N ~ 3,500, d = 384 the
float32 product alone takes ~50-60 ms on one core. A bfloat16 product runs ~3x faster
on CPUs with native bf16 dot products (AVX512_BF16 / AMX), but bfloat16 keeps only 8
significant bits, while ViT patch features are so alike (cos ~ 0.995 to the 10th
neighbour) that the k-th and (k+5)-th similarities often differ by only 1e-4. So the
product is arranged to be accurate where it matters, every error source is bounded per
row, and only rows whose margin proves the answer skip the exact float32 product:

1. Centre (w = x - mean: distances unchanged) and split w = V p + u with V the top
   principal directions. p carries most of the energy and goes in as hi + lo bf16 pairs
   (~2^-16 relative error); the small tail u goes in as plain bf16.
2. One bf16 GEMM (float32 accumulation, bf16 output) gives D~_ij ~ ||x_i - x_j||^2
   directly (the norms ride along as extra columns), so the output is small near the
   top and its own rounding (2^-8 relative) is tiny where the neighbours are.
3. The k + _EXTRA smallest D~ per row are re-ranked with exact float32 dot products.
4. A row is certified when every row j outside its candidates has, by the bound,
   ||x_i - x_j||^2 >= lowD_i with lowD_i beyond the exact k-th candidate. Rows that
   are not certified (near-ties, duplicates) are recomputed with the float32 product.

The bound assumes a GEMM that rounds bf16 inputs exactly as given and accumulates in
float32 (any order); candidate pairs are checked against it on every call, and any
violation switches that call to the exact float32 search with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

CERTIFIED_MIN_DIM = 64  # below this the float32 product is cheap; use it directly
CERTIFIED_MIN_ROWS = 512
CERTIFIED_MAX_ROWS = 16384  # the bf16 N x N product is kept whole (2 bytes per entry: 512 MiB here)
_RANK = 16  # principal directions carried in hi + lo bf16
_EXTRA = 6  # candidates re-ranked exactly beyond the k wanted
_GROUP = 16  # selection works on per-row minima over groups of 16 columns
_BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand, round to nearest even)
_F32_U = 2.0**-24
_SLACK = 1e-12  # float64 rounding in the bookkeeping below (values are O(1), d < 10^4)


@dataclass
class KnnStats:
    """How `knn_certified` answered one call."""

    path: str  # "bf16": certified bf16 search; "exact": float32 product for every row (see reason)
    rows: int
    uncertain_rows: int = 0  # bf16 path: rows the bound could not certify, recomputed exactly
    max_bound: float = 0.0  # largest per-row bound on |D~ - ||x_i - x_j||^2|| (excl. output rounding)
    reason: str = ""  # why the exact path was taken


def _gamma(n: int, u: float = _F32_U) -> float:
    """Rounding-error factor of an n-term float32 sum in any order (Higham's gamma_n)."""
    return n * u / (1 - n * u)


def _native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _bf16(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16()


def _f64(t) -> np.ndarray:
    return t.double().numpy()


def _split_bf16(a: np.ndarray):
    """hi + lo bf16 pair with hi + lo = a to ~2^-16 relative."""
    hi = _bf16(a)
    return hi, _bf16(a - _f64(hi))


def _norms(a: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", a, a))


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 product through torch: the bf16 search then runs in one thread pool.

    Alternating numpy (OpenBLAS threads) and torch (OpenMP threads) calls makes each
    pool's idle, spinning workers steal the cores the other needs: with 2 threads the
    search took 2-3x longer than with torch alone.
    """
    return (torch.from_numpy(a) @ torch.from_numpy(b)).numpy()


def _principal_basis(w: np.ndarray, r: int, seed: int = 0) -> np.ndarray:
    """(d, r) orthonormal basis of w's top principal directions, from <= 512 sampled rows.

    Any basis is correct (the bound uses the actual tail norms); a good one only makes
    the tail small, so fewer rows need the exact fallback.
    """
    step = max(1, w.shape[0] // 512)
    ws = w[::step]
    z = _mm(ws.T, _mm(ws, np.random.default_rng(seed).standard_normal((w.shape[1], min(w.shape[1], r + 8)))))
    q = torch.linalg.qr(torch.from_numpy(z)).Q.numpy()
    q = torch.linalg.qr(torch.from_numpy(_mm(ws.T, _mm(ws, q)))).Q.numpy()  # one power iteration
    return np.ascontiguousarray(q[:, :r])


def _bf16_operands(x64: np.ndarray):
    """bf16 A, B and a per-row bound b_i on |A_i . B_j - ||x_i - x_j||^2| (before output rounding).

    The bound is the maximum over j of a pair bound that is symmetric in (i, j), so b_i
    also bounds the error of A_j . B_i: the transposed product may stand in for row i.
    """
    n, d = x64.shape
    w = x64 - x64.mean(axis=0)
    V = _principal_basis(w, min(_RANK, d // 4))
    p = _mm(w, V)
    ph, pl = _split_bf16(p)
    ph64, pl64 = _f64(ph), _f64(pl)
    P = ph64 + pl64
    u = w - _mm(P, V.T)  # w = V P + u exactly (up to _SLACK)
    Q = _bf16(u)
    Q64 = _f64(Q)
    eta = u - Q64  # bf16 rounding of the tail
    nu = np.einsum("ij,ij->i", w, w)
    nh, nl = _split_bf16(nu[:, None])
    nh64, nl64 = _f64(nh)[:, 0], _f64(nl)[:, 0]
    nu_err = np.abs(nu - (nh64 + nl64))
    one = torch.ones((n, 1), dtype=torch.bfloat16)
    # A_i . B_j = nu_i + nu_j - 2 (ph.ph + ph.pl + pl.ph + Q.Q) ~ ||w_i - w_j||^2
    A = torch.cat([-2 * ph, -2 * ph, -2 * pl, -2 * Q, nh, nl, one, one], dim=1)
    B = torch.cat([ph, pl, ph, Q, one, one, nh, nl], dim=1)

    # ||w_i - w_j||^2 - (exact value of A_i . B_j), with g_i = V^T u_i = (p_i - P_i) - E P_i:
    #   (nu_i - nu^_i) + (nu_j - nu^_j) - 2 [P_i^T E P_j + P_i.g_j + g_i.P_j
    #                                        + eta_i.Q_j + Q_i.eta_j + eta_i.eta_j + pl_i.pl_j]
    # each term bounded by Cauchy-Schwarz with the largest norm over j.
    E = np.linalg.norm(_mm(V.T, V) - np.eye(V.shape[1]))  # Frobenius >= spectral norm
    Pn, Qn, en = _norms(P), _norms(Q64), _norms(eta)
    phn, pln = _norms(ph64), _norms(pl64)
    gn = _norms(p - P) + E * Pn
    eps = (
        nu_err
        + nu_err.max()
        + _SLACK
        + 2
        * (
            E * Pn * Pn.max()
            + Pn * gn.max()
            + gn * Pn.max()
            + en * Qn.max()
            + Qn * en.max()
            + en * en.max()
            + pln * pln.max()
        )
    )
    # float32 accumulation of the K products (each exact in float32): gamma_K sum |A_ik B_jk|.
    nhl = np.abs(nh64) + np.abs(nl64)
    acc = _gamma(A.shape[1]) * (2 * (phn * (phn.max() + pln.max()) + pln * phn.max() + Qn * Qn.max()) + nhl + nhl.max())
    return A, B, eps + acc


def _dots_of(x: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """float32 x_i . x_cand[i, c] for all i, c (gathered in row blocks that stay in cache;
    einsum, not BLAS, for the reason given in `_mm`)."""
    out = np.empty(cand.shape, dtype=np.float32)
    for s in range(0, len(x), 128):
        out[s : s + 128] = np.einsum("bkd,bd->bk", x[cand[s : s + 128]], x[s : s + 128])
    return out


def _l2_from_dots(dots: np.ndarray, sq_i: np.ndarray, sq_j: np.ndarray) -> np.ndarray:
    """Squared distances ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j in float32, as FAISS computes them."""
    return (sq_i[:, None] + sq_j) - 2 * dots


def _exact_rows(x: np.ndarray, rows: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 search for the query rows `rows` (each excluding itself), best first."""
    n = x.shape[0]
    sq = np.einsum("ij,ij->i", x, x)
    out_s, out_i = np.empty((len(rows), k), np.float32), np.empty((len(rows), k), np.int64)
    block = max(1, min(len(rows), (1 << 22) // n))  # 16 MB of float32 scores per block
    for start in range(0, len(rows), block):
        r = rows[start : start + block]
        s = x[r] @ x.T
        if metric == "l2":
            s = -_l2_from_dots(s, sq[r], sq)  # negated so that larger is nearer
        s[np.arange(len(r)), r] = -np.inf
        vals, ids = torch.topk(torch.from_numpy(s), k, dim=1, largest=True, sorted=True)
        out_s[start : start + len(r)] = vals.numpy() if metric == "ip" else -vals.numpy()
        out_i[start : start + len(r)] = ids.numpy()
    return out_s, out_i


def _smallest(D, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """c smallest entries per row of a bf16 block (R, G * _GROUP), and a bound on the others.

    Returns (cols, values, rest, ok). Non-negative bf16 values order like their int16 bit
    patterns, so the selection runs on int16 keys: per-row minima over _GROUP strided
    column groups, the c best groups, then the c best of their members (int16 key and
    position packed into one int32, so a plain sort also carries the argument). Every
    entry left out is >= rest = min((c+1)-th group minimum, (c+1)-th member); ok is False
    where rest < 0 (its row has negative values, whose bit patterns order backwards).
    """
    keys = D.view(torch.int16).numpy()
    R, npad = keys.shape
    groups = npad // _GROUP
    gmin = keys.reshape(R, _GROUP, groups).min(axis=1)
    g = np.sort((gmin.astype(np.int32) << 16) | np.arange(groups, dtype=np.int32), axis=1)[:, : c + 1]
    cols = ((g[:, :c] & 0xFFFF)[:, :, None] + groups * np.arange(_GROUP)).reshape(R, c * _GROUP)
    member = keys.ravel().take(cols + (np.arange(R) * npad)[:, None])
    m = np.sort((member.astype(np.int32) << 16) | np.arange(c * _GROUP, dtype=np.int32), axis=1)[:, : c + 1]
    top = np.take_along_axis(cols, m[:, :c] & 0xFFFF, axis=1)
    rest = np.minimum(m[:, c] >> 16, g[:, c] >> 16).astype(np.int16)
    return top, _bf16_values(m[:, :c] >> 16), _bf16_values(rest), rest >= 0


def _bf16_values(keys: np.ndarray) -> np.ndarray:
    """float64 values of bf16 bit patterns given as integers."""
    return torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int16)).view(torch.bfloat16).double().numpy()


def knn_certified(x: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray, KnnStats]:
    """Exact kNN (same answer as a float32 brute force, up to exact ties) via a certified bf16 search.

    Returns (scores, idx, stats) like `knn`. Falls back to the exact float32 product when
    the bf16 path cannot pay off or cannot be trusted: small d or N, no native bf16 on
    this CPU, rows of unequal norm for "ip" (ranking by distance then differs from ranking
    by inner product), or a product outside its error bound.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    x64 = x.astype(np.float64)
    n, d = x.shape
    c = k + _EXTRA
    sq64 = np.einsum("ij,ij->i", x64, x64)
    reason = ""
    if d < CERTIFIED_MIN_DIM or n < max(CERTIFIED_MIN_ROWS, 2 * _GROUP * (c + 1)):
        reason = f"N={n}, d={d} too small to gain"
    elif n > CERTIFIED_MAX_ROWS:
        reason = f"N={n} > {CERTIFIED_MAX_ROWS}: the bf16 N x N block would take {2 * n * n / 2**30:.1f} GiB"
    elif metric == "ip" and sq64.max() - sq64.min() > 1e-3 * sq64.max():
        reason = "rows of unequal norm"
    elif not _native_bf16():
        reason = "no native bf16 on this CPU"
    if reason:
        s, i = _exact_rows(x, np.arange(n), k, metric)
        return s, i, KnnStats(path="exact", rows=n, reason=reason)

    A, B, bound = _bf16_operands(x64)
    groups = -(-n // _GROUP)
    D = torch.empty((n, groups * _GROUP), dtype=torch.bfloat16)
    D[:, n:] = torch.inf  # padding columns
    # D~ approximates a symmetric matrix and each row's bound also covers its column
    # (see _bf16_operands): compute the block upper triangle, mirror the rest.
    step = -(-n // 8)
    for a in range(0, n, step):
        torch.mm(A[a : a + step], B[a:].T, out=D[a : a + step, a:n])
    keys = D.view(torch.int16)
    for a in range(step, n, step):
        b = min(n, a + step)
        keys[a:b, :a].copy_(keys[:a, a:b].T)
    D.diagonal().fill_(torch.inf)  # self
    cand, approx, rest, ok = _smallest(D, c)

    dots = _dots_of(x, cand)
    xn = np.sqrt(sq64)
    delta = _gamma(d) * xn * xn.max()  # float32 dot-product error, any summation order
    # Sanity check of the bound on the candidates: exact distance vs bf16 value.
    d_exact = sq64[:, None] + sq64[cand] - 2 * dots.astype(np.float64)
    slack = (bound + 2 * delta)[:, None] + _BF16_U / (1 - _BF16_U) * np.abs(approx)
    if not (np.abs(approx - d_exact) <= slack).all():
        worst = float((np.abs(approx - d_exact) - slack).max())
        logger.warning("bf16 product exceeds its error bound by %.3g; using the exact float32 search", worst)
        s, i = _exact_rows(x, np.arange(n), k, metric)
        return s, i, KnnStats(path="exact", rows=n, reason="bf16 product outside its bound")

    # Every j outside the candidates has D~_ij >= rest_i >= 0, so (bf16 output rounding
    # <= 2^-8 relative) its exact squared distance is >= low_i:
    low = rest / (1 + _BF16_U) - bound
    if metric == "ip":
        scores, order = dots, np.argsort(-dots, axis=1, kind="stable")
        scores = np.take_along_axis(scores, order, 1)
        # x_i.x_j = (|x_i|^2 + |x_j|^2 - ||x_i - x_j||^2) / 2 <= (sq_i + max sq - low_i) / 2
        ok &= 0.5 * (sq64 + sq64.max() - low) < scores[:, k - 1] - delta
    else:
        sq = sq64.astype(np.float32)
        scores = _l2_from_dots(dots, sq, sq[cand])
        order = np.argsort(scores, axis=1, kind="stable")
        scores = np.take_along_axis(scores, order, 1)
        # float32 evaluation of |x_i|^2 + |x_j|^2 - 2 x_i.x_j: 2 delta plus 4 roundings
        err = 2 * delta + 4 * _F32_U * (sq64 + sq64.max() + 2 * xn * xn.max())
        ok &= low > scores[:, k - 1] + err
    idx = np.take_along_axis(cand, order, 1)[:, :k]
    scores = np.ascontiguousarray(scores[:, :k])
    uncertain = np.flatnonzero(~ok)
    if len(uncertain):
        scores[uncertain], idx[uncertain] = _exact_rows(x, uncertain, k, metric)
    stats = KnnStats(path="bf16", rows=n, uncertain_rows=len(uncertain), max_bound=float(bound.max()))
    logger.debug("certified kNN: N=%d d=%d, %d uncertain rows recomputed exactly", n, d, len(uncertain))
    return scores, idx, stats
