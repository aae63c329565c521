"""Affinity graph over the patches of one image: a sparse kNN graph plus a global term.

W_ij = max(cos(f_i, f_j), 0) for j among the k nearest neighbours of i (by cosine),
symmetrised, plus an optional colour/position term (the image-matting kNN affinity of
Deep Spectral Methods), plus the *global term* g k(p_i . p_j) between every pair
(i != j), with p_i the unit feature f_i projected on the image's top `global_rank`
principal directions and k the kernel `global_kernel`: "affine" (default)
k(c) = (1 + c) / 2, or "cosine" k(c) = c + s, the rank-r approximation of Deep Spectral
Methods' own dense affinity max(c, 0) (s = 0 unless some pair has c < 0, see
`global_factor`); sharper, better on max F-beta and span-K, not on every metric
(docs/BENCHMARKS.md, "Quality of the priors"). The global term is never formed: it is the
low-rank factor `Graph.lowrank` (N x (r + 1)), applied in O(N r) inside the solvers' products
(`spectral.NormalizedAffinity`, `batched`). Why it is there: a kNN graph only links
near-duplicates (cos ~ 0.99), so its cheapest cut separates two large background
regions that share few kNN links (water above, bank below) and the object goes with
one of them; the global
term adds how similar *every* pair is, which is what separates an object from its
background in the dense affinity of Deep Spectral Methods, at O(N r) instead of O(N^2).

The dense N x N affinity of the original code is formed only for kind "dense" (the
Deep Spectral Methods baseline, `build_dense_graph`). The kNN search never keeps it in
float32: FAISS searches exactly without keeping it, the torch backend computes it in
row blocks, and the default "certified" backend searches a bfloat16 product and proves
its answer exact (see `knn_certified`).

Isolated nodes (every similarity <= threshold) keep degree 0. The Laplacian in
`spectral.py` sets D^-1/2 = 0 for them, so their rows of L = I - D^-1/2 W D^-1/2 are
rows of the identity: they contribute eigenvalue 1, never one of the smallest, and
their entries in the low eigenvectors are 0. `Graph.num_isolated` records the count.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

BACKENDS = ("certified", "faiss", "torch", "batched")
KINDS = ("knn", "dense")
# Settings that did not exist in stores written before the global term: a manifest
# leaves them out at these values (the old behaviour), so old fingerprints still match.
_LEGACY_DEFAULTS = {"kind": "knn", "global_weight": 0.0, "global_kernel": "affine"}
GLOBAL_KERNELS = ("cosine", "affine")
DENSE_MAX_NODES = 8192  # the dense baseline keeps N x N float64 (512 MiB here)


@dataclass(frozen=True)
class GraphConfig:
    """Affinity graph settings (stored in the prior-store manifest).

    xy_weight (lambda_xy) scales patch positions in the colour kNN: positions are
    normalised by the grid size (x = column / (w - 1), y = row / (h - 1), both in
    [0, 1]) and colours are in [0, 1], so lambda_xy = 1 makes crossing the whole image
    count as much as going from black to white. The default 2.0 is the first scale
    of Deep Spectral Methods' `knn_affinity`.

    kind "knn" (default) is the sparse kNN graph plus the global term; "dense" is the
    original Deep Spectral Methods affinity max(F F^T, 0) / max over all pairs (the
    baseline, `build_dense_graph`; k, threshold, colour and global settings unused).

    global_weight g (default 1; 0 = the kNN graph alone, the setting before the global
    term) weighs the global affinity k(p_i . p_j) against the kNN cosines;
    global_rank r (default 32; 0 = all d dimensions) is the number of principal
    directions of the unit features kept in p: 32 carry > 99% of their energy on ViT
    features, and the solver's products cost O(N r). global_kernel k: "affine"
    (default) (1 + p_i . p_j) / 2, the first global term (manifests leave the key out
    at this value, so stores written before the field existed keep their fingerprint);
    "cosine" p_i . p_j (+ a shift only where some pair is negative, `global_factor`),
    the low-rank form of DSM's max(cos, 0).

    backend: "certified" (default; exact, fastest on CPUs with native bfloat16, see
    `knn_certified`), "faiss" (exact float32 flat index), "torch" (exact float32
    product in row blocks, also on a GPU) or "batched" (the GPU fast path: every image
    of a batch at once, `build_knn_graphs`, on the features' device, a certified fp16
    search on a GPU; one image at a time it is "torch"). All return the same neighbours
    up to exact ties.
    """

    k: int = 10
    backend: str = "certified"
    threshold: float = 0.0
    color_weight: float = 0.0
    color_k: int = 10
    xy_weight: float = 2.0
    device: str = "cpu"
    kind: str = "knn"
    global_weight: float = 1.0
    global_rank: int = 32
    global_kernel: str = "affine"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown graph kind {self.kind!r}; choose from {list(KINDS)}")
        if self.global_kernel not in GLOBAL_KERNELS:
            raise ValueError(f"unknown global kernel {self.global_kernel!r}; choose from {list(GLOBAL_KERNELS)}")
        if self.global_weight < 0 or self.global_rank < 0:
            raise ValueError(
                f"global_weight and global_rank must be >= 0 (got {self.global_weight}, {self.global_rank})"
            )
        if self.backend not in (*BACKENDS, "auto"):  # "auto": resolved by the job (job.resolve_auto)
            raise ValueError(f"unknown graph backend {self.backend!r}; choose from {[*BACKENDS, 'auto']}")
        if self.k < 1 or self.color_k < 1:
            raise ValueError(f"k and color_k must be >= 1 (got k={self.k}, color_k={self.color_k})")
        # A negative threshold would let negative cosines in as negative weights, and a
        # Laplacian with negative weights is no longer positive semi-definite.
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0 (got {self.threshold})")
        if self.color_weight < 0 or self.xy_weight < 0:
            raise ValueError("color_weight and xy_weight must be >= 0")

    def describe(self) -> dict:
        """The manifest's "graph" section: every field, except new ones at their legacy value.

        A store written before the global term existed has no kind / global_* keys and
        means kind "knn" without global term; leaving those keys out when they hold the
        old behaviour keeps such stores' fingerprints equal to a run with --global-weight 0.
        Likewise a store written before global_kernel existed has no such key: "affine".
        """
        out = asdict(self)
        if self.kind == "dense":
            out["global_weight"] = 0.0  # unused by the dense baseline
        if out["global_weight"] == 0:
            out.pop("global_rank")  # meaningless without the global term
            out.pop("global_kernel")
        for key, legacy in _LEGACY_DEFAULTS.items():
            if out.get(key) == legacy:
                out.pop(key)
        return out


@dataclass
class Graph:
    """Symmetric non-negative affinity over the h*w patches (row-major): W + the global term.

    W: sparse part, zero diagonal (kind "knn"; the dense baseline keeps DSM's diagonal).
    lowrank: None, or G (N, r) with the global affinity g (G G^T - diag(G G^T)):
    G = [sqrt(s), P] for the kernel "cosine", [1, P] / sqrt(2) for "affine"
    (`global_factor`). G G^T >= 0 entrywise either way, so the whole affinity stays
    non-negative.
    """

    W: sp.csr_matrix
    grid: tuple[int, int]
    lowrank: np.ndarray | None = None
    global_weight: float = 0.0

    @property
    def num_nodes(self) -> int:
        return self.W.shape[0]

    @property
    def degrees(self) -> np.ndarray:
        """Row sums of the whole affinity; the global part's in O(N r): g (G (G^T 1) - |G_i|^2)."""
        d = np.asarray(self.W.sum(axis=1), dtype=np.float64).ravel()
        if self.lowrank is not None and self.global_weight > 0:
            G = self.lowrank.astype(np.float64)
            d = d + self.global_weight * (G @ G.sum(axis=0) - np.einsum("ij,ij->i", G, G))
        return d

    def toarray(self) -> np.ndarray:
        """The whole affinity as a dense (N, N) float64 array (tests and small references only)."""
        W = self.W.toarray().astype(np.float64)
        if self.lowrank is not None and self.global_weight > 0:
            G = self.lowrank.astype(np.float64)
            Wg = G @ G.T
            np.fill_diagonal(Wg, 0.0)
            W += self.global_weight * Wg
        return W

    @property
    def num_isolated(self) -> int:
        return int(np.count_nonzero(self.degrees == 0))


def _torch_device(device: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available; using cpu", device)
        device = "cpu"
    return torch.device(device)


def _drop_self(scores: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep k of the k+1 results per row, removing the query itself.

    With duplicate points the query need not come first (ties), so it is removed
    wherever it is; a row where it is absent loses its last (worst) result instead.
    """
    n = idx.shape[0]
    keep = idx != np.arange(n)[:, None]
    full = keep.all(axis=1)
    keep[full, -1] = False
    return scores[keep].reshape(n, k), idx[keep].reshape(n, k)


def _knn_faiss(x: np.ndarray, k: int, metric: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    if device.startswith("cuda") or device == "auto":
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            gpu = int(device.split(":")[1]) if ":" in device else 0
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
        elif device != "auto":
            logger.warning("faiss has no GPU support here (pip install faiss-gpu-cu12); using the CPU index")
    index.add(x)
    scores, idx = index.search(x, k + 1)
    return _drop_self(scores, idx, k)


def _knn_torch(x: np.ndarray, k: int, metric: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    dev = _torch_device(device)
    xt = torch.from_numpy(x).to(dev)
    n = xt.shape[0]
    sq = (xt * xt).sum(1)
    # Rows per block so that one block of scores stays ~64 MB: memory O(N * chunk).
    chunk = max(1, min(n, (1 << 24) // n))
    out_s, out_i = [], []
    for start in range(0, n, chunk):
        q = xt[start : start + chunk]
        s = q @ xt.T
        if metric == "l2":
            # Same expansion as faiss (|q|^2 + |x|^2 - 2 q.x); negated so topk is "largest".
            s = 2 * s - sq[start : start + chunk, None] - sq[None, :]
        rows = torch.arange(q.shape[0], device=dev)
        s[rows, rows + start] = -torch.inf  # exclude self
        vals, ids = torch.topk(s, k, dim=1, largest=True, sorted=True)
        out_s.append(vals if metric == "ip" else -vals)
        out_i.append(ids)
    return torch.cat(out_s).cpu().numpy(), torch.cat(out_i).cpu().numpy().astype(np.int64)


# --- certified bfloat16 search --------------------------------------------------------
#
# The exact search is one N x N x d product plus a top-k; at N ~ 3,500, d = 384 the
# float32 product alone takes ~50-60 ms on one core. A bfloat16 product runs ~3x faster
# on CPUs with native bf16 dot products (AVX512_BF16 / AMX), but bfloat16 keeps only 8
# significant bits, while ViT patch features are so alike (cos ~ 0.995 to the 10th
# neighbour) that the k-th and (k+5)-th similarities often differ by only 1e-4. So the
# product is arranged to be accurate where it matters, every error source is bounded per
# row, and only rows whose margin proves the answer skip the exact float32 product:
#
# 1. Centre (w = x - mean: distances unchanged) and split w = V p + u with V the top
#    principal directions. p carries most of the energy and goes in as hi + lo bf16 pairs
#    (~2^-16 relative error); the small tail u goes in as plain bf16.
# 2. One bf16 GEMM (float32 accumulation, bf16 output) gives D~_ij ~ ||x_i - x_j||^2
#    directly (the norms ride along as extra columns), so the output is small near the
#    top and its own rounding (2^-8 relative) is tiny where the neighbours are.
# 3. The k + _EXTRA smallest D~ per row are re-ranked with exact float32 dot products.
# 4. A row is certified when every row j outside its candidates has, by the bound,
#    ||x_i - x_j||^2 >= lowD_i with lowD_i beyond the exact k-th candidate. Rows that
#    are not certified (near-ties, duplicates) are recomputed with the float32 product.
#
# The bound assumes a GEMM that rounds bf16 inputs exactly as given and accumulates in
# float32 (any order); candidate pairs are checked against it on every call, and any
# violation switches that call to the exact float32 search with a warning.

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
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _bf16(a: np.ndarray):
    import torch

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
    import torch

    return (torch.from_numpy(a) @ torch.from_numpy(b)).numpy()


def _principal_basis(w: np.ndarray, r: int, seed: int = 0) -> np.ndarray:
    """(d, r) orthonormal basis of w's top principal directions, from <= 512 sampled rows.

    Any basis is correct (the bound uses the actual tail norms); a good one only makes
    the tail small, so fewer rows need the exact fallback.
    """
    import torch

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
    import torch

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
    import torch

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
    import torch

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
    import torch

    return torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int16)).view(torch.bfloat16).double().numpy()


def knn_certified(x: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray, KnnStats]:
    """Exact kNN (same answer as a float32 brute force, up to exact ties) via a certified bf16 search.

    Returns (scores, idx, stats) like `knn`. Falls back to the exact float32 product when
    the bf16 path cannot pay off or cannot be trusted: small d or N, no native bf16 on
    this CPU, rows of unequal norm for "ip" (ranking by distance then differs from ranking
    by inner product), or a product outside its error bound.
    """
    import torch

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


def _knn_certified(x: np.ndarray, k: int, metric: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    if device != "cpu" and _torch_device(device).type != "cpu":
        # A GPU runs the exact float32 product fast; the bf16 certificate is for CPUs.
        return _knn_torch(x, k, metric, device)
    scores, idx, _ = knn_certified(x, k, metric)
    return scores, idx


def knn(x: np.ndarray, k: int, *, metric: str, backend: str, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest other rows of x: (scores, idx), each (N, k), best first.

    metric "ip" scores are inner products (descending); "l2" scores are squared
    Euclidean distances (ascending, clipped at 0). Every backend returns the neighbours
    of a float32 brute force (up to exact ties) with its float32 scores; "certified"
    gets there fastest on CPUs with native bf16 (see `knn_certified`).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose from {list(BACKENDS)}")
    fn = {"certified": _knn_certified, "faiss": _knn_faiss, "torch": _knn_torch, "batched": _knn_torch}[backend]
    scores, idx = fn(x, k, metric, device)
    if metric == "l2":
        scores = np.maximum(scores, 0.0)
    return scores, idx


def _sparse_from_knn(weights: np.ndarray, idx: np.ndarray, n: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(n), idx.shape[1])
    keep = weights.ravel() > 0
    W = sp.csr_matrix((weights.ravel()[keep].astype(np.float64), (rows[keep], idx.ravel()[keep])), shape=(n, n))
    # max(W, W^T): the cosine is symmetric, so wherever both directions were found the
    # two weights agree and max keeps that value; elsewhere it keeps the one-sided edge
    # (union of kNN relations). The mean would halve one-sided edges for no reason, and
    # min (mutual kNN) fragments the graph into many small components.
    return W.maximum(W.T).tocsr()


def _grid_xy(grid: tuple[int, int]) -> np.ndarray:
    h, w = grid
    y, x = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=1)


def _color_affinity(colors: np.ndarray, cfg: GraphConfig, grid: tuple[int, int], k: int) -> sp.csr_matrix:
    """Gaussian kNN affinity over (r, g, b, lambda_xy x, lambda_xy y).

    Weights exp(-d^2 / sigma^2) with sigma^2 the mean squared kNN distance of this
    image (self-tuning: the same config works for flat and for busy images). DSM uses
    weight 1 for every kNN edge; a Gaussian keeps weak links weak across colour edges.
    """
    f = np.concatenate([colors, cfg.xy_weight * _grid_xy(grid)], axis=1).astype(np.float32)
    d2, idx = knn(f, k, metric="l2", backend=cfg.backend, device=cfg.device)
    sigma2 = float(d2.mean())
    weights = np.exp(-d2 / sigma2) if sigma2 > 0 else np.ones_like(d2)
    return _sparse_from_knn(weights, idx, f.shape[0])


def _pair_dots(x: np.ndarray, idx: np.ndarray, block: int = 1024) -> np.ndarray:
    """x_i . x_idx[i, j] in float64 with a fixed summation order (thread-independent)."""
    out = np.empty(idx.shape, dtype=np.float64)
    x64 = x.astype(np.float64)
    for lo in range(0, len(idx), block):
        rows = x64[lo : lo + block]
        out[lo : lo + block] = np.einsum("nd,nkd->nk", rows, x64[idx[lo : lo + block]])
    return out


def global_factor(x, rank: int, kernel: str = "affine", seed: int = 0):
    """G (N, r + 1) float32 with G G^T = k(P P^T), P = x projected on its top `rank` directions.

    kernel "cosine": k(c) = c + s, G = [sqrt(s), P], with s = max(0, -min_ij p_i . p_j)
    the smallest constant shift that keeps every pair's weight >= 0 (so the Laplacian
    stays positive semi-definite). The minimum is computed exactly in row blocks, never
    kept: O(N^2 r), a tenth of the kNN search's O(N^2 d). ViT key cosines are positive
    (>= 0.57 on every DAVIS dev frame), so s = 0 there and G G^T = P P^T, the rank-r
    approximation of Deep Spectral Methods' max(x x^T, 0). kernel "affine":
    k(c) = (1 + c) / 2, G = [1, P] / sqrt(2), in [0, 1] without a shift.

    x: (N, d) unit rows, a numpy array (returns numpy) or a torch tensor (returns a tensor
    on its device: the batched GPU path). The directions are the top right singular
    vectors of x (not centred: P P^T is then the best rank-r approximation of the cosine
    matrix x x^T), found by a seeded randomised subspace iteration on <= 1024 evenly
    spaced rows: O(N d r), not the O(N d^2) of an exact SVD. Any orthonormal basis keeps
    |p_i| <= 1, i.e. the global affinity in [0, 1]. rank 0 or >= d keeps x whole.
    """
    import torch

    is_numpy = not isinstance(x, torch.Tensor)
    t = torch.from_numpy(np.asarray(x)) if is_numpy else x
    t = t.double()
    n, d = t.shape
    if 0 < rank < d:
        rows = t[:: max(1, n // 1024)]
        omega = torch.from_numpy(np.random.default_rng(seed).standard_normal((d, min(d, rank + 8)))).to(t.device)
        q = torch.linalg.qr(rows.T @ (rows @ omega)).Q
        for _ in range(2):  # power iterations: the spectrum of ViT features decays fast, two suffice
            q = torch.linalg.qr(rows.T @ (rows @ q)).Q
        v = torch.linalg.svd(rows @ q, full_matrices=False).Vh
        t = t @ (q @ v.T[:, :rank])
    if kernel == "affine":
        G = torch.cat([torch.ones((n, 1), dtype=t.dtype, device=t.device), t], dim=1) / np.sqrt(2.0)
    elif kernel == "cosine":
        lowest = min(float((t[lo : lo + 1024] @ t.T).min()) for lo in range(0, n, 1024))
        shift = torch.full((n, 1), np.sqrt(max(0.0, -lowest)), dtype=t.dtype, device=t.device)
        G = torch.cat([shift, t], dim=1)
    else:
        raise ValueError(f"unknown global kernel {kernel!r}; choose from {list(GLOBAL_KERNELS)}")
    G = G.float()
    return G.numpy() if is_numpy else G


def build_graph(
    feats: np.ndarray, cfg: GraphConfig, *, grid: tuple[int, int], colors: np.ndarray | None = None
) -> Graph:
    """The graph of one image for `cfg.kind`: `build_knn_graph` or the dense baseline `build_dense_graph`."""
    if cfg.kind == "dense":
        return build_dense_graph(feats, grid=grid)
    return build_knn_graph(feats, cfg, grid=grid, colors=colors)


def _unit_rows(feats: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Checked (N, d) features re-normalised to unit rows (cosine is what is measured)."""
    feats = np.asarray(feats)
    h, w = (int(v) for v in grid)
    if feats.ndim != 2:
        raise ValueError(f"feats must be (N, d), got shape {feats.shape}")
    n = feats.shape[0]
    if h < 1 or w < 1 or h * w != n:
        raise ValueError(f"feats have {n} rows but grid {tuple(grid)} has {h * w} patches")
    if n < 2:
        raise ValueError("a graph needs at least 2 patches")
    if not np.isfinite(feats).all():
        raise ValueError(f"feats contain NaN/Inf ({np.count_nonzero(~np.isfinite(feats))} values)")
    norms = np.linalg.norm(feats.astype(np.float32), axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"feats contain {int((norms == 0).sum())} all-zero rows (cosine undefined)")
    return (feats / norms).astype(np.float32)


def build_dense_graph(feats: np.ndarray, *, grid: tuple[int, int]) -> Graph:
    """The affinity of Deep Spectral Methods, W = max(F F^T, 0) / max, over all N^2 pairs.

    The baseline only (kind "dense"): O(N^2) memory. As in the original code, the
    diagonal (self-similarity) is kept; with the solver "generalized" this is their
    eigsh(D - W, M = D, sigma = 0).
    """
    x = _unit_rows(feats, grid)
    n = x.shape[0]
    if n > DENSE_MAX_NODES:
        raise ValueError(f"the dense baseline refuses N={n} > {DENSE_MAX_NODES} patches (O(N^2) memory)")
    x64 = x.astype(np.float64)
    W = np.maximum(x64 @ x64.T, 0.0)
    W /= W.max()
    return Graph(W=sp.csr_matrix(W), grid=(int(grid[0]), int(grid[1])))


def build_knn_graph(
    feats: np.ndarray, cfg: GraphConfig, *, grid: tuple[int, int], colors: np.ndarray | None = None
) -> Graph:
    """Build the symmetric kNN cosine affinity (plus colour and global terms) of one image.

    feats: (h*w, d) patch features, row-major over the grid; cosine similarity is what
    is measured, so rows are re-normalised here (a no-op for L2-normalised input).
    colors: (h*w, 3) in [0, 1] (see `patch_colors`); required when cfg.color_weight > 0.
    The global term (cfg.global_weight > 0) is returned as `Graph.lowrank`, never formed.
    """
    if cfg.kind != "knn":
        raise ValueError(f"build_knn_graph builds kind 'knn', not {cfg.kind!r} (see build_graph)")
    x = _unit_rows(feats, grid)
    h, w = (int(v) for v in grid)
    n = x.shape[0]

    k = cfg.k
    if k >= n:
        logger.warning("k=%d >= number of patches %d; clamping k to %d", k, n, n - 1)
        k = n - 1
    _, idx = knn(x, k, metric="ip", backend=cfg.backend, device=cfg.device)
    # Recompute the kept similarities per pair in float64: BLAS products change in the last
    # bit with the thread count (and backend), and the store must not depend on either.
    sims = _pair_dots(x, idx)
    # Dropping <= threshold (>= 0) also removes every negative cosine: W = max(cos, 0).
    W = _sparse_from_knn(np.where(sims > cfg.threshold, sims, 0.0), idx, n)

    if cfg.color_weight > 0:
        if colors is None:
            raise ValueError("cfg.color_weight > 0 needs colors (see patch_colors)")
        colors = np.asarray(colors, dtype=np.float32)
        if colors.shape != (n, 3):
            raise ValueError(f"colors must be ({n}, 3) for grid {(h, w)}, got {colors.shape}")
        if not np.isfinite(colors).all():
            raise ValueError("colors contain NaN/Inf")
        W = (W + cfg.color_weight * _color_affinity(colors, cfg, (h, w), min(cfg.color_k, n - 1))).tocsr()

    lowrank = global_factor(x, cfg.global_rank, cfg.global_kernel) if cfg.global_weight > 0 else None
    graph = Graph(W=W, grid=(h, w), lowrank=lowrank, global_weight=cfg.global_weight if lowrank is not None else 0.0)
    if graph.num_isolated:
        logger.debug("graph %s: %d isolated patches (degree 0)", (h, w), graph.num_isolated)
    return graph


def build_knn_graphs(feats: list, cfg: GraphConfig, *, grids: list[tuple[int, int]], precision: str | None = None):
    """The kNN graphs of B images at once, as one padded ELL batch (`batched.Ell`).

    feats: per image (h*w, d) arrays or torch tensors; tensors stay on their device (a
    GPU extractor's output never visits the host), arrays go to cfg.device. Same graph
    as `build_knn_graph` per image, up to exact ties, with float64 weights. The search
    (`batched.batched_knn`) runs in `precision`: by default the certified fp16 search on
    a GPU (tensor cores; rows it cannot certify are searched again in float32) and one
    float32 product on a CPU. The global term (cfg.global_weight > 0) rides along as
    `Ell.lowrank`. No colour term: that one is built per image (`build_knn_graph`, then
    `batched.ell_from_graphs`).
    """
    import torch

    from .batched import batched_knn, ell_graph

    if cfg.kind != "knn":
        raise ValueError(f"build_knn_graphs builds kind 'knn', not {cfg.kind!r}; build it per image (build_graph)")
    if cfg.color_weight > 0:
        raise ValueError("build_knn_graphs has no colour term; build those graphs per image with build_knn_graph")
    if not feats or len(feats) != len(grids):
        raise ValueError(f"need one grid per image and at least one image, got {len(feats)} and {len(grids)}")
    tensors = [f if isinstance(f, torch.Tensor) else torch.from_numpy(np.asarray(f, dtype=np.float32)) for f in feats]
    for t, (h, w) in zip(tensors, grids):
        if t.ndim != 2 or t.shape[0] != h * w or t.shape[0] < 2:
            raise ValueError(f"features of shape {tuple(t.shape)} do not fit grid {(h, w)} (need >= 2 patches)")
    device = tensors[0].device if isinstance(feats[0], torch.Tensor) else _torch_device(cfg.device)
    n_valid = [t.shape[0] for t in tensors]
    n, d = max(n_valid), tensors[0].shape[1]
    padded = torch.zeros((len(tensors), n, d), dtype=torch.float32, device=device)
    for b, t in enumerate(tensors):
        padded[b, : t.shape[0]] = t.to(device, torch.float32)
    # k clamps to the smallest image's size like build_knn_graph's (missing slots are empty)
    k = min(cfg.k, n - 1)
    precision = precision or ("fp16" if device.type == "cuda" else "fp32")
    idx, sims = batched_knn(padded, k, n_valid=n_valid, device=str(device), precision=precision)
    ell = ell_graph(idx, sims, n_valid=n_valid, threshold=cfg.threshold)
    if cfg.global_weight > 0:
        factors = []
        for b, nb in enumerate(n_valid):  # small per-image work (a few (N, r) products), on the device
            x = padded[b, :nb]
            x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
            factors.append(global_factor(x, cfg.global_rank, cfg.global_kernel))
        ell.lowrank = torch.zeros((len(tensors), n, factors[0].shape[1]), dtype=torch.float32, device=device)
        for b, G in enumerate(factors):
            ell.lowrank[b, : G.shape[0]] = G
        ell.global_weight = cfg.global_weight
    return ell


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights averaging input cells over each output cell's exact extent."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    px = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def patch_colors(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Area-average an (H, W, 3) uint8 RGB image down to the patch grid: (h*w, 3) float32 in [0, 1].

    Output cells may straddle pixel boundaries (the extractor resizes the image, so
    H / h need not be an integer); partial pixels are weighted by their overlap.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    h, w = (int(v) for v in grid)
    if h < 1 or w < 1:
        raise ValueError(f"invalid grid {grid}")
    img = image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    rh, rw = _area_matrix(image.shape[0], h), _area_matrix(image.shape[1], w)
    out = np.einsum("ih,hwc,jw->ijc", rh, img, rw, optimize=True)
    return np.clip(out.reshape(h * w, 3), 0.0, 1.0).astype(np.float32)
