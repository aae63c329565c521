"""``sazs-train demo``: a synthetic VOC, its priors and a short CPU run from nothing (``make train``).

:func:`prepare_demo_data` writes the dataset once and computes its training-split priors with
the pipeline's own job (:func:`demo_priors`, which ``sazs-eval demo`` uses for its val split);
:func:`demo_run_argv` is the ``sazs-train run`` command line of the demo (real pretrained
encoders when installed, a frozen pipeline ViT's tokens cached per view); :func:`train_demo`
runs it, starting over where an earlier demo's checkpoint cannot be continued.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from sazs.datasets.base import DatasetConfig
from sazs.datasets.registry import build_dataset
from sazs.datasets.synthetic import make_voc
from sazs.features.extractors import ExtractorConfig, build_extractor
from sazs.model.checkpoint import CheckpointError, ResumeMismatchError
from sazs.model.encoders import is_pipeline_vit, resolve_encoders
from sazs.model.model import ModelConfig, output_stride
from sazs.pipeline.graph import GraphConfig
from sazs.pipeline.job import JobConfig, run_local
from sazs.pipeline.spectral import SpectralConfig

from .config import RunConfig
from .loop import train

log = logging.getLogger(__name__)

DEMO_DATA = "data/synth-voc-demo"
DEMO_PRIORS = "priors/synth-voc-demo-train-color.zarr"
DEMO_OUT = "runs/demo-synth-voc-fold0"


def prepare_demo_data(
    data: str = DEMO_DATA, priors: str = DEMO_PRIORS, *, num_train: int = 64, num_val: int = 16, progress: bool = False
) -> tuple[str, str]:
    """Synthetic VOC (written once) and its training-split priors (computed once, by sazs-priors)."""
    voc = Path(data) / "VOCdevkit" / "VOC2012"
    if not (voc / "ImageSets" / "Segmentation" / "train.txt").is_file():
        log.info("writing the synthetic VOC dataset to %s", data)
        make_voc(data, num_train=num_train, num_val=num_val, size=(160, 224), seed=0)
    return str(voc), demo_priors(str(voc), "train", priors, progress=progress)


def demo_priors(voc: str, split: str, out: str, *, progress: bool = False) -> str:
    """Priors of a demo split with the demo's settings (colour features, short side 128): the
    pipeline's own job (`make priors`), so a finished store is skipped and a partial one resumed."""
    dataset = build_dataset(DatasetConfig(name="voc", root=voc, split=split))
    extractor = build_extractor(ExtractorConfig(name="color", short_side=128))
    summary = run_local(dataset, extractor, GraphConfig(), SpectralConfig(), JobConfig(out=out, progress=progress))
    print("\n".join(summary.lines()))  # the summary `make priors` prints
    if summary.done < summary.total:
        raise RuntimeError(
            f"computing the demo priors of {voc} ({split}) left {summary.total - summary.done} image(s) undone"
        )
    return out


def demo_run_argv(
    voc: str,
    priors: str,
    *,
    out: str,
    arch: str,
    clip_weights: str | None,
    fold: int | None,
    steps: int,
    batch_size: int,
    crop_size: int,
    workers: int,
    device: str,
    progress: bool,
) -> list[str]:
    """The ``sazs-train run`` arguments of the demo on ``voc`` with ``priors``."""
    arch, text_encoder = resolve_encoders(arch, "auto", clip_weights, fallback="ViT-S-16")
    patch = output_stride(ModelConfig(arch=arch)) * ModelConfig().upsample
    crop = max(patch, crop_size // patch * patch)
    cache = ["--cache-features"] if is_pipeline_vit(arch) else []
    return (
        [
            "--dataset",
            "voc",
            "--data",
            voc,
            "--split",
            "train",
            "--fold",
            "all" if fold is None else str(fold),
            "--priors",
            priors,
            "--crop-size",
            str(crop),
            "--arch",
            arch,
            "--text-encoder",
            text_encoder,
            "--templates",
            "single",
            "--optimizer",
            "adamw",
            "--lr",
            "1e-3",
            "--weight-decay",
            "1e-4",
            "--steps",
            str(steps),
            "--batch-size",
            str(batch_size),
            "--spectral-weight",
            "1.0",
            "--checkpoint-every",
            "50",
            "--log-every",
            "10",
            "--val-split",
            "val",
            "--out",
            out,
            "--workers",
            str(workers),
            "--device",
            device,
            "--resume",
            "auto",
        ]
        + cache
        + ([] if progress else ["--no-progress"])
        + (["--clip-weights", clip_weights] if clip_weights else [])
    )


def train_demo(cfg: RunConfig) -> dict:
    """Train (or continue) the demo run; one that cannot be continued starts over."""
    try:
        return train(cfg)
    except (ResumeMismatchError, CheckpointError) as exc:  # `make train STEPS=500` after 300; an old checkpoint
        log.warning("%s; the demo starts over in %s", exc, cfg.train.out_dir)
        return train(replace(cfg, train=replace(cfg.train, resume=None, overwrite=True)))
