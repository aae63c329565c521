"""sazs-eval: zero-shot evaluation (PASCAL-5i, COCO-20i), honest fusion, predictions to look at.

Examples (the first one is what `make eval` does; it needs no data and no weights):

    sazs-eval demo                                     # trains the `make train` demo if missing, evaluates it
    sazs-eval run --dataset voc --data /data/VOC2012 --folds all \\
        --ckpt 'runs/voc-fold{fold}-ViT-B-16/checkpoint.pt' --priors priors/voc-val-imgfocus-vits14.zarr
    sazs-eval run --dataset voc --data /data/VOC2012 --folds 0 --splits /src/hsnet/data/splits   # HSNet lists
    sazs-eval run --dataset coco --data /data/coco --split val2014 --folds all \\
        --ckpt 'runs/coco-fold{fold}-ViT-B-16/checkpoint.pt'
    sazs-eval predict photo.jpg --classes "cat,dog,sofa" --ckpt runs/voc-fold0-ViT-B-16/checkpoint.pt
    sazs-eval predict photo.jpg --classes "cat,dog" --ckpt ... --fusion project --extractor imgfocus-vits14
    sazs-eval priors /tmp/davis.zarr --dataset davis --data ../shared/data/davis2016-dev --out runs/priors-davis
    sazs-eval list                                     # fusion modes, protocols, folds

Every table prints one row per fold and the mean, with mIoU, FB-IoU and boundary F for each
fusion mode. The headline is a ground-truth-free mode (default: select); the oracle (the
released SAZS evaluation, which picks masks with the ground truth) is printed and saved
only as an upper bound.

This module is an edge: it imports the trainer (to rebuild models from checkpoints, through
``predict.Predictor``, and to run the training demo when `make eval` finds none) and the
pipeline (datasets; the demo's validation priors), lazily, inside the functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from sazs.core.console import run_command, setup_logging
from sazs.core.faults import arm_from_environment

log = logging.getLogger("sazs.eval")

DEMO_EPISODES = 50


class DemoError(RuntimeError):
    """A step of the demo (training it, computing its priors) failed; the message says which."""


DEMO_VAL_PRIORS = "priors/synth-voc-demo-val-color.zarr"
DEFAULT_ARCH = "ViT-B-16"


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """Options of `run`, reusable by launchers through ``parents=[...]``."""
    from .episodes import DEFAULT_EPISODES, SAMPLING_RULES
    from .fusion import DEFAULT_HEADLINE, FUSIONS, GT_FREE

    p = argparse.ArgumentParser(add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="voc",
        choices=["voc", "coco", "camvid"],
        help="voc (PASCAL-5i), coco (COCO-20i) or camvid (CamVid-11: generalised setting only)",
    )
    g.add_argument("--data", default=None, metavar="PATH", help="dataset root (Makefile: DATA=)")
    g.add_argument("--split", default="val", help="validation split (default val; coco: val -> val2017/val2014)")
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
        default="auto",
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
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU")
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
        type=float,
        default=0.0,
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
    g.add_argument("--extractor", default="imgfocus-vits14", help="extractor name in the default --priors path")
    g.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for an object-store URL")
    g.add_argument(
        "--allow-missing-priors",
        action="store_true",
        help="images without priors keep the prediction in prior-based modes (counted in the report)",
    )
    g = p.add_argument_group("protocol")
    g.add_argument("--episodes", type=int, default=DEFAULT_EPISODES, help=f"episodes per fold ({DEFAULT_EPISODES})")
    g.add_argument("--seed", type=int, default=0, help="seed of the episode draw")
    g.add_argument(
        "--splits",
        default=None,
        metavar="DIR",
        help="HSNet data/splits directory (pascal/val/fold<i>.txt, coco/val/fold<i>.pkl); "
        "default: lists generated from the annotations",
    )
    g.add_argument("--min-pixels", type=int, default=1, help="generated lists: pixels a class needs in an image")
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
        default=",".join(FUSIONS),
        help=f"comma-separated modes to evaluate (default {','.join(FUSIONS)}; oracle = upper bound)",
    )
    g.add_argument(
        "--headline",
        default=DEFAULT_HEADLINE,
        choices=list(GT_FREE),
        help=f"ground-truth-free mode reported as the headline (default {DEFAULT_HEADLINE})",
    )
    g.add_argument("--num-segments", type=int, default=4, help="eigen-segments v1..vN > 0 for select / oracle (4)")
    g.add_argument("--num-eigs", type=int, default=None, help="eigenvectors spanning the projection (default all)")
    g.add_argument(
        "--select-threshold",
        type=float,
        default=0.5,
        help="select: IoU with the predicted mask a segment needs to replace it (0.5)",
    )
    g.add_argument(
        "--boundary-tolerance",
        type=float,
        default=0.008,
        help="boundary F band: >= 1 pixels, < 1 fraction of the image diagonal (default 0.008, DAVIS)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR", help="report directory (default runs/eval-<dataset>-<split>)")
    g.add_argument("--draw", type=int, default=6, help="episodes drawn per fold in the PNG grid (0 = none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def build_eval_config(args: argparse.Namespace):
    """Parsed arguments -> (ProtocolConfig, EvalConfig), once, at the edge."""
    from .episodes import ProtocolConfig
    from .evaluate import EvalConfig
    from .fusion import FusionConfig

    fusions = tuple(dict.fromkeys(m.strip() for m in args.fusion.split(",") if m.strip()))
    protocol = ProtocolConfig(
        episodes=args.episodes,
        seed=args.seed,
        splits_dir=args.splits,
        min_pixels=args.min_pixels,
        sampling=args.sampling,
    )
    fusion = FusionConfig(
        num_segments=args.num_segments, num_eigs=args.num_eigs, select_threshold=args.select_threshold
    )
    cfg = EvalConfig(
        fusions=fusions,
        headline=args.headline,
        fusion=fusion,
        boundary_tolerance=args.boundary_tolerance,
        allow_missing_priors=args.allow_missing_priors,
        draw=args.draw,
        progress=not args.no_progress,
    )
    return protocol, cfg


def checkpoint_paths(args: argparse.Namespace, folds) -> dict[int, Path]:
    arch = args.arch
    if arch == "auto":
        from sazs.train.encoders import resolve_encoders

        arch = resolve_encoders("auto", "auto", None, fallback=DEFAULT_ARCH)[0]
    pattern = args.ckpt or f"runs/{args.dataset}-fold{{fold}}-{arch}/checkpoint.pt"
    if "{fold}" not in pattern and len(folds) > 1:
        raise ValueError(
            f"one checkpoint ({pattern}) for folds {list(folds)}: each fold needs the model trained "
            "without its classes; put '{fold}' in --ckpt "
            "(e.g. runs/voc-fold{fold}-ViT-B-16/checkpoint.pt)"
        )
    paths = {f: Path(pattern.replace("{fold}", str(f))) for f in folds}
    missing = {f: p for f, p in paths.items() if not p.is_file()}
    if missing:
        hints = "; ".join(
            f"fold {f}: {p} (make train DATASET={args.dataset} DATA=... FOLD={f})" for f, p in missing.items()
        )
        raise FileNotFoundError(f"missing checkpoint(s): {hints}; or pass --ckpt / CKPT=")
    return paths


def check_checkpoints(ckpts: dict[int, Path], dataset: str) -> None:
    """Refuse, before any work, a checkpoint whose training saw its fold's unseen classes
    (trained for another fold, or with no class held out)."""
    from sazs.datasets.zeroshot import BENCHMARKS
    from sazs.train.checkpoint import load_checkpoint

    bench = BENCHMARKS[dataset][0]
    for fold, path in ckpts.items():
        split = load_checkpoint(path).get("split") or {}
        got_bench, got_fold = split.get("benchmark"), split.get("fold")
        if got_bench != bench or got_fold != fold:
            raise ValueError(
                f"checkpoint {path} was trained for {got_bench} fold {got_fold}, not {bench} fold {fold}: "
                "its training classes include classes this fold holds out, so the score would not be "
                "zero-shot; pass the fold's own checkpoint"
            )


def run_eval(args: argparse.Namespace) -> dict:
    """Evaluate the requested folds; write the report; return it (JSON-able)."""
    from sazs.datasets.base import DatasetConfig
    from sazs.datasets.registry import build_dataset
    from sazs.datasets.zeroshot import BENCHMARKS, check_dataset_classes, num_folds, parse_folds, zero_shot_split
    from sazs.stores.manifest import code_version
    from sazs.stores.reader import open_store

    from .episodes import fold_episodes
    from .evaluate import StorePriors, evaluate_episodes, evaluate_generalised
    from .fusion import NEEDS_PRIORS, fusion_key
    from .predict import Predictor
    from .report import build_report, draw_episode_grid, format_text, write_report
    from .splits import HSNET_NAMES, scan_labels, write_split_list

    protocol, cfg = build_eval_config(args)
    folds = parse_folds(args.folds, num_folds(args.dataset))
    log.info("sazs %s; arguments: %s", code_version(), json.dumps(vars(args), default=str, sort_keys=True))
    dataset = build_dataset(DatasetConfig(name=args.dataset, root=args.data, split=args.split, limit=args.limit))
    bench = BENCHMARKS[args.dataset][0]
    check_dataset_classes(zero_shot_split(args.dataset, folds[0]), dataset.class_names)
    ckpts = checkpoint_paths(args, folds)
    check_checkpoints(ckpts, args.dataset)
    out = Path(args.out or f"runs/eval-{dataset.name}-{dataset.split}")

    generalised = not args.no_generalised
    # An episode is (background word, class): a benchmark without background (CamVid) has none.
    episodes_on = zero_shot_split(args.dataset, folds[0]).background
    if not episodes_on:
        if not generalised:
            raise ValueError(
                f"{bench} has no background class, so no episodes: it is scored in the generalised "
                "setting only; drop --no-generalised"
            )
        log.info("%s has no background class: generalised setting only (no episodes)", bench)
    store = None
    if cfg.needs_priors:
        priors_path = args.priors or f"priors/{dataset.name}-{dataset.split}-{args.extractor}.zarr"
        if not args.priors and not Path(priors_path).exists():
            modes = sorted(set(cfg.fusions) & NEEDS_PRIORS)
            raise FileNotFoundError(
                f"no prior store at {priors_path} (fusion modes {modes} need the validation split's priors); "
                f"compute it: make priors DATASET={dataset.name} DATA={args.data or '...'} SPLIT={dataset.split} "
                f"EXTRACTOR={args.extractor} (or pass --priors / PRIORS=), or evaluate --fusion none"
            )
        opts = json.loads(args.storage_options) if args.storage_options else None
        store = open_store(priors_path, storage_options=opts)

    label_counts = None
    if episodes_on and not protocol.splits_dir:
        log.info("scanning %d validation masks for the split lists", len(dataset))
        label_counts = scan_labels(dataset, progress=cfg.progress)

    results, gen_results, pictures, warnings, infos = [], [], [], [], {}
    for fold in folds:
        split = zero_shot_split(args.dataset, fold)
        fold_eps = None
        if episodes_on:
            fold_eps = fold_episodes(args.dataset, fold, protocol, dataset_ids=dataset.ids, label_counts=label_counts)
        if label_counts is not None:
            write_split_list(fold_eps.entries, out / "splits" / HSNET_NAMES[bench] / "val" / f"fold{fold}.txt")
        predictor = Predictor(
            ckpts[fold],
            device=args.device,
            short_side=args.short_side,
            max_long_side=args.max_long_side,
            precision=args.precision,
            feature_cache=args.cache_features,
            calibration=args.calibration,
        )
        infos[str(fold)] = predictor.describe()
        ids = list(dict.fromkeys(e.image_id for e in fold_eps.episodes)) if fold_eps else []
        gen_ids = list(dataset.ids[: args.generalised_limit]) if generalised else []
        priors = None
        if store is not None:
            needed = ids + (gen_ids if "project" in cfg.fusions else [])
            priors = StorePriors(
                store,
                dataset_name=dataset.name,
                split=dataset.split,
                ids=needed,
                allow_missing=cfg.allow_missing_priors,
            )
        res = evaluate_episodes(predictor, dataset, fold_eps, priors, cfg) if fold_eps else None
        if res is not None:
            results.append(res)
            fallbacks = max(m["fallbacks"] for m in res["modes"].values())
            if fallbacks:
                warnings.append(
                    f"fold {fold}: {fallbacks} episode(s) had no priors; prior-based modes kept the prediction"
                )
        if cfg.draw and res is not None:
            png = draw_episode_grid(
                res["samples"],
                out / f"episodes-{bench}-fold{fold}.png",
                fusions=cfg.fusions,
                headline=cfg.headline,
                title=f"{bench} fold {fold} · {Path(ckpts[fold]).parent.name} · "
                f"red = ground truth (white: ignored), blue = predicted mask"
                + (" · RANDOM WEIGHTS" if predictor.random_weights else ""),
            )
            if png:
                pictures.append(str(png))
        if generalised:
            gen_results.append(evaluate_generalised(predictor, dataset, split, gen_ids, priors, cfg))
        if predictor.random_weights:
            warnings.append(
                f"fold {fold}: {ckpts[fold]} was trained WITHOUT PRETRAINED WEIGHTS (random encoders): "
                "its numbers are MEANINGLESS"
            )
        del predictor
    meta = {
        "dataset": dataset.describe(),
        "checkpoints": {str(f): str(p) for f, p in ckpts.items()},
        "models": infos,
        "priors": None
        if store is None
        else {
            "url": store.url,
            "fingerprint": store.fingerprint,
            "extractor": store.manifest.get("extractor", {}).get("name"),
        },
        "protocol_config": asdict(protocol),
        "fusion_config": {
            "fusions": [fusion_key(m) for m in cfg.fusions],
            "headline": cfg.headline,
            **asdict(cfg.fusion),
            "boundary_tolerance": cfg.boundary_tolerance,
        },
        "code_version": code_version(),
        "command": sys.argv,
        "warnings": warnings,
        "pictures": pictures,
    }
    report = build_report(
        {bench: results} if episodes_on else {},
        headline=cfg.headline,
        generalised={bench: gen_results} if gen_results else None,
        meta=meta,
    )
    paths = write_report(report, out)
    print(format_text(report))
    print(f"report    {paths['markdown']}  {paths['json']}")
    for p in pictures:
        print(f"picture   {p}")
    if label_counts is not None:
        print(f"splits    {out / 'splits'} (generated lists, HSNet format; reuse with --splits)")
    return report


def cmd_run(args: argparse.Namespace) -> int:
    run_eval(args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The `make eval` default: the `make train` demo's checkpoint on the synthetic VOC val split."""
    from sazs.pipeline import cli as priors_cli
    from sazs.train import cli as train_cli

    run = Path(args.run)
    ckpt = run / "checkpoint.pt"
    if not ckpt.is_file():
        log.info("no demo checkpoint at %s: running the training demo first (what `make train` does)", ckpt)
        argv = ["demo", "--out", str(run), "--device", args.device]
        for flag, value in (("--steps", args.steps), ("--arch", args.arch), ("--clip-weights", args.clip_weights)):
            argv += [flag, str(value)] if value else []
        argv += ["--no-progress"] if args.no_progress else []
        rc = train_cli.main(argv)
        if rc != 0:
            raise DemoError(f"the training demo failed (sazs-train exit code {rc})")
    voc = Path(train_cli.DEMO_DATA) / "VOCdevkit" / "VOC2012"
    if not (voc / "ImageSets" / "Segmentation" / "val.txt").is_file():
        train_cli.prepare_demo_data(progress=not args.no_progress)
    # Validation priors with the training demo's settings (colour features, short side 128).
    rc = priors_cli.main(
        [
            "run",
            "--dataset",
            "voc",
            "--data",
            str(voc),
            "--split",
            "val",
            "--extractor",
            "color",
            "--short-side",
            "128",
            "--out",
            args.priors,
            "--preview",
            "0",
            "--no-progress",
        ]
    )
    if rc != 0:
        raise DemoError(f"computing the demo's validation priors failed (sazs-priors exit code {rc})")
    from sazs.train.checkpoint import load_checkpoint

    fold = (load_checkpoint(ckpt).get("split") or {}).get("fold")
    if fold is None:
        raise ValueError(f"{ckpt} holds no class out (fold 'all'); a zero-shot evaluation needs a fold's checkpoint")
    run_args = get_args_parser().parse_args(
        [
            "--dataset",
            "voc",
            "--data",
            str(voc),
            "--split",
            "val",
            "--folds",
            str(fold),
            "--ckpt",
            str(ckpt),
            "--priors",
            args.priors,
            "--episodes",
            str(args.episodes),
            "--out",
            args.out or str(run / "eval"),
            "--device",
            args.device,
            "--draw",
            str(args.draw),
        ]
        + (["--no-progress"] if args.no_progress else [])
    )
    run_eval(run_args)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .fusion import FusionConfig
    from .predict import OnTheFlyPriors, Predictor, parse_classes, predict_image

    classes = parse_classes(args.classes)
    predictor = Predictor(args.ckpt, device=args.device, short_side=args.short_side, calibration=args.calibration)
    priors = None
    if args.fusion != "none":
        if args.store:
            from sazs.stores.reader import open_store

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
        from sazs.train.model import RANDOM_WEIGHTS_WARNING

        print(f"WARNING   {RANDOM_WEIGHTS_WARNING}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from sazs.datasets.zeroshot import BENCHMARKS, num_folds, zero_shot_split

    from .episodes import DEFAULT_SAMPLING
    from .fusion import FUSIONS, GT_FREE, fusion_label

    print("fusion modes: " + ", ".join(fusion_label(m) for m in FUSIONS) + f" (headline: one of {', '.join(GT_FREE)})")
    for name, (bench, _) in BENCHMARKS.items():
        rule = f"episodes rule {DEFAULT_SAMPLING[bench]}" if bench in DEFAULT_SAMPLING else "generalised setting only"
        print(f"{bench} (--dataset {name}; {rule}):")
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
    from sazs.train.cli import DEMO_OUT  # noqa: PLC0415  (a constant; the trainer is this edge's dependency)

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
        "--fusion", default="none", choices=["none", "project"], help="none, or project (needs --store or --extractor)"
    )
    pred.add_argument("--store", default=None, help="prior store holding the images (id = file stem)")
    pred.add_argument("--extractor", default=None, help="compute priors per image with this extractor instead")
    pred.add_argument("--weights", default=None, help="weights for --extractor (dino-*, dinov2-*)")
    pred.add_argument("--priors-short-side", type=int, default=None, help="--extractor input short side")
    pred.add_argument("--num-eigs", type=int, default=None, help="eigenvectors spanning the projection")
    pred.add_argument(
        "--refine",
        default="none",
        choices=["none", "guided"],
        help="project: refine the upsampled eigenvectors with the image first (guided filter)",
    )
    pred.add_argument("--short-side", type=int, default=None, help="model input short side (default: training crop)")
    pred.add_argument(
        "--calibration",
        type=float,
        default=0.0,
        metavar="G",
        help="subtract G of cosine similarity from the checkpoint's training classes (as sazs-eval run)",
    )
    pred.add_argument("--out", default=None, help="output directory (default <ckpt dir>/predictions)")
    pred.add_argument("--device", default="auto")
    pred.set_defaults(func=cmd_predict)
    from .prior_report import add_priors_parser  # noqa: PLC0415  (the `priors` subcommand lives there)

    add_priors_parser(sub)
    lst = sub.add_parser("list", help="fusion modes, protocols and the classes of every fold")
    lst.set_defaults(func=cmd_list)
    args = parser.parse_args(argv)
    # open_clip logs its every step at INFO on the root logger: keep the root at WARNING.
    setup_logging(args.verbose, level=logging.WARNING)
    arm_from_environment()
    from sazs.datasets.images import ImageError
    from sazs.stores.writer import StoreError

    return run_command("sazs-eval", args, user_errors=(StoreError, ImageError, DemoError))


if __name__ == "__main__":
    sys.exit(main())
