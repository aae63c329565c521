"""The kNN of B images at once (`batched_knn`): one padded (B, N, N) product and top-k.

The search behind the graph backend "batched" (`graph.build_knn_graphs`), on the
features' device: float32, or a certified fp16 / bf16 search on a GPU's tensor cores
whose answer is the float32 one (up to exact ties). Images of different sizes share a
batch by padding to a common N with a per-image count `n_valid` (`ell.valid_mask`).
"""

from __future__ import annotations

import contextlib

import torch

from sazs.core.devices import resolve_device

from .ell import as_torch, valid_mask

_KNN_BYTES = 1 << 30  # score block per kNN chunk (images x N x N), ~1 GiB
_RERANK = 16  # extra candidates re-ranked exactly after a bf16/fp16 ranking product
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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
    "bf16" (tensor cores on a GPU): a certified search, like `knn_certified.knn_certified` on the
    CPU. The low-precision product ranks; its best k + 16 candidates are re-ranked with
    float64 dot products; a row is *certified* when its exact k-th similarity beats the
    best non-candidate's low-precision score by more than a rounding-error bound, which
    proves that no non-candidate belongs to the top k. Rows that are not certified are
    searched again with a float32 product. The answer is the float32 one (up to ties);
    `stats`, if given, receives the counts of rows and of rows searched again.
    """
    if precision not in _TORCH_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(_TORCH_DTYPES)}")
    dev = resolve_device(device)
    x = as_torch(feats, dev).float()
    if x.ndim != 3:
        raise ValueError(f"feats must be (B, N, d), got shape {tuple(x.shape)}")
    B, N, d = x.shape
    valid, _ = valid_mask(n_valid, B, N, dev)
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
    scores.masked_fill_(exclude, -torch.inf)
    vals, ids = torch.topk(scores, k, dim=2, largest=True, sorted=True)
    return vals, torch.where(torch.isfinite(vals) & row_valid[..., None], ids, -1)


def _search_again(x, valid, k: int, redo, idx, sims) -> None:
    """Exact float32 search of the rows `redo` (B, N) bool, image by image, into idx/sims."""
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
