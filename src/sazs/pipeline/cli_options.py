"""The options of `sazs-priors run` (`get_args_parser`, reusable by launchers through
``parents=[...]``) and the argparse types that check their values on the command line.

`cli.build_configs` turns the parsed options into the stages' frozen configs. The types
(:func:`~sazs.core.argtypes.at_least`, :func:`~sazs.core.argtypes.number`) live in core.
"""

from __future__ import annotations

import argparse

from sazs.core.argtypes import at_least, number
from sazs.core.limits import MAX_GRAPH_WEIGHT
from sazs.datasets.base import DatasetConfig
from sazs.features.extractors import FACETS, ExtractorConfig

from .graph import GLOBAL_KERNELS, GraphConfig
from .job import JobConfig
from .knn import BACKENDS
from .ray_plan import RayConfig
from .spectral import SpectralConfig


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """Options of `run`, reusable by launchers through ``parents=[...]``."""
    p = argparse.ArgumentParser(add_help=add_help)
    g = p.add_argument_group("dataset")
    g.add_argument(
        "--dataset", default=DatasetConfig.name, help="dataset name (see `sazs-priors list`; default: %(default)s)"
    )
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
    g.add_argument(
        "--extractor",
        default=ExtractorConfig.name,
        help="feature extractor (see `sazs-priors list`; default: %(default)s)",
    )
    g.add_argument("--weights", default=None, metavar="PATH", help="local checkpoint for dino-*/dinov2-* extractors")
    g.add_argument(
        "--facet",
        default=ExtractorConfig.facet,
        choices=FACETS,
        help="last-block keys (DSM), output tokens or last-block values",
    )
    g.add_argument(
        "--center",
        action="store_true",
        help="subtract each image's mean patch feature before L2-normalising (off by default; a new fingerprint)",
    )
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
    g.add_argument("--device", default=ExtractorConfig.device, help="auto | cpu | cuda[:N] (auto: cuda if present)")
    g.add_argument(
        "--batch-size", type=at_least(1), default=ExtractorConfig.batch_size, help="images per extractor batch"
    )
    g.add_argument(
        "--precision",
        default=ExtractorConfig.precision,
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto: fp32 on CPU, bf16 autocast on GPU",
    )
    g = p.add_argument_group("graph")
    g.add_argument(
        "--knn",
        type=at_least(1),
        default=GraphConfig.k,
        metavar="K",
        help="neighbours per patch (default %(default)s; an image with fewer patches links each to all)",
    )
    g.add_argument(
        "--graph-backend",
        default="auto",
        choices=["auto", *BACKENDS],
        help="kNN search: auto (default: batched on a GPU, certified on a CPU), certified (bf16 "
        "search with an error bound, exact float32 answer), faiss (IndexFlatIP), torch (blocked "
        "matmul) or batched (a shard's images at once on the features' device); all give the "
        "same graph up to exact ties",
    )
    g.add_argument(
        "--threshold",
        type=number(0, 1, hi_open=True),
        default=GraphConfig.threshold,
        help="drop affinities <= this, in [0, 1) (default %(default)s)",
    )
    g.add_argument(
        "--color-weight",
        type=number(0, MAX_GRAPH_WEIGHT),
        default=GraphConfig.color_weight,
        help=f"weight of the colour/position kNN term, in [0, {MAX_GRAPH_WEIGHT:g}] (0 = off)",
    )
    g.add_argument(
        "--global-weight",
        type=number(0, MAX_GRAPH_WEIGHT),
        default=GraphConfig.global_weight,
        help="weight g of the global term g k(p_i.p_j) added to the kNN graph (p: unit features "
        "on their top --global-rank directions; applied in O(N r), never formed), "
        f"in [0, {MAX_GRAPH_WEIGHT:g}] (default %(default)s; "
        "0 = the kNN graph alone, the default before the global term; the previous default was "
        "--global-weight 1 --global-kernel affine)",
    )
    g.add_argument(
        "--global-rank",
        type=at_least(0),
        default=GraphConfig.global_rank,
        metavar="R",
        help="principal directions kept in the global term (default %(default)s; 0 = all)",
    )
    g.add_argument(
        "--global-kernel",
        default=GraphConfig.global_kernel,
        choices=list(GLOBAL_KERNELS),
        help="k of the global term: cosine (default) p_i.p_j, the low-rank form of the original "
        "max(cos, 0) (shifted only if some pair is negative); affine (1 + p_i.p_j) / 2, flatter, "
        "the previous default (with --global-weight 1)",
    )
    g.add_argument(
        "--graph",
        default=GraphConfig.kind,
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
        default=SpectralConfig.num_eigs,
        metavar="K",
        help="eigenvectors kept per image, >= 2 (default %(default)s; an image needs more than K patches)",
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
        "--shard-size",
        type=at_least(1),
        default=JobConfig.shard_size,
        metavar="S",
        help="images per store shard (default %(default)s)",
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
    g.add_argument(
        "--preview",
        type=at_least(0),
        default=JobConfig.preview,
        metavar="N",
        help="images in the preview PNG (0 = none)",
    )
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
        default=RayConfig.solve_on,
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
        default=RayConfig.max_retries,
        metavar="N",
        help="resubmissions of a shard whose worker or node was lost (then its images are recorded failed)",
    )
    return p
