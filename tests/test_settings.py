"""Every default is written once, in its stage's frozen config: a CLI flag's default must equal its config's.

Each CLI's flags are mapped to the config field they set. A flag whose default differs from
its field's (or whose field has no default) fails here, unless it is listed in RESOLVED: flags
whose default is resolved at run time (``auto`` or None: the dataset's, the device's), with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from sazs.datasets.base import DatasetConfig
from sazs.eval.episodes import ProtocolConfig
from sazs.eval.evaluate import EvalConfig
from sazs.eval.fusion import FusionConfig
from sazs.eval.options import get_args_parser as eval_parser
from sazs.eval.run import RunConfig as EvalRunConfig
from sazs.features.extractors import ExtractorConfig
from sazs.model.model import ModelConfig
from sazs.pipeline.cli_options import get_args_parser as priors_parser
from sazs.pipeline.graph import GraphConfig
from sazs.pipeline.job import JobConfig
from sazs.pipeline.ray_plan import RayConfig
from sazs.pipeline.spectral import SpectralConfig
from sazs.train.cli import get_args_parser as train_parser
from sazs.train.config import TrainConfig
from sazs.train.data import AugmentConfig, DataConfig
from sazs.train.losses import LossConfig

PRIORS = {
    "--dataset": (DatasetConfig, "name"),
    "--split": (DatasetConfig, "split"),
    "--limit": (DatasetConfig, "limit"),
    "--extractor": (ExtractorConfig, "name"),
    "--weights": (ExtractorConfig, "weights"),
    "--facet": (ExtractorConfig, "facet"),
    "--short-side": (ExtractorConfig, "short_side"),
    "--max-long-side": (ExtractorConfig, "max_long_side"),
    "--device": (ExtractorConfig, "device"),
    "--batch-size": (ExtractorConfig, "batch_size"),
    "--precision": (ExtractorConfig, "precision"),
    "--knn": (GraphConfig, "k"),
    "--graph-backend": (GraphConfig, "backend"),
    "--threshold": (GraphConfig, "threshold"),
    "--color-weight": (GraphConfig, "color_weight"),
    "--global-weight": (GraphConfig, "global_weight"),
    "--global-rank": (GraphConfig, "global_rank"),
    "--global-kernel": (GraphConfig, "global_kernel"),
    "--graph": (GraphConfig, "kind"),
    "--num-eigs": (SpectralConfig, "num_eigs"),
    "--solver": (SpectralConfig, "solver"),
    "--shard-size": (JobConfig, "shard_size"),
    "--overwrite": (JobConfig, "overwrite"),
    "--part": (JobConfig, "part"),
    "--retry-failed": (JobConfig, "retry_failed"),
    "--take-over-lock": (JobConfig, "take_over_lock"),
    "--preview": (JobConfig, "preview"),
    "--decode-workers": (JobConfig, "decode_workers"),
    "--ray-address": (RayConfig, "address"),
    "--ray-num-cpus": (RayConfig, "num_cpus"),
    "--ray-num-gpus": (RayConfig, "num_gpus"),
    "--ray-actors": (RayConfig, "actors"),
    "--ray-solve-on": (RayConfig, "solve_on"),
    "--ray-max-in-flight": (RayConfig, "max_in_flight"),
    "--ray-max-retries": (RayConfig, "max_retries"),
}

TRAIN = {
    "--dataset": (DataConfig, "dataset"),
    "--split": (DataConfig, "split"),
    "--limit": (DataConfig, "limit"),
    "--fold": (DataConfig, "fold"),
    "--unseen": (DataConfig, "unseen"),
    "--priors": (DataConfig, "priors"),
    "--storage-options": (DataConfig, "storage_options"),
    "--skip-failed": (DataConfig, "skip_failed"),
    "--views": (DataConfig, "views"),
    "--prior-eigs": (DataConfig, "num_eigs"),
    "--crop-size": (AugmentConfig, "crop_size"),
    "--rotate": (AugmentConfig, "rotate"),
    "--arch": (ModelConfig, "arch"),
    "--clip-weights": (ModelConfig, "clip_weights"),
    "--backbone-weights": (ModelConfig, "backbone_weights"),
    "--text-encoder": (ModelConfig, "text_encoder"),
    "--head-dim": (ModelConfig, "head_dim"),
    "--upsample": (ModelConfig, "upsample"),
    "--templates": (ModelConfig, "templates"),
    "--finetune-backbone": (ModelConfig, "finetune_backbone"),
    "--spectral-weight": (LossConfig, "spectral_weight"),
    "--segment-weight": (LossConfig, "segment_weight"),
    "--edge-weight": (LossConfig, "edge_weight"),
    **{
        f"--{name.replace('_', '-')}": (TrainConfig, name)
        for name in (
            "backbone_lr_mult",
            "optimizer",
            "lr",
            "momentum",
            "weight_decay",
            "poly_power",
            "warmup_steps",
            "clip_grad",
            "steps",
            "epochs",
            "batch_size",
            "accum_steps",
            "resume",
            "overwrite",
            "stop_at",
            "checkpoint_every",
            "log_every",
            "val_split",
            "val_every",
            "val_limit",
            "seed",
            "device",
            "precision",
            "workers",
            "tensorboard",
            "save_backbone",
        )
    },
}

EVAL = {
    **{
        f"--{name.replace('_', '-')}": (EvalRunConfig, name)
        for name in (
            "dataset",
            "data",
            "split",
            "limit",
            "ckpt",
            "arch",
            "short_side",
            "max_long_side",
            "device",
            "precision",
            "clip_weights",
            "backbone_weights",
            "text_encoder",
            "cache_features",
            "calibration",
            "priors",
            "extractor",
            "storage_options",
            "generalised_limit",
            "out",
        )
    },
    "--allow-missing-priors": (EvalConfig, "allow_missing_priors"),
    "--fusion": (EvalConfig, "fusions"),
    "--headline": (EvalConfig, "headline"),
    "--boundary-tolerance": (EvalConfig, "boundary_tolerance"),
    "--draw": (EvalConfig, "draw"),
    "--episodes": (ProtocolConfig, "episodes"),
    "--seed": (ProtocolConfig, "seed"),
    "--min-pixels": (ProtocolConfig, "min_pixels"),
    "--sampling": (ProtocolConfig, "sampling"),
    "--num-segments": (FusionConfig, "num_segments"),
    "--select-threshold": (FusionConfig, "select_threshold"),
    "--spectral-segments": (FusionConfig, "spectral_segments"),
    "--superpixels": (FusionConfig, "superpixels"),
    "--span-eigs": (FusionConfig, "num_eigs"),
}

RESOLVED = {
    # flag: why the CLI's default is not the config's
    ("sazs-priors", "--graph-backend"): "auto: batched on a GPU, certified on a CPU (compute.resolve_auto)",
    ("sazs-priors", "--solver"): "auto: batched on a GPU with CuPy, eigsh on a CPU (compute.resolve_auto)",
    ("sazs-train", "--crop-size"): "None: the dataset's (512; camvid 336), rounded down to the patch size",
    ("sazs-train", "--arch"): "auto: ViT-B-16 with --clip-weights, else imgfocus-vits14 when installed",
    ("sazs-train", "--text-encoder"): "auto: clip for an open_clip arch, all-MiniLM for a pipeline ViT",
    ("sazs-train", "--lr"): "None: the paper's per dataset, 1e-3 (voc) / 2e-4 (coco)",
    ("sazs-train", "--steps"): "None: --epochs 20, the paper's schedule, in steps for the dataset's size",
}

CLIS = {"sazs-priors": (priors_parser, PRIORS), "sazs-train": (train_parser, TRAIN), "sazs-eval": (eval_parser, EVAL)}


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings if opt.startswith("--")}


def _default(cls, name: str):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise AssertionError(f"{cls.__name__}.{name} has no default")


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_flag_defaults_are_the_configs(cli):
    build, mapping = CLIS[cli]
    flags = _flags(build())
    assert not set(mapping) - set(flags), f"{cli}: mapped flags that do not exist: {set(mapping) - set(flags)}"
    wrong = []
    for flag, (cls, name) in mapping.items():
        if (cli, flag) in RESOLVED:
            assert flags[flag].default in ("auto", None), f"{cli} {flag}: listed as resolved at run time"
            continue
        default = _default(cls, name)
        if isinstance(default, tuple) and isinstance(flags[flag].default, str):  # a comma-separated list flag
            default = ",".join(default)
        if flags[flag].default != default:
            wrong.append(f"{flag} = {flags[flag].default!r} but {cls.__name__}.{name} = {default!r}")
    assert not wrong, f"{cli}: flag defaults that disagree with their configs:\n" + "\n".join(wrong)


def test_the_check_sees_a_disagreement():
    parser = argparse.ArgumentParser()
    parser.add_argument("--knn", type=int, default=11)
    flags = _flags(parser)
    assert flags["--knn"].default != _default(GraphConfig, "k")


def test_one_flag_name_one_meaning():
    """--num-eigs is the eigenvectors a store computes; the other commands name what they do with them."""
    assert "--num-eigs" in _flags(priors_parser())
    assert "--num-eigs" not in _flags(train_parser()) and "--prior-eigs" in _flags(train_parser())
    assert "--num-eigs" not in _flags(eval_parser()) and "--span-eigs" in _flags(eval_parser())
