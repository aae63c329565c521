"""The run's frozen configuration: :class:`TrainConfig` (optimisation and the run itself) and
:class:`RunConfig` (data, model, losses and training together), saved whole in every checkpoint.

``sazs-train`` builds a RunConfig once from its arguments (:func:`sazs.train.cli.build_config`);
a checkpoint holds it as :meth:`RunConfig.to_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sazs.model.model import ModelConfig

from .data import DataConfig
from .losses import LossConfig


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/train"
    steps: int = 20000  # optimiser steps
    epochs: float | None = None  # if set, steps = ceil(epochs * images / (batch_size * accum_steps))
    batch_size: int = 6
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
