"""`sazs-eval run`: evaluate fold checkpoints on PASCAL-5i / COCO-20i / CamVid-11 and write the report.

:class:`RunConfig` holds everything a run needs (built once from the command line by
:func:`sazs.eval.options.run_config`); :func:`run_eval` reads the validation split, checks that
each fold's checkpoint was trained without that fold's classes, draws the episodes (writing
the generated split lists beside the report), scores every fold in the episode and the
generalised settings, and writes report.md / report.json and the episode pictures.

An edge of eval: it imports the trainer (checkpoints, through :class:`~sazs.eval.predict.Predictor`)
and reads datasets and prior stores.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sazs.datasets.base import DatasetConfig
from sazs.datasets.registry import build_dataset
from sazs.datasets.zeroshot import BENCHMARKS, check_dataset_classes, zero_shot_split
from sazs.model.checkpoint import load_checkpoint
from sazs.model.encoders import resolve_encoders
from sazs.stores.format import default_store_path
from sazs.stores.manifest import code_version
from sazs.stores.reader import open_store

from .episodes import ProtocolConfig, fold_episodes
from .evaluate import EvalConfig, StorePriors, evaluate_episodes, evaluate_generalised
from .fusion import NEEDS_PRIORS, SEMANTIC, fusion_key
from .pictures import draw_episode_grid
from .predict import Predictor
from .report import build_report, format_text, write_report
from .splits import HSNET_NAMES, scan_labels, write_split_list

log = logging.getLogger("sazs.eval")

DEFAULT_ARCH = "ViT-B-16"


@dataclass(frozen=True)
class RunConfig:
    """One `sazs-eval run`: the data, the checkpoints, the priors, the protocol and the scoring."""

    folds: tuple[int, ...]
    dataset: str = "voc"  # voc | coco | camvid
    data: str | None = None  # dataset root
    split: str = "val"
    limit: int | None = None  # only the first N validation images
    ckpt: str | None = None  # checkpoint path, '{fold}' replaced by each fold; None: the sazs-train default
    arch: str = "auto"  # architecture in the default checkpoint path
    device: str = "auto"
    precision: str = "auto"
    short_side: int | None = None  # model input short side (None: the checkpoint's training crop)
    max_long_side: int | None = None
    cache_features: str | None = None  # feature cache directory ("auto": the default one); None: off
    calibration: float = 0.0
    # Weight files of the checkpoints' encoders (a checkpoint never chooses a file to open).
    clip_weights: str | None = None
    backbone_weights: str | None = None
    text_encoder: str | None = None
    priors: str | None = None  # prior store path or URL; None: priors/<dataset>-<split>-<extractor>.zarr
    extractor: str = "imgfocus-vits14"  # extractor name in the default priors path
    storage_options: str | None = None  # fsspec options (JSON text) for an object-store URL
    generalised: bool = True  # also score the generalised (all classes) setting
    generalised_limit: int | None = None  # generalised setting on the first N validation images only
    out: str | None = None  # report directory; None: runs/eval-<dataset>-<split>
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    scoring: EvalConfig = field(default_factory=EvalConfig)


def checkpoint_paths(cfg: RunConfig) -> dict[int, Path]:
    """The checkpoint of every fold (``{fold}`` in the pattern replaced); all must exist."""
    folds = cfg.folds
    arch = cfg.arch
    if arch == "auto":
        arch = resolve_encoders("auto", "auto", None, fallback=DEFAULT_ARCH)[0]
    pattern = cfg.ckpt or f"runs/{cfg.dataset}-fold{{fold}}-{arch}/checkpoint.pt"
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
            f"fold {f}: {p} (make train DATASET={cfg.dataset} DATA=... FOLD={f})" for f, p in missing.items()
        )
        raise FileNotFoundError(f"missing checkpoint(s): {hints}; or pass --ckpt / CKPT=")
    return paths


def check_checkpoints(ckpts: dict[int, Path], dataset: str) -> None:
    """Refuse, before any work, a checkpoint whose training saw its fold's unseen classes
    (trained for another fold, or with no class held out)."""
    bench = BENCHMARKS[dataset].name
    for fold, path in ckpts.items():
        split = load_checkpoint(path).get("split") or {}
        got_bench, got_fold = split.get("benchmark"), split.get("fold")
        if got_bench != bench or got_fold != fold:
            raise ValueError(
                f"checkpoint {path} was trained for {got_bench} fold {got_fold}, not {bench} fold {fold}: "
                "its training classes include classes this fold holds out, so the score would not be "
                "zero-shot; pass the fold's own checkpoint"
            )


def run_eval(run: RunConfig) -> dict:
    """Evaluate the requested folds; write the report; return it (JSON-able)."""
    protocol, cfg, folds = run.protocol, run.scoring, list(run.folds)
    log.info("sazs %s; configuration: %s", code_version(), json.dumps(asdict(run), default=str, sort_keys=True))
    dataset = build_dataset(DatasetConfig(name=run.dataset, root=run.data, split=run.split, limit=run.limit))
    bench = BENCHMARKS[run.dataset].name
    check_dataset_classes(zero_shot_split(run.dataset, folds[0]), dataset.class_names)
    ckpts = checkpoint_paths(run)
    check_checkpoints(ckpts, run.dataset)
    out = Path(run.out or f"runs/eval-{dataset.name}-{dataset.split}")

    generalised = run.generalised
    # An episode is (background word, class): a benchmark without background (CamVid) has none.
    episodes_on = zero_shot_split(run.dataset, folds[0]).background
    if not episodes_on:
        if not generalised:
            raise ValueError(
                f"{bench} has no background class, so no episodes: it is scored in the generalised "
                "setting only; drop --no-generalised"
            )
        log.info("%s has no background class: generalised setting only (no episodes)", bench)
    store = None
    if cfg.needs_priors:
        priors_path = run.priors or default_store_path(dataset.name, dataset.split, run.extractor)
        if not run.priors and not Path(priors_path).exists():
            modes = sorted(set(cfg.fusions) & NEEDS_PRIORS)
            raise FileNotFoundError(
                f"no prior store at {priors_path} (fusion modes {modes} need the validation split's priors); "
                f"compute it: make priors DATASET={dataset.name} DATA={run.data or '...'} SPLIT={dataset.split} "
                f"EXTRACTOR={run.extractor} (or pass --priors / PRIORS=), or evaluate --fusion none"
            )
        opts = json.loads(run.storage_options) if run.storage_options else None
        store = open_store(priors_path, storage_options=opts)

    label_counts = None
    if episodes_on and not protocol.splits_dir:
        log.info("scanning %d validation masks for the split lists", len(dataset))
        label_counts = scan_labels(dataset, progress=cfg.progress)

    results, gen_results, pictures, warnings, infos = [], [], [], [], {}
    for fold in folds:
        split = zero_shot_split(run.dataset, fold)
        fold_eps = None
        if episodes_on:
            fold_eps = fold_episodes(run.dataset, fold, protocol, dataset_ids=dataset.ids, label_counts=label_counts)
        if label_counts is not None:
            write_split_list(fold_eps.entries, out / "splits" / HSNET_NAMES[bench] / "val" / f"fold{fold}.txt")
        predictor = Predictor(
            ckpts[fold],
            device=run.device,
            short_side=run.short_side,
            max_long_side=run.max_long_side,
            precision=run.precision,
            feature_cache=run.cache_features,
            calibration=run.calibration,
            files={
                "clip_weights": run.clip_weights,
                "backbone_weights": run.backbone_weights,
                "text_encoder": run.text_encoder,
            },
        )
        infos[str(fold)] = predictor.describe()
        ids = list(dict.fromkeys(e.image_id for e in fold_eps.episodes)) if fold_eps else []
        gen_ids = list(dataset.ids[: run.generalised_limit]) if generalised else []
        priors = None
        if store is not None:
            needed = ids + (gen_ids if set(cfg.fusions) & set(SEMANTIC) & NEEDS_PRIORS else [])
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
