"""Prior-store benchmark: one Zarr v3 store vs one file per image, locally and on S3.

Example:
    python bench/store.py --images 2000 --out bench/results/store.json

Synthetic priors for ``--images`` images (K=8 eigenvectors on patch grids between 40x50
and 60x80, so max grid 60x80; smooth, orthonormal, like real low-frequency Laplacian
eigenvectors: random mixtures of 2-D cosine modes plus a little noise; zeros would
compress unrealistically well) are written three ways:

- ``zarr store``: ``StoreWriter`` (float16, shard of 64 images, one chunk per image),
  read back with ``open_store(path).get(id)``;
- ``.npy per image``: ``np.save`` of the (K, h, w) float16 eigenvectors;
- ``.pth per image``: ``torch.save`` of a dict (eigvals, eigvecs float16, residuals, grid,
  image size), read with ``torch.load(weights_only=True)``;

and the store is published to a loopback S3 server (moto, started by this script in a
subprocess bound to 127.0.0.1 and stopped at the end) and read back through s3fs.

Measured: bytes and number of files, write throughput, and random access (``--reads``
random ids, one at a time, the store opened inside the timed part; median of --repeats
passes for the local formats, one pass on S3). MB/s counts the float16 eigenvector
payload (K*h*w*2 bytes per image) for every format, so the numbers are comparable. The
machine may be shared: the table is a median, not a best case. Reads hit the page cache
(the files were just written) for every local format alike. All formats hold float16
eigenvectors; research code usually saves float32, which doubles their bytes. The S3
numbers are bounded by moto (a Python server on the same cores, ~100-150 requests/s
here), not by S3; each ``get`` is two range requests (shard index, chunk).

Target: random access from the local store at >= 500 images/s.
"""

from __future__ import annotations

import os

# Small BLAS calls only; on a 2-core machine extra BLAS threads just contend with the I/O.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sazs.stores.integrity import finalize
from sazs.stores.manifest import build_manifest
from sazs.stores.publish import publish
from sazs.stores.reader import open_store
from sazs.stores.writer import ImageResult, StoreWriter

K = 8
MAX_GRID = (60, 80)
TARGET_READS_PER_S = 500

# The S3 server runs in its own process (so it does not share our GIL, as a real one
# would not); it exits when we close its stdin, when we die, or after --server-timeout.
_SERVER = r"""
import logging, os, sys, threading
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
threading.Timer(float(sys.argv[1]), lambda: os._exit(0)).start()
sys.stdin.read()
os._exit(0)
"""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("prior-store benchmark", add_help=add_help)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--reads", type=int, default=500, help="random ids read one at a time")
    p.add_argument("--repeats", type=int, default=3, help="timed read passes for local formats (median)")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--out", default="bench/results/store.json")
    p.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--no-s3", action="store_true", help="skip the loopback S3 part")
    p.add_argument("--workers", type=int, default=4, help="upload threads for publish (2-core machine)")
    p.add_argument("--server-timeout", type=float, default=600, help="the S3 server stops itself after this")
    p.add_argument("--seed", type=int, default=0)
    return p


# -- synthetic priors ------------------------------------------------------------------------


def synthetic_result(index: int, seed: int) -> ImageResult:
    """Smooth orthonormal (K, h, w) eigenvectors on a random grid, like a real image's."""
    rng = np.random.default_rng([seed, index])
    h, w = int(rng.integers(40, MAX_GRID[0] + 1)), int(rng.integers(50, MAX_GRID[1] + 1))
    modes = 6
    ys = np.cos(np.pi * np.outer(np.arange(h) + 0.5, np.arange(modes)) / h)  # (h, modes)
    xs = np.cos(np.pi * np.outer(np.arange(w) + 0.5, np.arange(modes)) / w)  # (w, modes)
    decay = 1.0 / (1.0 + np.add.outer(np.arange(modes), np.arange(modes)))  # low frequencies dominate
    coef = rng.standard_normal((K, modes, modes)) * decay
    fields = (ys @ coef @ xs.T).reshape(K, -1)  # (K, h, w) flattened
    fields += 0.02 * rng.standard_normal(fields.shape) * np.abs(fields).mean()
    fields[0] = 1.0  # the trivial eigenvector (constant for a regular graph)
    chol = np.linalg.cholesky(fields @ fields.T)  # orthonormalise the K rows (Cholesky-QR)
    vecs = np.linalg.solve(chol, fields).reshape(K, h, w)
    flip = (vecs > 0).mean(axis=(1, 2)) > 0.5  # sign convention: positive part is the minority
    vecs[flip] *= -1
    eigvals = np.concatenate([[0.0], np.sort(rng.uniform(0.001, 0.3, K - 1))]).astype(np.float32)
    return ImageResult(
        index=index,
        image_size=(h * 8, w * 8),
        grid=(h, w),
        eigvals=eigvals,
        eigvecs=np.ascontiguousarray(vecs, dtype=np.float16),
        residuals=np.full(K, 1e-5, np.float32),
    )


def make_manifest(num_images: int, shard_size: int) -> dict:
    return build_manifest(
        dataset={"name": "synthetic-bench", "split": "val", "num_images": num_images, "ids_sha256": "synthetic"},
        extractor={"name": "synthetic", "architecture": "none", "weights_sha256": None, "facet": "key"},
        graph={"k": 10, "similarity": "cosine", "threshold": 0.0},
        solver={"solver": "synthetic", "residual_tol": 1e-3},
        num_eigs=K,
        layout={"shard_size": shard_size, "max_grid": list(MAX_GRID), "eigvecs_dtype": "float16"},
    )


# -- measuring -------------------------------------------------------------------------------


def tree_stats(path: Path) -> tuple[int, int]:
    """(bytes, files) under a directory."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def payload_bytes(r: ImageResult) -> int:
    return int(np.prod(r.eigvecs.shape)) * 2  # float16


def row(name, *, files, size, write_s, n_written, written_bytes, read_s, n_read, read_bytes, **extra) -> dict:
    return {
        "format": name,
        "files": files,
        "bytes": size,
        "size_mb": size / 1e6,
        "write_s": write_s,
        "write_images_per_s": n_written / write_s,
        "write_mb_per_s": written_bytes / 1e6 / write_s,
        "read_s": read_s,
        "read_images_per_s": n_read / read_s,
        "read_mb_per_s": read_bytes / 1e6 / read_s,
        **extra,
    }


def settle() -> None:
    """Flush the previous phase's dirty pages so that its writeback does not slow the next one."""
    os.sync()


def timed(fn, repeats: int):
    """(median seconds, every run's seconds, the last run's output) of ``repeats`` calls of fn."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times, out


def bench_store(path: Path, ids, results, args, read_ids, payload) -> tuple[dict, float]:
    settle()
    t0 = time.perf_counter()
    with StoreWriter.open(path, ids=ids, manifest=make_manifest(len(ids), args.shard_size)) as w:
        for shard in range(w.num_shards):
            w.write_shard(shard, [results[i] for i in w.shard_range(shard)])
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    finalize(str(path))
    finalize_s = time.perf_counter() - t0
    size, files = tree_stats(path)
    settle()
    read_s, runs, checked = read_store(str(path), read_ids, results, ids, repeats=args.repeats)
    return row(
        "zarr store (local)",
        files=files,
        size=size,
        write_s=write_s,
        n_written=len(ids),
        written_bytes=sum(payload),
        read_s=read_s,
        n_read=len(read_ids),
        read_bytes=sum(payload[i] for i in read_ids),
        read_runs_s=runs,
        finalize_s=finalize_s,
        checked=checked,
    ), finalize_s


def read_store(url: str, read_ids, results, ids, storage_options=None, repeats=1) -> tuple[float, list, bool]:
    def run():
        store = open_store(url, storage_options=storage_options)  # opening is part of the cost
        return [store.get(ids[i]) for i in read_ids]

    read_s, runs, got = timed(run, repeats)
    ok = all(np.array_equal(p.eigvecs, results[i].eigvecs.astype(np.float32)) for p, i in zip(got, read_ids))
    return read_s, runs, ok


def bench_npy(root: Path, ids, results, args, read_ids, payload) -> dict:
    root.mkdir(parents=True)
    settle()
    t0 = time.perf_counter()
    for id_, r in zip(ids, results):
        np.save(root / f"{id_}.npy", r.eigvecs)
    write_s = time.perf_counter() - t0
    size, files = tree_stats(root)
    settle()
    read_s, runs, got = timed(lambda: [np.load(root / f"{ids[i]}.npy") for i in read_ids], args.repeats)
    ok = all(np.array_equal(g, results[i].eigvecs) for g, i in zip(got, read_ids))
    return row(
        ".npy per image",
        files=files,
        size=size,
        write_s=write_s,
        n_written=len(ids),
        written_bytes=sum(payload),
        read_s=read_s,
        n_read=len(read_ids),
        read_bytes=sum(payload[i] for i in read_ids),
        read_runs_s=runs,
        checked=ok,
        note="eigenvectors only",
    )


def bench_pth(root: Path, ids, results, args, read_ids, payload) -> dict:
    import torch

    torch.set_num_threads(1)
    root.mkdir(parents=True)
    settle()
    t0 = time.perf_counter()
    for id_, r in zip(ids, results):
        torch.save(
            {
                "eigenvalues": torch.from_numpy(r.eigvals),
                "eigenvectors": torch.from_numpy(r.eigvecs),
                "residuals": torch.from_numpy(r.residuals),
                "grid": list(r.grid),
                "image_size": list(r.image_size),
            },
            root / f"{id_}.pth",
        )
    write_s = time.perf_counter() - t0
    size, files = tree_stats(root)
    settle()
    read_s, runs, got = timed(
        lambda: [torch.load(root / f"{ids[i]}.pth", weights_only=True) for i in read_ids], args.repeats
    )
    ok = all(np.array_equal(g["eigenvectors"].numpy(), results[i].eigvecs) for g, i in zip(got, read_ids))
    return row(
        ".pth per image",
        files=files,
        size=size,
        write_s=write_s,
        n_written=len(ids),
        written_bytes=sum(payload),
        read_s=read_s,
        n_read=len(read_ids),
        read_bytes=sum(payload[i] for i in read_ids),
        read_runs_s=runs,
        checked=ok,
        note="torch.save of a dict",
    )


def start_s3(timeout_s: float) -> tuple[subprocess.Popen, str]:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(timeout_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        raise RuntimeError(f"the moto S3 server did not start (got {line!r}); pip install 'moto[server]'")
    return proc, f"http://127.0.0.1:{line}"


def stop_s3(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_s3(store: Path, ids, results, args, read_ids, payload) -> dict:
    import boto3

    proc, endpoint = start_s3(args.server_timeout)
    try:
        opts = {
            "key": "testing",
            "secret": "testing",
            "skip_instance_cache": True,
            "use_listings_cache": False,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket="bench")
        url = "s3://bench/priors/store.zarr"
        t0 = time.perf_counter()
        publish(store, url, storage_options=opts, progress=False, max_workers=args.workers)
        publish_s = time.perf_counter() - t0
        size, files = tree_stats(store)
        read_s, runs, ok = read_store(url, read_ids, results, ids, storage_options=opts)  # one run: slow
    finally:
        stop_s3(proc)
    return row(
        "zarr store (S3, moto)",
        files=files,
        size=size,
        write_s=publish_s,
        n_written=len(ids),
        written_bytes=sum(payload),
        read_s=read_s,
        n_read=len(read_ids),
        read_bytes=sum(payload[i] for i in read_ids),
        read_runs_s=runs,
        checked=ok,
        note=f"write = publish of the finalised store (local verify + upload, {args.workers} threads)",
    )


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    print(
        f"{args.images} synthetic images, K={K}, max grid {MAX_GRID}, shard {args.shard_size}, "
        f"{args.reads} random reads; {os.cpu_count()} CPUs"
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sazs-bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ids = [f"img_{i:06d}" for i in range(args.images)]
        results = [synthetic_result(i, args.seed) for i in range(args.images)]
        payload = [payload_bytes(r) for r in results]
        rng = np.random.default_rng(args.seed + 1)
        read_ids = [int(i) for i in rng.choice(args.images, size=min(args.reads, args.images), replace=False)]
        print(f"generated in {time.perf_counter() - t0:.1f}s: {sum(payload) / 1e6:.1f} MB of float16 eigenvectors")

        rows = []
        store_row, finalize_s = bench_store(work / "store.zarr", ids, results, args, read_ids, payload)
        rows.append(store_row)
        rows.append(bench_npy(work / "npy", ids, results, args, read_ids, payload))
        rows.append(bench_pth(work / "pth", ids, results, args, read_ids, payload))
        if not args.no_s3:
            rows.append(bench_s3(work / "store.zarr", ids, results, args, read_ids, payload))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    header = (
        f"{'format':24s} {'files':>6s} {'size MB':>8s} {'write img/s':>11s} {'write MB/s':>10s} "
        f"{'read img/s':>10s} {'read MB/s':>9s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['format']:24s} {r['files']:6d} {r['size_mb']:8.1f} {r['write_images_per_s']:11.0f} "
            f"{r['write_mb_per_s']:10.1f} {r['read_images_per_s']:10.0f} {r['read_mb_per_s']:9.1f}"
        )
    local = rows[0]["read_images_per_s"]
    met = local >= TARGET_READS_PER_S
    print(f"\nfinalize (checksums) of the local store: {finalize_s:.2f}s (not in its write time)")
    print(
        f"target: random access from the local store >= {TARGET_READS_PER_S} images/s: "
        f"{local:.0f} images/s -> {'MET' if met else 'NOT MET'}"
    )
    if not all(r["checked"] for r in rows):
        print("WARNING: some read-back arrays differ from what was written")

    result = {
        "config": {
            **vars(args),
            "num_eigs": K,
            "max_grid": list(MAX_GRID),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "payload_mb": sum(payload) / 1e6,
        "results": rows,
        "target": {"local_random_read_images_per_s": TARGET_READS_PER_S, "measured": local, "met": met},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
