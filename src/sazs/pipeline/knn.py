"""Exact k nearest neighbours of one image's patches (`knn`), by backend.

Every backend returns the neighbours of a float32 brute force (up to exact ties) with
their float32 scores, so the choice only changes the speed:

* "certified" (default): a bfloat16 product with a per-row error bound, exact rows
  recomputed in float32 (`knn_certified`); fastest on CPUs with native bf16. On a GPU
  device it is "torch".
* "faiss": a flat float32 index (`IndexFlatIP` / `IndexFlatL2`), on a GPU if faiss has one.
* "torch": the float32 product in row blocks (memory O(N * block)), also on a GPU.
* "batched": one image at a time it is "torch"; many at once see `knn_batched`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from sazs.core.devices import resolve_device
from sazs.core.registry import Registry

from .knn_certified import knn_certified

logger = logging.getLogger(__name__)


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
    dev = resolve_device(device)
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


def _knn_certified(x: np.ndarray, k: int, metric: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    if device != "cpu" and resolve_device(device).type != "cpu":
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
    scores, idx = BACKENDS[backend](x, k, metric, device)
    if metric == "l2":
        scores = np.maximum(scores, 0.0)
    return scores, idx


# Every backend gives the neighbours of a float32 brute force (up to exact ties); "batched" is
# the GPU fast path's (a shard at once, `knn_batched`), here one image through the torch search.
BACKENDS: Registry[Callable[[np.ndarray, int, str, str], tuple[np.ndarray, np.ndarray]]] = Registry("kNN backend")
BACKENDS.add("certified", _knn_certified, help="bf16 search with an error bound, exact float32 answer (CPU default)")
BACKENDS.add("faiss", _knn_faiss, help="faiss IndexFlatIP (a GPU index with faiss-gpu)")
BACKENDS.add("torch", _knn_torch, help="blocked matmul + top-k")
BACKENDS.add("batched", _knn_torch, help="a shard's images at once on the features' device (GPU default)")
