"""`sazs-eval demo` (what `make eval` does): the `make train` demo's checkpoint on the synthetic VOC val split.

:func:`run_demo` trains the demo first when its checkpoint is missing (through `sazs-train demo`),
computes the validation priors with the training demo's settings (through `sazs-priors run`),
and evaluates the checkpoint's fold with the default `sazs-eval run` options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sazs.model.checkpoint import load_checkpoint
from sazs.train import cli as train_cli
from sazs.train.demo import DEMO_DATA, DEMO_OUT, demo_priors, prepare_demo_data

from .options import get_args_parser, run_config
from .run import run_eval

log = logging.getLogger("sazs.eval")

DEMO_EPISODES = 50
DEMO_VAL_PRIORS = "priors/synth-voc-demo-val-color.zarr"


class DemoError(RuntimeError):
    """A step of the demo (training it, computing its priors) failed; the message says which."""


@dataclass(frozen=True)
class DemoConfig:
    run: str = DEMO_OUT  # demo run directory (trained if its checkpoint is missing)
    priors: str = DEMO_VAL_PRIORS  # validation prior store
    episodes: int = DEMO_EPISODES
    out: str | None = None  # report directory; None: <run>/eval
    draw: int = 6
    steps: int | None = None  # training steps, architecture, CLIP weights if the demo must be trained
    arch: str | None = None
    clip_weights: str | None = None
    device: str = "auto"
    progress: bool = True


def run_demo(cfg: DemoConfig) -> dict:
    """Train the demo if needed, compute its validation priors, evaluate it; return the report."""
    run = Path(cfg.run)
    ckpt = run / "checkpoint.pt"
    if not ckpt.is_file():
        log.info("no demo checkpoint at %s: running the training demo first (what `make train` does)", ckpt)
        argv = ["demo", "--out", str(run), "--device", cfg.device]
        for flag, value in (("--steps", cfg.steps), ("--arch", cfg.arch), ("--clip-weights", cfg.clip_weights)):
            argv += [flag, str(value)] if value else []
        argv += [] if cfg.progress else ["--no-progress"]
        rc = train_cli.main(argv)
        if rc != 0:
            raise DemoError(f"the training demo failed (sazs-train exit code {rc})")
    voc = Path(DEMO_DATA) / "VOCdevkit" / "VOC2012"
    if not (voc / "ImageSets" / "Segmentation" / "val.txt").is_file():
        prepare_demo_data(progress=cfg.progress)
    demo_priors(str(voc), "val", cfg.priors, progress=cfg.progress)  # the training demo's settings
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
            cfg.priors,
            "--episodes",
            str(cfg.episodes),
            "--out",
            cfg.out or str(run / "eval"),
            "--device",
            cfg.device,
            "--draw",
            str(cfg.draw),
        ]
        + ([] if cfg.progress else ["--no-progress"])
        + (["--clip-weights", cfg.clip_weights] if cfg.clip_weights else [])
    )
    return run_eval(run_config(run_args))
