"""The training loop: optimiser, schedule, checkpoints, exact resume, metrics.

One optimiser step = ``accum_steps`` micro-batches of ``batch_size``. The learning rate
follows a poly schedule lr * (1 - step / steps) ** power after an optional linear warm-up,
stepped once per optimiser step. A checkpoint (``<out>/checkpoint.pt``, written and read by
:mod:`.checkpoint` only: tensors and plain values, never code) holds the trained weights,
optimiser, scheduler, step, every RNG state, the full config, the code version (package
version + git SHA), the CLIP weights' SHA-256 and whether they were random. ``resume``
restores all of it and restarts the data stream after the samples already consumed, so the
resumed run computes the very losses the uninterrupted one would.

Every ``log_every`` steps a line with ETA, iteration time, data time, throughput and peak
memory is logged and a JSON record appended to ``<out>/metrics.jsonl``; a non-finite loss
stops the run with the step and the loss terms (the last checkpoint stays untouched).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from sazs.pipeline.extractors import resolve_device
from sazs.stores.manifest import code_version

from .cache import FeatureCache, backbone_key
from .checkpoint import RESUME_KEYS, load_checkpoint, restore_training, rng_state, save_checkpoint
from .data import DataConfig, PriorSegDataset, build_loader
from .losses import LossConfig, compute_losses
from .model import RANDOM_WEIGHTS_WARNING, ModelConfig, build_model, output_stride

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the loss terms."""


class ResumeMismatchError(ValueError):
    """A checkpoint to resume was written with a setting that changes the numbers."""


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/train"
    steps: int = 20000  # optimiser steps
    epochs: float | None = None  # if set, steps = ceil(epochs * images / (batch_size * accum_steps))
    batch_size: int = 8
    accum_steps: int = 1
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1  # only with ModelConfig.finetune_backbone
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    warmup_steps: int = 0
    clip_grad: float | None = None
    checkpoint_every: int = 1000
    log_every: int = 20
    val_split: str | None = None  # quick validation split (e.g. val); None = none
    val_every: int = 0  # 0: only at the end
    val_limit: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    workers: int = 4
    tensorboard: bool = False
    progress: bool = True
    resume: str | None = None  # checkpoint path, or "auto" (<out>/checkpoint.pt when present)
    overwrite: bool = False  # start over in an out_dir that holds a checkpoint
    stop_at: int | None = None  # stop after this step (checkpoint written), as if interrupted
    save_backbone: bool = False  # also save a frozen backbone (self-contained checkpoint)
    feature_cache: str | None = None  # frozen backbone: cache its tokens per view here ("auto": ~/.cache/sazs)

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        for name in ("steps", "batch_size", "accum_steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        from .data import AugmentConfig

        data = dict(d["data"])
        data["augment"] = AugmentConfig(**data["augment"])
        return cls(
            data=DataConfig(**data),
            model=ModelConfig(**d["model"]),
            loss=LossConfig(**d["loss"]),
            train=TrainConfig(**d["train"]),
        )


# ----------------------------------------------------------------------------- helpers


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (peak RSS)


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


def _fmt_eta(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0, seconds))))


class Window:
    """Recent values of a metric: median over a window and global average (DINO's SmoothedValue)."""

    def __init__(self, size: int = 20):
        self.values: deque[float] = deque(maxlen=size)
        self.total, self.count = 0.0, 0

    def add(self, v: float) -> None:
        self.values.append(v)
        self.total += v
        self.count += 1

    @property
    def median(self) -> float:
        return float(np.median(self.values)) if self.values else float("nan")

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


# Settings a resumed run may change (where things are, how fast, how long it runs).
_RESUMABLE_CHANGES = (
    "train.out_dir",
    "train.resume",
    "train.overwrite",
    "train.stop_at",
    "train.workers",
    "train.progress",
    "train.tensorboard",
    "train.device",
    "train.log_every",
    "train.checkpoint_every",
    "train.val_every",
    "train.val_limit",
    "data.root",
    "data.priors",
    "data.storage_options",
    "train.feature_cache",
)


# ----------------------------------------------------------------------------- training


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns a summary dict (paths, last losses, validation)."""
    tc = cfg.train
    out = Path(tc.out_dir)
    ckpt_path = out / CHECKPOINT
    resume = tc.resume
    if resume == "auto":
        resume = str(ckpt_path) if ckpt_path.is_file() else None
    if resume is None and ckpt_path.is_file() and not tc.overwrite:
        raise FileExistsError(
            f"{out} already holds a training run ({ckpt_path}); pass --resume to continue it, "
            "--overwrite to start over, or choose another --out"
        )
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {resume}")
    # Read (and check) the checkpoint to resume before any work: a bad file fails at once.
    ckpt = load_checkpoint(resume, need=RESUME_KEYS) if resume is not None else None
    out.mkdir(parents=True, exist_ok=True)

    device = resolve_device(tc.device)
    precision = tc.precision if tc.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {tc.precision!r}")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else None
    version = code_version()
    log.info("sazs %s; device %s (%s); config:\n%s", version, device, precision, json.dumps(cfg.to_dict(), indent=1))

    # Data first: a wrong path or a store of another split fails before any model is built.
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
    split = dataset.split
    if tc.epochs:
        steps = max(1, math.ceil(tc.epochs * len(dataset) / (tc.batch_size * tc.accum_steps)))
        cfg = replace(cfg, train=replace(tc, steps=steps))
        tc = cfg.train
        log.info("%g epochs of %d images = %d steps", tc.epochs, len(dataset), steps)
    if cfg.data.priors and not cfg.loss.needs_priors:
        log.info("priors are not read: no loss term uses them (spectral and segment weights are 0)")

    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model, text = build_model(cfg.model, device)
    cache = None
    if tc.feature_cache:
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

    # The training classifier: background / "others" + seen classes only.
    train_names = split.train_names()
    leaked = set(train_names) & set(split.unseen_names())
    if leaked:  # cannot happen with the tables in splits.py; guards hand-made splits
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

    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(tc.steps, tc.poly_power, tc.warmup_steps))
    step = 0
    if ckpt is not None:
        changes = [d for d in _diff(ckpt["config"], cfg.to_dict()) if not d.startswith(_RESUMABLE_CHANGES)]
        if changes:
            raise ResumeMismatchError(
                f"cannot resume {resume} with a different setting "
                f"({'; '.join(changes[:6])}); use the same flags or start a new run (--out)"
            )
        step = restore_training(ckpt, resume, model, optimizer, scheduler)
        del ckpt
        log.info("resumed %s at step %d/%d", resume, step, tc.steps)
    (out / CONFIG).write_text(
        json.dumps(
            {"config": cfg.to_dict(), "code_version": version, "clip": model.info, "split": split.describe()}, indent=1
        )
    )

    header = {"random_weights": model.random_weights}
    metrics_path = out / METRICS
    if resume is None and metrics_path.exists():  # a fresh start (or --overwrite): no stale records
        metrics_path.unlink()
    tb = None
    if tc.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
        tb = SummaryWriter(str(out / "tb"))

    def record(rec: dict, extra: dict = header) -> None:
        with metrics_path.open("a") as f:  # one line per call: complete lines survive a crash
            f.write(json.dumps({**rec, **extra}) + "\n")
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(k, v, rec.get("step", step))

    def save() -> None:
        save_checkpoint(
            {
                "step": step,
                "model": model.checkpoint_state(include_backbone=tc.save_backbone or None),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "config": cfg.to_dict(),
                "code_version": version,
                "clip": model.info,
                "random_weights": model.random_weights,
                "warning": RANDOM_WEIGHTS_WARNING if model.random_weights else None,
                "backbone_digest": model.backbone_digest,
                "split": split.describe(),
                "train_names": list(train_names),
                "text_embeddings": text_emb.cpu(),
                "store_fingerprint": getattr(dataset, "store_fingerprint", None),
                "skipped_images": dataset.skipped,
                "torch_version": str(torch.__version__),
            },
            ckpt_path,
        )

    val_dataset = None
    if tc.val_split:
        from sazs.datasets.readers import DatasetConfig, build_dataset

        val_dataset = build_dataset(DatasetConfig(name=cfg.data.dataset, root=cfg.data.root, split=tc.val_split))

    def run_validation() -> dict:
        from .validate import validate

        t0 = time.perf_counter()
        res = validate(
            model, text, val_dataset, split, short_side=crop, device=device, limit=tc.val_limit, autocast=autocast
        )
        log.info(
            "validation %s (%d images, %.1fs): seen mIoU %.3f  unseen mIoU %.3f  hIoU %.3f  FB-IoU %.3f",
            tc.val_split,
            res["images"],
            time.perf_counter() - t0,
            res["seen_miou"],
            res["unseen_miou"],
            res["harmonic_miou"],
            res["fb_iou"],
        )
        record({"step": step, "val": res})
        return res

    record(
        {
            "event": "resume" if resume else "start",
            "step": step,
            "code_version": version,
            "clip": model.info,
            "random_weights": model.random_weights,
            "warning": RANDOM_WEIGHTS_WARNING if model.random_weights else None,
        },
        extra={},
    )
    per_step = tc.batch_size * tc.accum_steps
    loader = build_loader(
        dataset,
        batch_size=tc.batch_size,
        num_workers=tc.workers,
        start=step * per_step,
        pin_memory=device.type == "cuda",
        seed=tc.seed,
    )
    stop = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
    windows = {k: Window() for k in ("loss", "iter", "data")}
    summary: dict = {
        "out_dir": str(out),
        "checkpoint": str(ckpt_path),
        "metrics": str(out / METRICS),
        "random_weights": model.random_weights,
        "steps": tc.steps,
        "start_step": step,
    }
    last_terms: dict = {}
    val_res = None
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs keep the log lines only)
    bar = tqdm(
        total=stop, initial=step, disable=None if tc.progress else True, desc="train", unit="step", dynamic_ncols=True
    )
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    it = iter(loader)
    run_start = time.perf_counter()
    start_step = step
    # With a progress bar, log lines go through tqdm.write so that they do not break the bar.
    redirect = logging_redirect_tqdm() if tc.progress else contextlib.nullcontext()
    try:
        with redirect:
            while step < stop:
                t_iter = time.perf_counter()
                data_time = 0.0
                optimizer.zero_grad(set_to_none=True)
                sums: dict[str, float] = {}
                for _ in range(tc.accum_steps):
                    t_data = time.perf_counter()
                    batch = to_device(next(it), device)
                    data_time += time.perf_counter() - t_data
                    tokens = cache.tokens(model, batch["image"], batch["view"]) if cache is not None else None
                    terms = forward_losses(model, batch, text_emb, cfg.loss, autocast, tokens)
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    if not all(math.isfinite(v) for v in values.values()):
                        msg = (
                            f"non-finite loss at step {step + 1}: "
                            + ", ".join(f"{k}={v}" for k, v in values.items())
                            + f"; lr {scheduler.get_last_lr()[0]:.3g}. Stopping. The last checkpoint "
                            f"({ckpt_path if ckpt_path.is_file() else 'none yet'}) is untouched; lower --lr, "
                            "set --clip-grad, or check the data"
                        )
                        record({"step": step + 1, "event": "non_finite_loss", **{k: str(v) for k, v in values.items()}})
                        raise NonFiniteLossError(msg)
                    (terms["loss"] / tc.accum_steps).backward()
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + v / tc.accum_steps
                if tc.clip_grad:
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, tc.clip_grad)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update(1)
                iter_time = time.perf_counter() - t_iter
                windows["loss"].add(sums["loss"])
                windows["iter"].add(iter_time)
                windows["data"].add(data_time)
                last_terms = sums
                eta = windows["iter"].avg * (stop - step)  # global average, as DINO: robust to one slow window
                if step % tc.log_every == 0 or step == stop:
                    mem = peak_memory_mb(device)
                    rec = {
                        "step": step,
                        "epoch": step * per_step / len(dataset),
                        "lr": lr,
                        **sums,
                        "iter_time": iter_time,
                        "data_time": data_time,
                        "images_per_s": per_step / iter_time,
                        "peak_mem_mb": mem,
                        "eta_s": eta,
                    }
                    record(rec)
                    terms_txt = "  ".join(f"{k} {v:.4f}" for k, v in sums.items() if k != "loss")
                    log.info(
                        "step %d/%d  eta %s  loss %.4f (%.4f)  %s  lr %.2e  iter %.3fs (avg %.3fs)  "
                        "data %.3fs (%.0f%%)  %.1f img/s  max mem %.0f MB",
                        step,
                        stop,
                        _fmt_eta(eta),
                        sums["loss"],
                        windows["loss"].avg,
                        terms_txt,
                        lr,
                        windows["iter"].median,
                        windows["iter"].avg,
                        windows["data"].median,
                        100 * windows["data"].median / max(windows["iter"].median, 1e-9),
                        per_step / max(windows["iter"].median, 1e-9),
                        mem,
                    )
                    bar.set_postfix(
                        loss=f"{windows['loss'].median:.3f}", data=f"{windows['data'].median:.3f}s", mem=f"{mem:.0f}MB"
                    )
                if step % tc.checkpoint_every == 0 or step == stop:
                    save()
                if val_dataset is not None and tc.val_every and step % tc.val_every == 0 and step != stop:
                    run_validation()
    finally:
        bar.close()
        if tb is not None:
            tb.flush()
        if step > start_step:
            elapsed = time.perf_counter() - run_start
            log.info("%d steps in %s (%.3fs/step)", step - start_step, _fmt_eta(elapsed), elapsed / (step - start_step))
    if val_dataset is not None and step == tc.steps:
        val_res = run_validation()
    if tb is not None:
        tb.close()
    if model.random_weights:
        log.warning(RANDOM_WEIGHTS_WARNING)
    summary.update(
        step=step,
        finished=step >= tc.steps,
        last=last_terms,
        val=val_res,
        peak_mem_mb=peak_memory_mb(device),
        feature_cache=None if cache is None else {"dir": str(cache.dir), "hits": cache.hits, "misses": cache.misses},
    )
    return summary
