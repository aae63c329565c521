"""GPU fast-path benchmark: per-stage images/s, accuracy vs float64, COCO projection.

Example (any CUDA machine with cupy-cuda12x, < 5 minutes):
    python bench/gpu.py --out bench/results/gpu.json
    python bench/gpu.py --cpu --out /tmp/gpu-cpu.json   # tiny CPU version (checks the script runs)

Stages, each warmed up once, then timed `--repeats` times with device synchronisation,
median reported:
- features: `sazs.features.extractors` imgfocus-vits14 (and dino-vits8 with
  --dino-weights) at short side 480 on 480x640 images, batch --feat-batch;
- knn: `batched_knn` + `ell_graph` on B=--batch images of N=--n ViT-like features
  (resampled from the stored ViT-S/14 features of bench/results with noise, or random
  when absent), d=--dim: the certified fp16 search (what the pipeline's "batched"
  backend runs on a GPU; the share of rows it had to search again in float32 is
  reported) and one float32 product (what it runs on a CPU);
- eigen: `batched_eigs` (cupy on the GPU: fused ELL kernel, and the plain gather
  product for comparison) on those graphs, vs per-image torch.lobpcg on the same
  device, cupy LOBPCG (`spectral` solver 'cupy-lobpcg') and SciPy eigsh on this
  machine's CPU cores, on --baseline-images images each;
- accuracy of the batched solver vs float64 eigsh (tol 1e-12) on --check images;
- end to end, measured: `run_local` with the defaults of `make priors DEVICE=cuda`
  (auto: batched kNN + batched solver, imgfocus-vits14 at --short-side) over
  --e2e-images JPEGs written to a temporary folder, store writes included, at shard
  sizes 64 (the default) and 256 (--e2e-shard-sizes);
- the serial estimate 1 / sum(1 / rate) of the stages, and COCO train2017 (118,287
  images) projected from the measured end-to-end rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from sazs.pipeline import ell_operator, spectral
from sazs.pipeline.batched_solver import batched_eigs
from sazs.pipeline.ell import ell_graph, ell_to_csr
from sazs.pipeline.knn_batched import batched_knn
from sazs.pipeline.laplacian import normalized_adjacency
from sazs.pipeline.spectral import SpectralConfig, laplacian_eigs
from sazs.pipeline.types import Graph

COCO_TRAIN = 118_287
FEATS = Path(__file__).resolve().parent / "results" / "feats_imgfocus-vits14_672_astronaut.npy"
logger = logging.getLogger("bench.gpu")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("GPU fast-path benchmark", add_help=add_help)
    p.add_argument("--cpu", action="store_true", help="tiny run on numpy/torch CPU (no CUDA needed)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n", type=int, default=3600, help="patches per image (N)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--num-eigs", type=int, default=8)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--short-side", type=int, default=480)
    p.add_argument("--feat-images", type=int, default=128)
    p.add_argument("--feat-batch", type=int, default=64)
    p.add_argument("--extractor", default="imgfocus-vits14", help="the ViT-S/14 extractor timed and used end to end")
    p.add_argument("--weights", default=None, help="its checkpoint, for dino-*/dinov2-* extractors")
    p.add_argument("--dino-weights", default=None, help="dino_deitsmall8_pretrain.pth: also time dino-vits8")
    p.add_argument("--baseline-images", type=int, default=16)
    p.add_argument("--check", type=int, default=4, help="images checked against float64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--e2e-images", type=int, default=1024, help="images of the measured end-to-end run")
    p.add_argument(
        "--e2e-shard-sizes",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[64, 256],
        help="store shard sizes of the end-to-end runs (the shard is the batched-solve batch; "
        "64 is the default of make priors)",
    )
    p.add_argument("--out", default="bench/results/gpu.json")
    return p


def _git_sha() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class Timer:
    """Median wall time of fn() after one warm-up, synchronising the device around each call."""

    def __init__(self, cuda: bool, xp):
        self.cuda, self.xp = cuda, xp

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.xp.cuda.get_current_stream().synchronize()

    def __call__(self, fn, repeats: int):
        out = fn()  # warm-up (kernel compilation, allocator, caches)
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out


def vit_like_features(B: int, N: int, d: int, device, seed: int = 0):
    """(B, N, d) features with ViT-like neighbourhoods: stored patch features resampled + noise."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    if FEATS.exists():
        base = torch.from_numpy(np.load(FEATS).reshape(-1, np.load(FEATS).shape[-1]))
        if base.shape[1] != d:
            base = base[:, :d] if base.shape[1] > d else torch.randn(base.shape[0], d, generator=g)
    else:
        base = torch.randn(2048, d, generator=g)
    base = base / base.norm(dim=1, keepdim=True)
    rows = torch.randint(0, base.shape[0], (B, N), generator=g)
    x = base[rows] + 0.05 * torch.randn(B, N, d, generator=g)
    return x.to(device)


def stage_features(args, device: str, timer: Timer) -> list[dict]:
    from skimage import data
    from skimage.transform import resize

    from sazs.features.extractors import ExtractorConfig, build_extractor

    img = (resize(data.astronaut(), (480, 640), anti_aliasing=True) * 255).astype(np.uint8)
    images = [img] * args.feat_images
    names = [(args.extractor, args.weights)] + ([("dino-vits8", args.dino_weights)] if args.dino_weights else [])
    rows = []
    for name, weights in names:
        try:
            ext = build_extractor(
                ExtractorConfig(
                    name=name, weights=weights, short_side=args.short_side, device=device, batch_size=args.feat_batch
                )
            )
        except (ImportError, FileNotFoundError, ValueError) as e:
            rows.append({"stage": f"features {name}", "skipped": str(e)})
            continue
        sec, feats = timer(lambda: ext.extract(images), args.repeats)
        h, w = feats[0].grid
        rows.append(
            {
                "stage": f"features {name}",
                "images_per_s": len(images) / sec,
                "N": h * w,
                "precision": ext.precision,
                "seconds": sec,
            }
        )
    return rows


def write_jpegs(folder: Path, count: int) -> None:
    """`count` 480x640 JPEGs: sample photos, flipped and shifted so no two are equal."""
    from PIL import Image
    from skimage import data
    from skimage.transform import resize

    folder.mkdir(parents=True, exist_ok=True)
    bases = [
        (resize(getattr(data, n)(), (480, 700), anti_aliasing=True) * 255).astype(np.uint8)
        for n in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    for i in range(count):
        img = bases[i % 4][:, (i // 4) % 60 : (i // 4) % 60 + 640]
        img = img[:, ::-1] if (i // 240) % 2 else img
        Image.fromarray(np.ascontiguousarray(img)).save(folder / f"{i:06d}.jpg", quality=90)


def stage_end_to_end(args, device: str) -> list[dict]:
    """`make priors DEVICE=<device>` in-process: decode + features + graph + spectra + store
    writes, once per shard size in --e2e-shard-sizes (the shard is the batched-solve batch)."""
    import tempfile

    from sazs.datasets.base import DatasetConfig
    from sazs.datasets.registry import build_dataset
    from sazs.features.extractors import ExtractorConfig, build_extractor
    from sazs.pipeline.graph import GraphConfig
    from sazs.pipeline.job import JobConfig, run_local
    from sazs.stores.reader import open_store

    rows = []
    with tempfile.TemporaryDirectory(prefix="sazs-bench-gpu-") as tmp:
        write_jpegs(Path(tmp) / "images", args.e2e_images)
        ext = build_extractor(
            ExtractorConfig(
                name=args.extractor,
                weights=args.weights,
                short_side=args.short_side,
                device=device,
                batch_size=args.feat_batch,
            )
        )
        cfgs = GraphConfig(backend="auto"), SpectralConfig(solver="auto")
        for shard_size in args.e2e_shard_sizes:
            warm = build_dataset(
                DatasetConfig(name="folder", root=str(Path(tmp) / "images"), limit=min(args.e2e_images, shard_size))
            )
            run_local(
                warm,
                ext,
                *cfgs,
                JobConfig(
                    out=str(Path(tmp) / f"warm{shard_size}.zarr"), shard_size=shard_size, progress=False, preview=0
                ),
            )
            dataset = build_dataset(DatasetConfig(name="folder", root=str(Path(tmp) / "images")))
            out = Path(tmp) / f"e2e{shard_size}.zarr"
            summary = run_local(
                dataset, ext, *cfgs, JobConfig(out=str(out), shard_size=shard_size, progress=False, preview=0)
            )
            manifest = open_store(out).manifest
            rate = summary.computed / summary.seconds
            rows.append(
                {
                    "stage": f"end to end (measured, shard {shard_size})",
                    "images_per_s": rate,
                    "extractor": args.extractor,
                    "images": summary.computed,
                    "done": summary.done,
                    "failed": summary.failed,
                    "not_converged": summary.not_converged,
                    "solver": manifest["solver"]["solver"],
                    "graph_backend": manifest["graph"]["backend"],
                    "short_side": args.short_side,
                    "coco_train2017_minutes": COCO_TRAIN / rate / 60,
                }
            )
    return rows


def _torch_lobpcg(A, K: int, device: str, tol: float):
    import torch

    warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
    At = torch.sparse_csr_tensor(
        torch.from_numpy(A.indptr).long(),
        torch.from_numpy(A.indices).long(),
        torch.from_numpy(A.data).float(),
        size=A.shape,
    ).to(device)
    X0 = torch.randn(A.shape[0], K + max(2, K // 2), generator=torch.Generator().manual_seed(0)).to(device)
    vals, vecs = torch.lobpcg(At, X=X0, k=K + max(2, K // 2), largest=True, tol=tol, niter=500)
    return vals[:K], vecs[:, :K]


def subspace_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.svd(a.astype(np.float64).T @ b.astype(np.float64), compute_uv=False).min())


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("bench/gpu.py needs a CUDA GPU; pass --cpu for a tiny CPU run that checks the script.")
        return 2
    if args.cpu:  # tiny sizes: the point is that every stage runs, not the numbers
        args.batch, args.n, args.dim = min(args.batch, 4), min(args.n, 400), min(args.dim, 384)
        args.feat_images, args.feat_batch, args.short_side = 2, 2, 112
        args.baseline_images, args.check, args.repeats = 2, 2, min(args.repeats, 2)
        args.e2e_images, args.e2e_shard_sizes = 4, [2]
    if cuda:
        try:
            import cupy as xp
        except ImportError as e:
            raise SystemExit("bench/gpu.py needs CuPy on a GPU: pip install cupy-cuda12x") from e
    else:
        xp = np
    device = "cuda" if cuda else "cpu"
    timer = Timer(cuda, xp)
    B, N, K = args.batch, args.n, args.num_eigs
    meta = {
        "args": vars(args),
        "git_sha": _git_sha(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cupy": getattr(xp, "__version__", None) if cuda else None,
        "numpy": np.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    print(json.dumps({k: v for k, v in meta.items() if k != "args"}))
    print("args:", json.dumps(vars(args)))
    rows: list[dict] = []

    rows += stage_features(args, device, timer)

    feats = vit_like_features(B, N, args.dim, device)
    # fp16: the certified search the pipeline's "batched" backend runs on a GPU; fp32: one
    # float32 product (what it runs on a CPU). Both give the float32 neighbours (up to ties).
    for precision in ("fp16", "fp32"):
        knn_stats: dict = {}
        sec, (idx, sims) = timer(
            lambda: batched_knn(feats, args.k, device=device, precision=precision, stats=knn_stats), args.repeats
        )
        rows.append(
            {
                "stage": f"knn batched ({precision})",
                "images_per_s": B / sec,
                "N": N,
                "B": B,
                "seconds": sec,
                "rows_searched_again": knn_stats["searched_again"] / knn_stats["rows"],
            }
        )
        if precision == "fp16":
            exact = (idx, sims)
    idx, sims = exact
    sec, ell = timer(lambda: ell_graph(idx, sims), args.repeats)
    rows.append({"stage": "ell graph", "images_per_s": B / sec, "N": N, "B": B, "width": ell.shape[2], "seconds": sec})

    variants = [("fused", True), ("gather", False)] if cuda else [("gather", False)]
    for name, fused in variants:
        ell_operator._FUSED_STATE.pop("ok", None)
        if not fused:
            ell_operator._FUSED_STATE["ok"] = False  # forces the plain gather product
        sec, out = timer(lambda: batched_eigs(ell, K, xp=xp, tol=args.tol), args.repeats)
        its = [s.iterations for s in out]
        rows.append(
            {
                "stage": f"eigen batched ({xp.__name__}, {name})",
                "images_per_s": B / sec,
                "N": N,
                "B": B,
                "seconds": sec,
                "iterations_median": float(np.median(its)),
                "iterations_max": int(max(its)),
                "converged": int(sum(s.converged for s in out)),
                "max_residual": float(max(s.residuals.max() for s in out)),
                "fused_self_check": ell_operator._FUSED_STATE.get("ok") if fused else None,
            }
        )
        if name == variants[0][0]:
            spectra = out
    ell_operator._FUSED_STATE.pop("ok", None)

    # accuracy vs float64 eigsh on a few graphs
    errs, coss, ress = [], [], []
    graphs = [ell_to_csr(ell, b) for b in range(max(args.check, args.baseline_images))]
    for b in range(args.check):
        ref = laplacian_eigs(
            Graph(W=graphs[b], grid=(1, N)),
            SpectralConfig(num_eigs=K + 1, solver="eigsh", precision="float64", tol=1e-12),
        )
        s = spectra[b]
        errs.append(float(np.abs(s.eigvals - ref.eigvals[:K]).max()))
        coss.append(subspace_cos(ref.eigvecs[:, : K - 1], s.eigvecs[:, : K - 1]))
        ress.append(float(s.residuals.max()))
    rows.append(
        {
            "stage": "accuracy vs float64",
            "max_abs_dlambda": max(errs),
            "min_subspace_cos_first_K-1": min(coss),
            "max_residual": max(ress),
            "images": args.check,
        }
    )

    # per-image baselines on the same graphs
    nb = args.baseline_images
    As = [normalized_adjacency(W) for W in graphs[:nb]]
    sec, _ = timer(lambda: [_torch_lobpcg(A, K, device, args.tol) for A in As], max(1, args.repeats - 1))
    rows.append({"stage": f"eigen torch.lobpcg per image ({device})", "images_per_s": nb / sec, "N": N})
    if cuda:
        cfg = SpectralConfig(num_eigs=K, solver="cupy-lobpcg", device="cuda")
        try:
            sec, _ = timer(
                lambda: [laplacian_eigs(Graph(W=W, grid=(1, N)), cfg) for W in graphs[:nb]], max(1, args.repeats - 1)
            )
            rows.append({"stage": "eigen cupy-lobpcg per image (cuda)", "images_per_s": nb / sec, "N": N})
        except spectral.SolverError as e:
            rows.append({"stage": "eigen cupy-lobpcg per image (cuda)", "skipped": str(e)})
    cfg = SpectralConfig(num_eigs=K, solver="eigsh")
    sec, _ = timer(
        lambda: [laplacian_eigs(Graph(W=W, grid=(1, N)), cfg) for W in graphs[:nb]], max(1, args.repeats - 1)
    )
    rows.append(
        {
            "stage": f"eigen scipy eigsh per image (cpu, {torch.get_num_threads()} threads)",
            "images_per_s": nb / sec,
            "N": N,
        }
    )

    rows += stage_end_to_end(args, device)
    # serial estimate from the stages, and the COCO projection from the measured run
    firsts = (
        f"features {args.extractor}",
        "knn batched (fp16",
        "ell",
        f"eigen batched ({xp.__name__}, {variants[0][0]}",
    )
    rates = [r["images_per_s"] for r in rows if r["stage"].startswith(firsts) and "images_per_s" in r]
    e2e = 1.0 / sum(1.0 / r for r in rates)
    rows.append({"stage": "end to end (serial estimate of the stages)", "images_per_s": e2e, "stages": len(rates)})

    print(f"\n{'stage':48s} {'images/s':>10s}  notes")
    for r in rows:
        rate = f"{r['images_per_s']:10.1f}" if "images_per_s" in r else f"{'-':>10s}"
        notes = {k: v for k, v in r.items() if k not in ("stage", "images_per_s", "seconds")}
        print(
            f"{r['stage']:48s} {rate}  "
            + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in notes.items())
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
