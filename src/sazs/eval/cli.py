"""sazs-eval: zero-shot evaluation (PASCAL-5i, COCO-20i), honest fusion, predictions to look at.

Examples (the first one is what `make eval` does; it needs no data and no weights):

    sazs-eval demo                                     # trains the `make train` demo if missing, evaluates it
    sazs-eval run --dataset voc --data /data/VOC2012 --folds all \\
        --ckpt 'runs/voc-fold{fold}-ViT-B-16/checkpoint.pt' --clip-weights ViT-B-16.pt \\
        --priors priors/voc-val-imgfocus-vits14.zarr
    sazs-eval run --dataset voc --data /data/VOC2012 --folds 0 --splits /src/hsnet/data/splits   # HSNet lists
    sazs-eval run --dataset coco --data /data/coco --split val2014 --folds all \\
        --ckpt 'runs/coco-fold{fold}-ViT-B-16/checkpoint.pt' --clip-weights ViT-B-16.pt
    sazs-eval predict photo.jpg --classes "cat,dog,sofa" --ckpt runs/voc-fold0-ViT-B-16/checkpoint.pt \\
        --clip-weights ViT-B-16.pt             # the weights it was trained with: a checkpoint never names files
    sazs-eval predict photo.jpg --classes "cat,dog" --ckpt ... --fusion project --extractor imgfocus-vits14
    sazs-eval priors /tmp/davis.zarr --dataset davis --data ../shared/data/davis2016-dev --out runs/priors-davis
    sazs-eval list                                     # fusion modes, protocols, folds

Every table prints one row per fold and the mean, with mIoU, FB-IoU and boundary F for each
fusion mode. The headline is a ground-truth-free mode (default: select); the oracle (the
released SAZS evaluation, which picks masks with the ground truth) is printed and saved
only as an upper bound.

The subcommands live in their modules: `run` in :mod:`sazs.eval.run` (its options in
:mod:`sazs.eval.options`), `demo` in :mod:`sazs.eval.demo`, `priors` in
:mod:`sazs.quality.cli`; `predict` and `list` are here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sazs.core.console import run_command, setup_logging
from sazs.core.faults import arm_from_environment
from sazs.datasets.images import ImageError
from sazs.datasets.zeroshot import BENCHMARKS, num_folds, zero_shot_split
from sazs.model.encoders import RANDOM_WEIGHTS_WARNING
from sazs.quality.cli import add_priors_parser
from sazs.stores.format import StoreError
from sazs.stores.reader import open_store
from sazs.train.demo import DEMO_OUT

from .demo import DEMO_EPISODES, DEMO_VAL_PRIORS, DemoConfig, DemoError, run_demo
from .fusion import GT_FREE, MODES, SEMANTIC, FusionConfig, fusion_label, list_fusions
from .options import CALIBRATION, add_span_eigs_arg, add_weight_args, get_args_parser, run_config
from .predict import OnTheFlyPriors, Predictor, parse_classes, predict_image
from .run import run_eval


def cmd_run(args: argparse.Namespace) -> int:
    run_eval(run_config(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The `make eval` default: the `make train` demo's checkpoint on the synthetic VOC val split."""
    run_demo(
        DemoConfig(
            run=args.run,
            priors=args.priors,
            episodes=args.episodes,
            out=args.out,
            draw=args.draw,
            steps=args.steps,
            arch=args.arch,
            clip_weights=args.clip_weights,
            device=args.device,
            progress=not args.no_progress,
        )
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    classes = parse_classes(args.classes)
    files = {k: getattr(args, k) for k in ("clip_weights", "backbone_weights", "text_encoder")}
    predictor = Predictor(
        args.ckpt, device=args.device, short_side=args.short_side, calibration=args.calibration, files=files
    )
    priors = None
    if args.fusion != "none":
        if args.store:
            priors = open_store(args.store)
        elif args.extractor:
            priors = OnTheFlyPriors(
                args.extractor, weights=args.weights, short_side=args.priors_short_side, device=args.device
            )
        else:
            raise ValueError(
                f"--fusion {args.fusion} needs priors: pass --store STORE (priors computed by "
                "sazs-priors) or --extractor NAME (computed now for each image)"
            )
    out = Path(args.out or Path(args.ckpt).parent / "predictions")
    records = []
    for image in args.images:
        rec = predict_image(
            predictor,
            image,
            classes,
            out,
            fusion=args.fusion,
            priors=priors,
            fusion_cfg=FusionConfig(num_eigs=args.num_eigs),
            refine=None if args.refine == "none" else args.refine,
        )
        records.append(rec)
        top = ", ".join(f"{n} {100 * s:.1f}%" for n, s in sorted(rec["share"].items(), key=lambda x: -x[1]) if s > 0)
        print(f"{rec['image']}  ->  {rec['overlay']}  {rec['labels']}  ({top})")
    index = out / "predictions.json"
    index.write_text(
        json.dumps(
            {
                "checkpoint": args.ckpt,
                "labels": {str(i): n for i, n in enumerate(predictor.label_names(classes))},
                "images": records,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"index     {index} (label index -> class name)")
    if predictor.random_weights:
        print(f"WARNING   {RANDOM_WEIGHTS_WARNING}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print(f"fusion modes (headline: one of {', '.join(GT_FREE)}):")
    for mode in list_fusions():
        print(f"  {fusion_label(mode):<36} {MODES.entry(mode).help}")
    for name in BENCHMARKS:
        card = BENCHMARKS[name]
        rule = f"episodes rule {card.sampling}" if card.sampling else "generalised setting only"
        print(f"{card.name} (--dataset {name}; {rule}):")
        for fold in range(num_folds(name)):
            print(f"  fold {fold}: unseen {', '.join(zero_shot_split(name, fold).unseen_names())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sazs-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; keep tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        parents=[get_args_parser()],
        help="evaluate checkpoints on PASCAL-5i / COCO-20i",
        description="Example: sazs-eval run --dataset voc --data /data/VOC2012 --folds all "
        "--ckpt 'runs/voc-fold{fold}-ViT-B-16/checkpoint.pt'",
    )
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser(
        "demo",
        help="evaluate the `make train` demo on the synthetic VOC (what `make eval` does)",
        description="Example: sazs-eval demo --episodes 100",
    )
    demo.add_argument("--run", default=DEMO_OUT, help=f"demo run directory (default {DEMO_OUT}; trained if missing)")
    demo.add_argument("--priors", default=DEMO_VAL_PRIORS, help=f"validation prior store (default {DEMO_VAL_PRIORS})")
    demo.add_argument("--episodes", type=int, default=DEMO_EPISODES, help=f"episodes (default {DEMO_EPISODES})")
    demo.add_argument("--out", default=None, help="report directory (default <run>/eval)")
    demo.add_argument("--draw", type=int, default=6)
    demo.add_argument("--steps", type=int, default=None, help="training steps if the demo must be trained")
    demo.add_argument("--arch", default=None, help="architecture if the demo must be trained")
    demo.add_argument("--clip-weights", default=None, help="CLIP weights if the demo must be trained")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo)
    pred = sub.add_parser(
        "predict",
        help="label maps for images and any class names",
        description="Example: sazs-eval predict a.jpg b.png --classes 'cat,dog,sofa' "
        "--ckpt runs/voc-fold0-ViT-B-16/checkpoint.pt",
    )
    pred.add_argument("images", nargs="+", help="image files (any size)")
    pred.add_argument("--classes", required=True, help="comma-separated class names, e.g. 'cat,dog,sofa'")
    pred.add_argument("--ckpt", required=True, help="training checkpoint")
    pred.add_argument(
        "--fusion",
        default="none",
        choices=list(SEMANTIC),
        help="none, project or segments (corrected by the segments); the last two need --store or --extractor",
    )
    pred.add_argument("--store", default=None, help="prior store holding the images (id = file stem)")
    pred.add_argument("--extractor", default=None, help="compute priors per image with this extractor instead")
    pred.add_argument("--weights", default=None, help="weights for --extractor (dino-*, dinov2-*)")
    pred.add_argument("--priors-short-side", type=int, default=None, help="--extractor input short side")
    add_span_eigs_arg(pred)
    pred.add_argument(
        "--refine",
        default="none",
        choices=["none", "guided"],
        help="project: refine the upsampled eigenvectors with the image first (guided filter)",
    )
    pred.add_argument("--short-side", type=int, default=None, help="model input short side (default: training crop)")
    pred.add_argument(
        "--calibration",
        type=CALIBRATION,
        default=0.0,
        metavar="G",
        help="subtract G of cosine similarity from the checkpoint's training classes (as sazs-eval run)",
    )
    add_weight_args(pred)
    pred.add_argument("--out", default=None, help="output directory (default <ckpt dir>/predictions)")
    pred.add_argument("--device", default="auto")
    pred.set_defaults(func=cmd_predict)
    add_priors_parser(sub)
    lst = sub.add_parser("list", help="fusion modes, protocols and the classes of every fold")
    lst.set_defaults(func=cmd_list)
    args = parser.parse_args(argv)
    # open_clip logs its every step at INFO on the root logger: keep the root at WARNING.
    setup_logging(args.verbose, level=logging.WARNING)
    arm_from_environment()
    return run_command("sazs-eval", args, user_errors=(StoreError, ImageError, DemoError))


if __name__ == "__main__":
    sys.exit(main())
