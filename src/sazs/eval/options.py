"""The options of `sazs-eval run` and the :class:`~sazs.eval.run.RunConfig` built from them, once.

:func:`get_args_parser` is reusable by launchers through ``parents=[...]``; :func:`run_config`
turns the parsed arguments into the typed, frozen configuration that :func:`sazs.eval.run.run_eval`
takes.
"""

from __future__ import annotations

import argparse

from sazs.core.argtypes import number
from sazs.datasets.zeroshot import BENCHMARKS, num_folds, parse_folds

from .episodes import DEFAULT_EPISODES, SAMPLING_RULES, ProtocolConfig
from .evaluate import EvalConfig
from .fusion import DEFAULT_HEADLINE, FUSIONS, GT_FREE, FusionConfig
from .run import DEFAULT_ARCH, RunConfig

# Calibrated stacking subtracts G of cosine similarity (in [-1, 1]): |G| > 2 changes nothing more.
CALIBRATION = number(-2, 2)


def add_weight_args(g) -> None:
    """The encoders' weight files of a checkpoint: given here, never taken from the checkpoint."""
    for flag, what in (
        ("--clip-weights", "open_clip checkpoint file the checkpoints were trained with (CLIP_WEIGHTS=)"),
        ("--backbone-weights", "dino-*/dinov2-* backbone file the checkpoints were trained with (WEIGHTS=)"),
        ("--text-encoder", "sentence-transformers folder the checkpoints were trained with (a package name is kept)"),
    ):
        g.add_argument(flag, default=None, metavar="PATH", help=f"{what}; a checkpoint never chooses a file to open")


def add_span_eigs_arg(g) -> None:
    """--span-eigs, shared by `run` and `predict`."""
    g.add_argument(
        "--span-eigs",
        type=int,
        default=FusionConfig.num_eigs,
        dest="num_eigs",
        metavar="K",
        help="eigenvectors v0..v(K-1) spanning the project fusion (default: all)",
    )


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """Options of `run`, reusable by launchers through ``parents=[...]``."""
    p = argparse.ArgumentParser(add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=RunConfig.dataset,
        choices=list(BENCHMARKS),
        help="voc (PASCAL-5i), coco (COCO-20i) or camvid (CamVid-11: generalised setting only)",
    )
    g.add_argument("--data", default=None, metavar="PATH", help="dataset root (Makefile: DATA=)")
    g.add_argument(
        "--split", default=RunConfig.split, help="validation split (default val; coco: val -> val2017/val2014)"
    )
    g.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N validation images")
    g.add_argument("--folds", default="0", help="folds: 0..3 (camvid 0..2), a list such as 0,2, or 'all' (default 0)")
    g = p.add_argument_group("checkpoints")
    g.add_argument(
        "--ckpt",
        default=None,
        metavar="PATH",
        help="checkpoint; '{fold}' in it is replaced by each fold "
        "(default runs/<dataset>-fold{fold}-<arch>/checkpoint.pt, the sazs-train default)",
    )
    g.add_argument(
        "--arch",
        default=RunConfig.arch,
        help="architecture in the default --ckpt path (auto: sazs-train's default, imgfocus-vits14 when "
        f"the pretrained stack is installed, else {DEFAULT_ARCH})",
    )
    g.add_argument(
        "--short-side",
        type=int,
        default=None,
        metavar="PX",
        help="model input short side (default: the checkpoint's training crop)",
    )
    g.add_argument("--max-long-side", type=int, default=None, metavar="PX", help="cap (default 2x short side)")
    g.add_argument("--device", default=RunConfig.device, help="auto | cpu | cuda[:N]")
    g.add_argument(
        "--precision", default=RunConfig.precision, choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU"
    )
    add_weight_args(g)
    g.add_argument(
        "--cache-features",
        nargs="?",
        const="auto",
        default=None,
        metavar="DIR",
        help="frozen backbone, fp32: reuse its tokens of an image across checkpoints (sazs-train's "
        "feature cache, default ~/.cache/sazs/features)",
    )
    g.add_argument(
        "--calibration",
        type=CALIBRATION,
        default=RunConfig.calibration,
        metavar="G",
        help="calibrated stacking: subtract G of cosine similarity from the classes the checkpoint was "
        "trained on (SPNet-C; choose G on val; default 0)",
    )
    g = p.add_argument_group("priors")
    g.add_argument(
        "--priors",
        default=None,
        metavar="PATH|URL",
        help="prior store of the validation split (default priors/<dataset>-<split>-<extractor>.zarr)",
    )
    g.add_argument("--extractor", default=RunConfig.extractor, help="extractor name in the default --priors path")
    g.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for an object-store URL")
    g.add_argument(
        "--allow-missing-priors",
        action="store_true",
        help="images without priors keep the prediction in prior-based modes (counted in the report)",
    )
    g = p.add_argument_group("protocol")
    g.add_argument(
        "--episodes", type=int, default=ProtocolConfig.episodes, help=f"episodes per fold ({DEFAULT_EPISODES})"
    )
    g.add_argument("--seed", type=int, default=ProtocolConfig.seed, help="seed of the episode draw")
    g.add_argument(
        "--splits",
        default=None,
        metavar="DIR",
        help="HSNet data/splits directory (pascal/val/fold<i>.txt, coco/val/fold<i>.pkl); "
        "default: lists generated from the annotations",
    )
    g.add_argument(
        "--min-pixels",
        type=int,
        default=ProtocolConfig.min_pixels,
        help="generated lists: pixels a class needs in an image",
    )
    g.add_argument(
        "--sampling",
        default=None,
        choices=list(SAMPLING_RULES),
        help="episode rule (default: cycle for PASCAL-5i, class-uniform for COCO-20i, as HSNet)",
    )
    g.add_argument("--no-generalised", action="store_true", help="skip the generalised (all classes) setting")
    g.add_argument(
        "--generalised-limit",
        type=int,
        default=None,
        metavar="N",
        help="generalised setting on the first N validation images only (default all)",
    )
    g = p.add_argument_group("fusion")
    g.add_argument(
        "--fusion",
        default=",".join(EvalConfig.fusions),
        help=f"comma-separated modes to evaluate (default {','.join(FUSIONS)}; oracle = upper bound)",
    )
    g.add_argument(
        "--headline",
        default=EvalConfig.headline,
        choices=list(GT_FREE),
        help=f"ground-truth-free mode reported as the headline (default {DEFAULT_HEADLINE})",
    )
    g.add_argument(
        "--num-segments",
        type=int,
        default=FusionConfig.num_segments,
        help="eigen-segments v1..vN > 0 for select / oracle (4)",
    )
    add_span_eigs_arg(g)
    g.add_argument(
        "--select-threshold",
        type=number(0, 1),
        default=FusionConfig.select_threshold,
        help="select: IoU with the predicted mask a segment needs to replace it (0.5)",
    )
    g.add_argument(
        "--spectral-segments",
        type=int,
        default=FusionConfig.spectral_segments,
        help="segments: spectral segments, k-means clusters of the eigenvectors' rows (default %(default)s)",
    )
    g.add_argument(
        "--superpixels",
        type=int,
        default=FusionConfig.superpixels,
        help="segments: SLIC superpixels of the image carrying the decisions (0 = none; default %(default)s)",
    )
    g.add_argument(
        "--boundary-tolerance",
        type=number(0, 100, lo_open=True),
        default=EvalConfig.boundary_tolerance,
        help="boundary F band in (0, 100]: >= 1 pixels, < 1 fraction of the image diagonal (default 0.008, DAVIS)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR", help="report directory (default runs/eval-<dataset>-<split>)")
    g.add_argument(
        "--draw", type=int, default=EvalConfig.draw, help="episodes drawn per fold in the PNG grid (0 = none)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_config(args: argparse.Namespace) -> RunConfig:
    """Parsed `run` arguments -> the run's configuration (protocol and scoring checked first, then the folds)."""
    fusions = tuple(dict.fromkeys(m.strip() for m in args.fusion.split(",") if m.strip()))
    protocol = ProtocolConfig(
        episodes=args.episodes,
        seed=args.seed,
        splits_dir=args.splits,
        min_pixels=args.min_pixels,
        sampling=args.sampling,
    )
    fusion = FusionConfig(
        num_segments=args.num_segments,
        num_eigs=args.num_eigs,
        select_threshold=args.select_threshold,
        spectral_segments=args.spectral_segments,
        superpixels=args.superpixels,
    )
    scoring = EvalConfig(
        fusions=fusions,
        headline=args.headline,
        fusion=fusion,
        boundary_tolerance=args.boundary_tolerance,
        allow_missing_priors=args.allow_missing_priors,
        draw=args.draw,
        progress=not args.no_progress,
    )
    return RunConfig(
        folds=tuple(parse_folds(args.folds, num_folds(args.dataset))),
        dataset=args.dataset,
        data=args.data,
        split=args.split,
        limit=args.limit,
        ckpt=args.ckpt,
        arch=args.arch,
        device=args.device,
        precision=args.precision,
        short_side=args.short_side,
        max_long_side=args.max_long_side,
        cache_features=args.cache_features,
        calibration=args.calibration,
        clip_weights=args.clip_weights,
        backbone_weights=args.backbone_weights,
        text_encoder=args.text_encoder,
        priors=args.priors,
        extractor=args.extractor,
        storage_options=args.storage_options,
        generalised=not args.no_generalised,
        generalised_limit=args.generalised_limit,
        out=args.out,
        protocol=protocol,
        scoring=scoring,
    )
