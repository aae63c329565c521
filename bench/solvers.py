"""Eigensolver benchmark: our sparse kNN pipeline vs the original Deep Spectral Methods recipe.

Example:
    python bench/solvers.py --out bench/results/solvers.json --images 4 --repeats 3

For each sample image (skimage.data colour photos) at a grid of N ~ 2,000-4,000 patches:
- "dsm-original": dense affinity feats @ feats.T clipped at 0 (divided by its max), dense
  D - W, `eigsh(D - W, k=K, sigma=0, which='LM', M=D)` (shift-invert, generalised), then
  u = D^1/2 v normalised, so its eigenvectors are comparable with ours;
- ours: `build_knn_graph` (faiss, k=10) + `laplacian_eigs` with each solver.
Each method is timed end to end (affinity/graph construction included) and compared
with the float64 dense eigendecomposition of *its own* graph: max |delta lambda|, min
subspace alignment (smallest cosine of principal angles over eigenvalue groups
separated by > 1e-3), max residual ||L u - lambda u||. BLAS, OpenMP, faiss and torch
are limited to one thread (--threads) so the comparison is per core.
"""

from __future__ import annotations

import os
import sys

# Thread limits must be in the environment before numpy/BLAS load.
_THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import scipy.sparse.linalg as sla  # noqa: E402
from skimage import data  # noqa: E402

from sazs.pipeline import spectral  # noqa: E402
from sazs.pipeline.graph import GraphConfig, build_knn_graph, patch_colors  # noqa: E402
from sazs.pipeline.spectral import SpectralConfig, laplacian_eigs  # noqa: E402

IMAGES = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "hubble_deep_field"]
GAP = 1e-3


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("eigensolver benchmark", add_help=add_help)
    p.add_argument("--out", default="bench/results/solvers.json")
    p.add_argument("--images", type=int, default=4, help=f"how many of {IMAGES}")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per image and method (median)")
    p.add_argument("--num-eigs", type=int, default=8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--short-side", type=int, default=672, help="ViT input short side (grid 48 x <=72 at patch 14)")
    p.add_argument("--extractor", default="imgfocus-vits14")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP/torch/faiss threads (set before import)")
    return p


def limit_threads(n: int) -> str:
    import faiss
    import torch

    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return f"env vars OMP/OPENBLAS/MKL_NUM_THREADS={os.environ['OMP_NUM_THREADS']} (threadpoolctl not installed)"
    threadpool_limits(n)
    return f"threadpoolctl limit {n}"


def own_features(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fallback features: centred colour + position, L2-normalised."""
    h, w = grid
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    f = np.concatenate([patch_colors(image, grid), 0.5 * x.reshape(-1, 1), 0.5 * y.reshape(-1, 1)], 1)
    f -= f.mean(0)
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def load_features(names: list[str], args, cache: Path) -> tuple[str, dict[str, np.ndarray]]:
    """(features used, {image: (h, w, d) float32}); cached as feats_<extractor>_<side>_<image>.npy."""
    paths = {n: cache / f"feats_{args.extractor}_{args.short_side}_{n}.npy" for n in names}
    if all(p.exists() for p in paths.values()):
        return args.extractor, {n: np.load(p) for n, p in paths.items()}
    images = {n: getattr(data, n)() for n in names}
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # extraction is not timed
    try:
        from sazs.pipeline.extractors import ExtractorConfig, build_extractor

        used = args.extractor
        try:
            ext = build_extractor(ExtractorConfig(name=used, short_side=args.short_side, device="cpu"))
        except (ImportError, OSError) as e:
            print(f"extractor {used!r} unavailable ({e}); falling back to 'color'")
            used = "color"
            # Same grid as the ViT would give: 'color' has 8-pixel patches, the ViT 14.
            ext = build_extractor(ExtractorConfig(name=used, short_side=args.short_side // 14 * 8, device="cpu"))
        feats = {}
        for n, img in images.items():
            (f,) = ext.extract([img])
            feats[n] = f.feats.reshape(*f.grid, -1)
    except ImportError as e:
        print(f"sazs.pipeline.extractors unavailable ({e}); using own colour/position features")
        used = "own-color-xy"
        feats = {n: own_features(img, (48, 64)).reshape(48, 64, -1) for n, img in images.items()}
    if used == args.extractor:
        cache.mkdir(parents=True, exist_ok=True)
        for n, f in feats.items():
            np.save(paths[n], f)
    return used, feats


def dsm_affinity(feats: np.ndarray, grid) -> np.ndarray:
    """Deep Spectral Methods' `extract_eigs` affinity (feature term only): dense, clipped, max-scaled."""
    W = feats @ feats.T
    W = W * (W > 0)
    return W / W.max()


def dsm_solve(W: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Their generalised shift-invert solve, converted to our unit u = D^1/2 v."""
    D = np.diag(W.sum(axis=1))
    vals, v = sla.eigsh(D - W, k=K, sigma=0, which="LM", M=D)
    u = np.sqrt(np.diag(D))[:, None] * v
    u /= np.linalg.norm(u, axis=0)
    order = np.argsort(vals)
    return vals[order].astype(np.float64), u[:, order]


def dense_reference_of(W: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 (eigvals, eigvecs, A) of L = I - D^-1/2 W D^-1/2 for a dense W (self-loops kept)."""
    d = W.sum(axis=1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    A = W * inv[:, None] * inv[None, :]
    vals, vecs = scipy.linalg.eigh(np.eye(len(W)) - A, subset_by_index=[0, K])
    return vals, vecs, A


def agreement(vals, vecs, ref_vals, ref_vecs, A) -> dict:
    """max |delta lambda|, min principal-angle cosine over gap-separated groups, max residual."""
    K = len(vals)
    u = np.asarray(vecs, dtype=np.float64)
    starts = [0] + [i + 1 for i in range(K - 1) if ref_vals[i + 1] - ref_vals[i] > GAP]
    align = []
    for a, b in zip(starts, starts[1:] + [K]):
        if ref_vals[b] - ref_vals[b - 1] > GAP:  # skip the group cut at K (its K-th vector is arbitrary)
            align.append(np.linalg.svd(ref_vecs[:, a:b].T @ u[:, a:b], compute_uv=False).min())
    resid = np.linalg.norm(u - A @ u - u * vals, axis=0)
    return {
        "max_abs_dlambda": float(np.abs(vals - ref_vals[:K]).max()),
        "min_alignment": float(min(align)) if align else float("nan"),
        "max_residual": float(resid.max()),
    }


def timed(build, solve, repeats: int):
    """Median seconds of (graph, solve, total) over repeats, and the last solution."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        g = build()
        t1 = time.perf_counter()
        out = solve(g)
        times.append((t1 - t0, time.perf_counter() - t1, time.perf_counter() - t0))
    return np.median(np.array(times), axis=0).tolist(), out


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    threads = limit_threads(args.threads)
    names = IMAGES[: args.images]
    used, feats = load_features(names, args, Path(args.out).parent)
    K = args.num_eigs
    cpu_modules = (np, sp, sla.lobpcg)
    print(f"features: {used}; threads: {threads}; K={K}, k={args.k}")

    def ours(solver: str):
        def solve(g):
            sp_ = laplacian_eigs(g, SpectralConfig(num_eigs=K, solver=solver))
            return sp_.eigvals, sp_.eigvecs

        return lambda f, grid: build_knn_graph(f, GraphConfig(k=args.k), grid=grid), solve

    original = "dsm-original"
    methods = {
        original: (dsm_affinity, lambda W: dsm_solve(W, K)),
        "eigsh": ours("eigsh"),
        "lobpcg": ours("lobpcg"),
        "cupy-lobpcg@numpy": ours("cupy-lobpcg"),
        "dense": ours("dense"),
    }
    records = []
    for name in names:
        f3 = feats[name]
        grid, f = f3.shape[:2], np.ascontiguousarray(f3.reshape(-1, f3.shape[2]), dtype=np.float32)
        # References: dense float64 eigendecompositions of the dense DSM graph and of our kNN graph.
        ref_dsm = dense_reference_of(np.maximum(f.astype(np.float64) @ f.T.astype(np.float64), 0), K)
        ref_ours = dense_reference_of(build_knn_graph(f, GraphConfig(k=args.k), grid=grid).W.toarray(), K)
        for method, (build, solve) in methods.items():
            orig_modules = spectral._cupy_modules
            if method == "cupy-lobpcg@numpy":  # the GPU solver's exact code with numpy/scipy modules
                spectral._cupy_modules = lambda: cpu_modules
            try:
                (t_graph, t_solve, t_total), (vals, vecs) = timed(
                    lambda: build(f, grid), solve, 1 if method == "dense" else args.repeats
                )
            finally:
                spectral._cupy_modules = orig_modules
            rec = {"image": name, "grid": list(grid), "N": len(f), "method": method,
                   "graph_s": t_graph, "solve_s": t_solve, "seconds": t_total}
            rec.update(agreement(vals, vecs, *(ref_dsm if method == original else ref_ours)))
            records.append(rec)
        print(f"  {name}: grid {grid}, N={len(f)}: "
              + ", ".join(f"{r['method']} {r['seconds']:.3f}s" for r in records[-len(methods):]))

    summary = []
    t_orig = sum(r["seconds"] for r in records if r["method"] == original)
    for method in methods:
        rs = [r for r in records if r["method"] == method]
        total = sum(r["seconds"] for r in rs)
        summary.append({
            "method": method,
            "graph_s_per_image": sum(r["graph_s"] for r in rs) / len(rs),
            "solve_s_per_image": sum(r["solve_s"] for r in rs) / len(rs),
            "images_per_s": len(rs) / total,
            "speedup_vs_original": t_orig / total,
            "max_abs_dlambda": max(r["max_abs_dlambda"] for r in rs),
            "min_alignment": min(r["min_alignment"] for r in rs),
            "max_residual": max(r["max_residual"] for r in rs),
        })
    t_orig_solve = sum(r["solve_s"] for r in records if r["method"] == original)
    for row in summary:
        row["solve_speedup_vs_original"] = t_orig_solve / (row["solve_s_per_image"] * len(names))
    header = (f"{'method':20s} {'graph ms':>9s} {'solve ms':>9s} {'img/s':>7s} {'speedup':>8s} {'solve x':>8s} "
              f"{'max|dl|':>9s} {'min align':>10s} {'max resid':>10s}")
    print(header + "\n" + "-" * len(header))
    for s in summary:
        print(f"{s['method']:20s} {1e3 * s['graph_s_per_image']:9.1f} {1e3 * s['solve_s_per_image']:9.1f} "
              f"{s['images_per_s']:7.2f} {s['speedup_vs_original']:7.1f}x {s['solve_speedup_vs_original']:7.1f}x "
              f"{s['max_abs_dlambda']:9.1e} {s['min_alignment']:10.6f} {s['max_residual']:10.1e}")
    result = {
        "features": used, "threads": threads, "num_eigs": K, "k": args.k, "repeats": args.repeats,
        "images": names, "summary": summary, "records": records,
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__},
        "cpu": platform.processor() or platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
