"""Scale check of the Ray executor: images/s with 1 and 2 workers, local vs Ray, Ray's
start-up overhead, and per-stage throughputs for a paper estimate of COCO train2017.

Example (the defaults run in under 3 minutes on a 2-core machine):
    python bench/ray_scaling.py --out bench/results/ray_scaling.json

1. A synthetic COCO layout (`sazs.datasets.synthetic.make_coco`, --images val images) in a
   temporary directory.
2. The real CLI (`python -m sazs.pipeline run`, one subprocess per setting so that each
   gets its own thread limits and its own Ray instance) with the local executor on 1 and
   2 threads, and with the Ray executor on 1 and 2 CPU actors (a local instance of that
   many CPUs; Ray gives each actor one thread). "job img/s" is the job's own rate (store
   open to last shard, from the summary JSON); "wall s" is the whole command, Python
   start-up, Ray start-up and shutdown included; "steady img/s" counts only the shards
   finished once every actor is up (from the progress log). Every store is compared bit
   for bit with the first. With a GPU, Ray with 1 GPU actor and the default device is added.
3. Ray start-up: `ray.init` of a local instance, then N actors built and answering.
4. Per-stage throughputs on one core at the production setting (COCO-sized 480 x 640
   JPEGs, ViT-S/14 at short side 448): decode, feature extraction (CPU; and GPU bf16
   where there is one), kNN graph, eigen-solve. These feed the README's estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
ARRAYS = ("eigvecs", "eigvals", "residual", "grid", "image_size", "status")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Ray scaling benchmark", add_help=add_help)
    p.add_argument("--out", default="bench/results/ray_scaling.json")
    p.add_argument("--images", type=int, default=64, help="synthetic COCO val images (default 64)")
    p.add_argument("--extractor", default="imgfocus-vits14")
    p.add_argument("--short-side", type=int, default=224, help="ViT input short side for the scaling runs")
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument("--workers", default="1,2", help="worker counts: local threads / Ray CPU actors")
    p.add_argument("--stage-images", type=int, default=4, help="COCO-sized images timed per stage (0 = skip)")
    p.add_argument("--stage-short-side", type=int, default=448)
    p.add_argument("--stage-worker", default=None, help=argparse.SUPPRESS)  # internal: time stages in this process
    return p


def env_with_threads(threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    # Idle thread pools sleep instead of spinning: with numpy (OpenBLAS), faiss and torch
    # (OpenMP) pools alternating, spinning workers steal the cores (see bench/solvers.py).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.pop("RAY_ADDRESS", None)  # the scaling runs start their own local instances
    if threads is not None:
        env.update({v: str(threads) for v in THREAD_VARS})
    return env


def run_cli(name: str, argv: list[str], env: dict, work: Path) -> dict:
    out = work / f"{name}.zarr"
    cmd = [sys.executable, "-m", "sazs.pipeline", "run", *argv, "--out", str(out), "--no-progress", "--preview", "0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((work / f"{name}.summary.json").read_text())
    rate = summary["computed"] / summary["seconds"] if summary["seconds"] > 0 else float("nan")
    steady = steady_rate(work / f"{name}.progress.jsonl")
    return {
        "name": name,
        "store": str(out),
        "img_s": rate,
        "steady_img_s": steady,
        "job_s": summary["seconds"],
        "wall_s": wall,
        "computed": summary["computed"],
    }


def steady_rate(progress: Path) -> float:
    """Images/s once every worker is up: from the last actor's start (Ray) or the job's start
    (local) to the last shard, counting the shards finished in between."""
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    shards = [e for e in events if e["event"] == "shard"]
    t0 = max([0.0] + [e["elapsed_s"] for e in events if e["event"] == "actor"])
    window = [e for e in shards if e["elapsed_s"] > t0]
    if len(window) < 2:
        return float("nan")
    # from the first shard finished in the window: its own images were (mostly) done before
    span = window[-1]["elapsed_s"] - window[0]["elapsed_s"]
    return sum(e["images"] for e in window[1:]) / span if span > 0 else float("nan")


def same_arrays(a: str, b: str) -> bool:
    import numpy as np

    from sazs.stores.reader import open_store

    ga, gb = open_store(a).group, open_store(b).group
    return all(np.array_equal(np.asarray(ga[n][:]), np.asarray(gb[n][:]), equal_nan=True) for n in ARRAYS)


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def ray_startup(actors: int, extractor: str, short_side: int) -> dict:
    """ray.init of a local instance with ``actors`` CPUs, then ``actors`` extractors built and answering."""
    import ray

    from sazs.features.extractors import ExtractorConfig
    from sazs.pipeline.graph import GraphConfig
    from sazs.pipeline.ray_worker import ShardWorker
    from sazs.pipeline.spectral import SpectralConfig

    t0 = time.perf_counter()
    ray.init(num_cpus=actors, include_dashboard=False)
    t1 = time.perf_counter()
    cls = ray.remote(ShardWorker)
    cfg = ExtractorConfig(name=extractor, short_side=short_side, device="cpu")
    handles = [cls.options(num_cpus=1).remote(cfg, GraphConfig(), SpectralConfig()) for _ in range(actors)]
    infos = ray.get([h.info.remote() for h in handles])
    t2 = time.perf_counter()
    ray.shutdown()
    t3 = time.perf_counter()
    return {
        "actors": actors,
        "init_s": t1 - t0,
        "actors_ready_s": t2 - t1,
        "shutdown_s": t3 - t2,
        "extractor_build_s": max(i["startup_s"] for i in infos),
    }


def time_stages(args) -> dict:
    """Per-image seconds of each stage, in this process (its thread limits come from the caller)."""
    import torch

    from sazs.datasets.images import read_image
    from sazs.features.extractors import ExtractorConfig, build_extractor
    from sazs.pipeline.graph import GraphConfig, build_knn_graph
    from sazs.pipeline.spectral import SpectralConfig, laplacian_eigs

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    paths = sorted(Path(args.stage_worker).glob("*.jpg"))[: args.stage_images]
    t0 = time.perf_counter()
    images = [read_image(p) for p in paths]
    decode = (time.perf_counter() - t0) / len(images)
    result = {"images": len(images), "image_size": list(images[0].shape[:2]), "decode_s": decode}
    devices = ["cpu"] + (["cuda"] if has_cuda() else [])
    feats = None
    for device in devices:
        ext = build_extractor(ExtractorConfig(name=args.extractor, short_side=args.stage_short_side, device=device))
        ext.extract(images[:1])  # warm-up (lazy init, autotuning)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = ext.extract(images)
        if device == "cuda":
            torch.cuda.synchronize()
        result[f"extract_{device}_s"] = (time.perf_counter() - t0) / len(images)
        result[f"extract_{device}_precision"] = ext.precision
        feats = feats or out
    result["grid"] = list(feats[0].grid)
    graph_cfg, spectral_cfg = GraphConfig(), SpectralConfig()
    t0 = time.perf_counter()
    graphs = [build_knn_graph(f.feats, graph_cfg, grid=f.grid) for f in feats]
    result["graph_s"] = (time.perf_counter() - t0) / len(feats)
    result["graph_backend"] = graph_cfg.backend
    t0 = time.perf_counter()
    for g in graphs:
        laplacian_eigs(g, spectral_cfg)
    result["eigen_s"] = (time.perf_counter() - t0) / len(graphs)
    result["solver"] = spectral_cfg.solver
    return result


STORE_RESULTS = Path(__file__).with_name("results") / "store.json"


def driver_write_img_s(path: Path = STORE_RESULTS) -> float | None:
    """The store's measured write rate (bench/store.py), if that benchmark has been run."""
    try:
        results = json.loads(path.read_text())["results"]
    except (OSError, KeyError, ValueError):
        return None
    return next((r["write_images_per_s"] for r in results if r.get("format") == "zarr store (local)"), None)


def estimate(stages: dict, num_images: int = 118_287, gpu_img_s: float = 300.0, cores_per_gpu: int = 8) -> dict:
    """COCO train2017 on N GPUs from per-stage rates (paper estimate, see the README).

    ``gpu_img_s`` (ViT-S/14 at 448 on one H100-class GPU in bf16) is an assumption, not a
    measurement; the CPU stages are this machine's single-core times. Two layouts:
    "actor" (default): an actor extracts then solves, one image after another on its one
    CPU, decode tasks run beside it: per GPU 1 / (1/gpu + graph + eigen).
    "cpu-tasks": the actor only extracts; decode and solve tasks share the node's other
    cores: per GPU min(gpu, (cores - 1) / (decode + graph + eigen)).
    The driver writes every shard itself: its store write rate (bench/store.py) caps the total.
    """
    cpu_s = stages["decode_s"] + stages["graph_s"] + stages["eigen_s"]
    solve_s = stages["graph_s"] + stages["eigen_s"]
    per_gpu = {"actor": 1.0 / (1.0 / gpu_img_s + solve_s), "cpu-tasks": min(gpu_img_s, (cores_per_gpu - 1) / cpu_s)}
    write = driver_write_img_s()
    rows = []
    for gpus in (1, 4, 8, 16):
        for mode, rate in per_gpu.items():
            total = gpus * rate
            bound = "GPU (ViT)" if mode == "cpu-tasks" and rate >= gpu_img_s else "CPU (graph + eigen)"
            if write is not None and write < total:
                total, bound = write, "driver's store writes"
            rows.append(
                {"gpus": gpus, "solve_on": mode, "img_s": total, "minutes": num_images / total / 60, "bound_by": bound}
            )
    return {
        "images": num_images,
        "assumed_gpu_img_s": gpu_img_s,
        "cores_per_gpu": cores_per_gpu,
        "cpu_core_s_per_image": cpu_s,
        "driver_write_img_s": write,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.stage_worker:
        print(json.dumps(time_stages(args)))
        return 0
    from sazs.datasets.synthetic import make_coco

    workers = [int(w) for w in args.workers.split(",")]
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cuda": has_cuda(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "stage_worker"},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="sazs-bench-") as tmp:
        work = Path(tmp)
        coco = make_coco(work / "coco", num_train=1, num_val=args.images)
        common = [
            "--dataset",
            "coco",
            "--data",
            str(coco),
            "--split",
            "val2017",
            "--extractor",
            args.extractor,
            "--short-side",
            str(args.short_side),
            "--shard-size",
            str(args.shard_size),
            "--device",
            "cpu",
        ]
        for n in workers:
            results["runs"].append(
                {
                    "executor": "local",
                    "workers": n,
                    "kind": f"{n} thread(s)",
                    **run_cli(f"local{n}", common, env_with_threads(n), work),
                }
            )
        for n in workers:
            argv = [*common, "--executor", "ray", "--ray-num-cpus", str(n), "--ray-num-gpus", "0"]
            results["runs"].append(
                {
                    "executor": "ray",
                    "workers": n,
                    "kind": f"{n} CPU actor(s)",
                    **run_cli(f"ray{n}", argv, env_with_threads(None), work),
                }
            )
        if has_cuda():
            gpu = [*common[:-2], "--device", "auto", "--executor", "ray", "--ray-actors", "1"]
            results["runs"].append(
                {
                    "executor": "ray",
                    "workers": 1,
                    "kind": "1 GPU actor",
                    **run_cli("ray-gpu", gpu, env_with_threads(None), work),
                }
            )
        first = results["runs"][0]["store"]
        for r in results["runs"][1:]:
            r["identical_to_local1"] = same_arrays(first, r["store"]) if "GPU" not in r["kind"] else None
        for r in results["runs"]:
            r.pop("store")

        results["startup"] = [ray_startup(n, args.extractor, args.short_side) for n in workers]

        if args.stage_images > 0:
            big = make_coco(work / "coco-big", num_train=1, num_val=args.stage_images, size=(480, 640))
            cmd = [
                sys.executable,
                __file__,
                "--stage-worker",
                str(big / "val2017"),
                "--stage-images",
                str(args.stage_images),
                "--stage-short-side",
                str(args.stage_short_side),
                "--extractor",
                args.extractor,
            ]
            proc = subprocess.run(cmd, env=env_with_threads(1), capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"stage timing failed:\n{proc.stderr[-3000:]}")
            results["stages_1core"] = json.loads(proc.stdout.strip().splitlines()[-1])

    print(
        f"\n{'executor':<8} {'workers':<16} {'steady img/s':>12} {'job img/s':>10} {'wall s':>7}  "
        "same bits as local 1 thread"
    )
    for k, r in enumerate(results["runs"]):
        same = "(reference)" if k == 0 else r.get("identical_to_local1")
        print(
            f"{r['executor']:<8} {r['kind']:<16} {r['steady_img_s']:>12.2f} {r['img_s']:>10.2f} "
            f"{r['wall_s']:>7.1f}  {same}"
        )
    print(
        "(a store is bitwise identical across executors at equal threads per worker; the kNN graph's float32\n"
        " similarities can change in the last bit with the BLAS/OpenMP thread count)"
    )
    print(f"\n{'ray start-up':<14} {'init s':>8} {'actors s':>9} {'shutdown s':>11}")
    for s in results["startup"]:
        print(
            f"{str(s['actors']) + ' actor(s)':<14} {s['init_s']:>8.2f} {s['actors_ready_s']:>9.2f} "
            f"{s['shutdown_s']:>11.2f}"
        )
    if "stages_1core" in results:
        st = results["stages_1core"]
        print(
            f"\nper-stage, one core, {st['images']} images {st['image_size'][0]}x{st['image_size'][1]}, "
            f"grid {st['grid'][0]}x{st['grid'][1]} (short side {args.stage_short_side}):"
        )
        for key in [k for k in st if k.endswith("_s")]:
            print(f"  {key[:-2]:<14} {st[key] * 1e3:>9.1f} ms/img   {1 / st[key]:>8.2f} img/s")
        est = results["coco_train2017_estimate"] = estimate(st)
        print(
            f"\nCOCO train2017 ({est['images']:,} images) on N GPUs: ASSUMING ViT-S/14 @448 at "
            f"{est['assumed_gpu_img_s']:.0f} img/s per H100-class GPU (bf16), {est['cores_per_gpu']} CPU cores "
            f"per GPU at this machine's per-core rates ({est['cpu_core_s_per_image'] * 1e3:.0f} ms/img):"
        )
        print(f"  {'GPUs':>4} {'--ray-solve-on':<15} {'img/s':>7} {'minutes':>8}  bound by")
        for r in est["rows"]:
            print(f"  {r['gpus']:>4} {r['solve_on']:<15} {r['img_s']:>7.0f} {r['minutes']:>8.1f}  {r['bound_by']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
