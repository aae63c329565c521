"""The training loop: one run, from its config to its last checkpoint.

One optimiser step = ``accum_steps`` micro-batches of ``batch_size``. The learning rate
follows a poly schedule lr * (1 - step / steps) ** power after an optional linear warm-up,
stepped once per optimiser step. Every ``checkpoint_every`` steps :mod:`.checkpoint` writes
``<out>/checkpoint.pt``, from which ``resume`` continues exactly: the data stream restarts
after the samples already consumed, so the resumed run computes the very losses the
uninterrupted one would.

Every ``log_every`` steps :mod:`.metrics_log` logs a line (ETA, iteration and data time,
throughput, peak memory) and appends a JSON record to ``<out>/metrics.jsonl``; a non-finite
loss stops the run with the step and the loss terms (the last checkpoint stays untouched).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sazs.core.devices import resolve_device, resolve_precision
from sazs.datasets.base import DatasetConfig
from sazs.datasets.registry import build_dataset
from sazs.model.cache import FeatureCache, backbone_key
from sazs.model.checkpoint import (
    CHECKPOINT,
    RESUME_KEYS,
    check_resumable,
    load_checkpoint,
    restore_training,
    resume_path,
    save_training,
)
from sazs.model.encoders import RANDOM_WEIGHTS_WARNING
from sazs.model.model import SegmentationModel, build_model, output_stride
from sazs.model.text import TextClassifier
from sazs.stores.manifest import code_version

from .config import RunConfig, TrainConfig
from .data import PriorSegDataset, build_loader
from .losses import LossConfig, compute_losses
from .metrics_log import MetricLogger, fmt_eta, peak_memory_mb
from .validate import validate

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CONFIG = "config.json"
TRAIN_PRECISIONS = ("fp32", "bf16")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the loss terms."""


# ----------------------------------------------------------------------------- parts of a step


def poly_lambda(steps: int, power: float, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1 - step / steps) ** power

    return f


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_losses(
    model, batch: dict, text_emb: torch.Tensor, loss_cfg: LossConfig, autocast=None, tokens: torch.Tensor | None = None
) -> dict:
    """Forward pass (under ``autocast`` when given) and the loss terms, computed in float32.

    ``tokens``: the frozen backbone's tokens of the batch, from the feature cache.
    """
    with autocast() if autocast else contextlib.nullcontext():
        outputs = model(batch["image"], text_emb, tokens=tokens)
    return compute_losses(outputs, batch, loss_cfg)


# ----------------------------------------------------------------------------- building a run


@dataclass
class _Run:
    """A run's parts, built once: what its steps, checkpoints and validations share."""

    cfg: RunConfig
    out: Path
    device: torch.device
    autocast: Callable | None
    version: str
    dataset: PriorSegDataset
    model: SegmentationModel
    text: TextClassifier
    train_names: tuple[str, ...]
    text_emb: torch.Tensor
    cache: FeatureCache | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT


def _autocast(precision: str, device: torch.device) -> tuple[str, Callable | None]:
    """(resolved precision, autocast context factory or None) for training on ``device``."""
    resolved = resolve_precision(precision, device)
    if resolved not in TRAIN_PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if resolved == "bf16":
        return resolved, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return resolved, None


def _training_data(cfg: RunConfig) -> tuple[RunConfig, PriorSegDataset]:
    """The training set, and ``cfg`` with its prior stride and the steps of ``epochs`` filled in.

    Data first: a wrong path or a store of another split fails before any model is built.
    """
    stride = output_stride(cfg.model)
    crop = cfg.data.augment.crop_size
    patch = stride * cfg.model.upsample
    if crop % patch:
        raise ValueError(f"crop size {crop} must be a multiple of the patch size {patch} of {cfg.model.arch}")
    if cfg.loss.needs_priors and not cfg.data.priors:
        raise ValueError(
            "the spectral / eigen-segment loss needs priors: pass a prior store (--priors, PRIORS=) "
            "or set --spectral-weight 0 --segment-weight 0"
        )
    cfg = replace(cfg, data=replace(cfg.data, prior_stride=stride))
    dataset = PriorSegDataset(cfg.data, with_priors=cfg.loss.needs_priors)
    tc = cfg.train
    if tc.epochs:
        steps = max(1, math.ceil(tc.epochs * len(dataset) / (tc.batch_size * tc.accum_steps)))
        cfg = replace(cfg, train=replace(tc, steps=steps))
        log.info("%g epochs of %d images = %d steps", tc.epochs, len(dataset), steps)
    if cfg.data.priors and not cfg.loss.needs_priors:
        log.info("priors are not read: no loss term uses them (spectral and segment weights are 0)")
    return cfg, dataset


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _feature_cache(cfg: RunConfig, model: SegmentationModel) -> FeatureCache | None:
    tc = cfg.train
    if not tc.feature_cache:
        return None
    if cfg.model.finetune_backbone:
        raise ValueError(
            "--cache-features needs a frozen backbone (a fine-tuned one changes every step); "
            "drop --finetune-backbone or --cache-features"
        )
    if not cfg.data.views:
        raise ValueError(
            "--cache-features needs fixed views per image (--views N): a fresh random view "
            "every epoch is never seen twice"
        )
    cache = FeatureCache(None if tc.feature_cache == "auto" else tc.feature_cache, backbone_key(model))
    log.info("feature cache %s (%d fixed views per image)", cache.dir, cfg.data.views)
    return cache


def _training_classifier(split, text: TextClassifier, device: torch.device) -> tuple[tuple[str, ...], torch.Tensor]:
    """The training classes (background / "others" + seen classes only) and their text embeddings."""
    train_names = split.train_names()
    leaked = set(train_names) & set(split.unseen_names())
    if leaked:  # cannot happen with the zero-shot tables; guards hand-made splits
        raise ValueError(f"unseen class names in the training classifier: {sorted(leaked)}")
    text_emb = text(train_names).to(device)
    log.info(
        "%s fold %s: training on %d classes %s; held out %s",
        split.benchmark,
        split.fold,
        len(train_names),
        list(train_names),
        list(split.unseen_names()),
    )
    return train_names, text_emb


def _build_run(cfg: RunConfig, out: Path) -> _Run:
    tc = cfg.train
    device = resolve_device(tc.device)
    precision, autocast = _autocast(tc.precision, device)
    version = code_version()
    log.info("sazs %s; device %s (%s); config:\n%s", version, device, precision, json.dumps(cfg.to_dict(), indent=1))
    cfg, dataset = _training_data(cfg)
    tc = cfg.train
    _seed_everything(tc.seed)
    model, text = build_model(cfg.model, device)
    cache = _feature_cache(cfg, model)
    train_names, text_emb = _training_classifier(dataset.split, text, device)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(tc.steps, tc.poly_power, tc.warmup_steps))
    return _Run(
        cfg, out, device, autocast, version, dataset, model, text, train_names, text_emb, cache, optimizer, scheduler
    )


# ----------------------------------------------------------------------------- running it


def _save(run: _Run, step: int) -> None:
    """The run's checkpoint at ``step``; NonFiniteLossError instead when a weight is NaN or infinite.

    The loss of a step is checked before its update, so the last update (e.g. with a NaN
    learning rate) can still break the weights: a checkpoint is never written from them.
    """
    bad = [n for n, p in run.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteLossError(
            f"non-finite weights after step {step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; lr "
            f"{run.scheduler.get_last_lr()[0]:.3g}). Stopping. The last checkpoint "
            f"({run.ckpt_path if run.ckpt_path.is_file() else 'none yet'}) is untouched; lower --lr, "
            "set --clip-grad, or check the data"
        )
    save_training(
        run.ckpt_path,
        step,
        run.model,
        run.optimizer,
        run.scheduler,
        config=run.cfg.to_dict(),
        code_version=run.version,
        split=run.dataset.split,
        train_names=run.train_names,
        text_embeddings=run.text_emb,
        dataset=run.dataset,
        save_backbone=run.cfg.train.save_backbone,
    )


def _validate(run: _Run, val_dataset, step: int, metrics: MetricLogger) -> dict:
    tc = run.cfg.train
    t0 = time.perf_counter()
    res = validate(
        run.model,
        run.text,
        val_dataset,
        run.dataset.split,
        short_side=run.cfg.data.augment.crop_size,
        device=run.device,
        limit=tc.val_limit,
        autocast=run.autocast,
    )
    metrics.log_validation(step, tc.val_split, res, time.perf_counter() - t0)
    return res


def _optimiser_step(run: _Run, batches: Iterator[dict], step: int, metrics: MetricLogger) -> tuple[dict, float, float]:
    """One optimiser step (step ``step + 1``): (loss terms averaged over micro-batches, lr, data time)."""
    tc = run.cfg.train
    data_time = 0.0
    run.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for _ in range(tc.accum_steps):
        t_data = time.perf_counter()
        batch = to_device(next(batches), run.device)
        data_time += time.perf_counter() - t_data
        tokens = run.cache.tokens(run.model, batch["image"], batch["view"]) if run.cache is not None else None
        terms = forward_losses(run.model, batch, run.text_emb, run.cfg.loss, run.autocast, tokens)
        values = {k: float(v.detach()) for k, v in terms.items()}
        if not all(math.isfinite(v) for v in values.values()):
            metrics.record({"step": step + 1, "event": "non_finite_loss", **{k: str(v) for k, v in values.items()}})
            raise NonFiniteLossError(
                f"non-finite loss at step {step + 1}: "
                + ", ".join(f"{k}={v}" for k, v in values.items())
                + f"; lr {run.scheduler.get_last_lr()[0]:.3g}. Stopping. The last checkpoint "
                f"({run.ckpt_path if run.ckpt_path.is_file() else 'none yet'}) is untouched; lower --lr, "
                "set --clip-grad, or check the data"
            )
        (terms["loss"] / tc.accum_steps).backward()
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v / tc.accum_steps
    if tc.clip_grad:
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, tc.clip_grad)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    return sums, lr, data_time


def _train_steps(run: _Run, step: int, stop: int, metrics: MetricLogger, val_dataset) -> tuple[int, dict]:
    """Steps ``step + 1 .. stop``, with their logs, checkpoints and validations: (last step, last terms)."""
    tc = run.cfg.train
    per_step = tc.batch_size * tc.accum_steps
    loader = build_loader(
        run.dataset,
        batch_size=tc.batch_size,
        num_workers=tc.workers,
        start=step * per_step,
        pin_memory=run.device.type == "cuda",
        seed=tc.seed,
    )
    last_terms: dict = {}
    run.model.train()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    batches = iter(loader)
    run_start, start_step = time.perf_counter(), step
    try:
        with metrics.progress(step, tc.progress):
            while step < stop:
                t_iter = time.perf_counter()
                last_terms, lr, data_time = _optimiser_step(run, batches, step, metrics)
                step += 1
                iter_time = time.perf_counter() - t_iter
                eta = metrics.step_done(step, last_terms["loss"], iter_time, data_time)
                if step % tc.log_every == 0 or step == stop:
                    metrics.log_step(
                        step=step,
                        epoch=step * per_step / len(run.dataset),
                        lr=lr,
                        terms=last_terms,
                        iter_time=iter_time,
                        data_time=data_time,
                        images=per_step,
                        eta=eta,
                        device=run.device,
                    )
                if step % tc.checkpoint_every == 0 or step == stop:
                    _save(run, step)
                if val_dataset is not None and tc.val_every and step % tc.val_every == 0 and step != stop:
                    _validate(run, val_dataset, step, metrics)
    finally:
        if step > start_step:
            elapsed = time.perf_counter() - run_start
            log.info("%d steps in %s (%.3fs/step)", step - start_step, fmt_eta(elapsed), elapsed / (step - start_step))
    return step, last_terms


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns a summary dict (paths, last losses, validation)."""
    out = Path(cfg.train.out_dir)
    resume = resume_path(out, cfg.train.resume, cfg.train.overwrite)
    # Read (and check) the checkpoint to resume before any work: a bad file fails at once.
    ckpt = load_checkpoint(resume, need=RESUME_KEYS) if resume is not None else None
    out.mkdir(parents=True, exist_ok=True)

    run = _build_run(cfg, out)
    cfg, tc, model = run.cfg, run.cfg.train, run.model
    step = 0
    if ckpt is not None:
        check_resumable(ckpt, cfg.to_dict(), resume)
        step = restore_training(ckpt, resume, model, run.optimizer, run.scheduler)
        ckpt = None
        log.info("resumed %s at step %d/%d", resume, step, tc.steps)
    split = run.dataset.split
    (out / CONFIG).write_text(
        json.dumps(
            {"config": cfg.to_dict(), "code_version": run.version, "clip": model.info, "split": split.describe()},
            indent=1,
        )
    )

    stop = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
    metrics = MetricLogger(
        out / METRICS,
        {"random_weights": model.random_weights},
        fresh=resume is None,  # a fresh start (or --overwrite): no stale records
        tensorboard=out / "tb" if tc.tensorboard else None,
        total=stop,
    )
    val_dataset = None
    if tc.val_split:
        val_dataset = build_dataset(DatasetConfig(name=cfg.data.dataset, root=cfg.data.root, split=tc.val_split))
    metrics.record(
        {
            "event": "resume" if resume else "start",
            "step": step,
            "code_version": run.version,
            "clip": model.info,
            "random_weights": model.random_weights,
            "warning": RANDOM_WEIGHTS_WARNING if model.random_weights else None,
        },
        with_header=False,
    )
    summary: dict = {
        "out_dir": str(out),
        "checkpoint": str(run.ckpt_path),
        "metrics": str(out / METRICS),
        "random_weights": model.random_weights,
        "steps": tc.steps,
        "start_step": step,
    }
    step, last_terms = _train_steps(run, step, stop, metrics, val_dataset)
    val_res = _validate(run, val_dataset, step, metrics) if val_dataset is not None and step == tc.steps else None
    metrics.close()
    if model.random_weights:
        log.warning(RANDOM_WEIGHTS_WARNING)
    cache = run.cache
    summary.update(
        step=step,
        finished=step >= tc.steps,
        last=last_terms,
        val=val_res,
        peak_mem_mb=peak_memory_mb(run.device),
        feature_cache=None if cache is None else {"dir": str(cache.dir), "hits": cache.hits, "misses": cache.misses},
    )
    return summary
