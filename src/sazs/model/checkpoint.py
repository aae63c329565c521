"""Training checkpoints: the one place that writes, reads and checks a ``checkpoint.pt``.

A checkpoint is shared between people exactly like a prior store, so reading one must never
run code. It therefore holds tensors and plain containers only (dicts, lists, tuples,
strings, numbers, booleans, None) and is read with ``torch.load(weights_only=True)``, which
refuses any pickled object. :func:`save_checkpoint` checks that before writing, so a run
never leaves a checkpoint it could not resume from. The RNG states, which Python and NumPy
return as objects, are stored as tensors and plain values (:func:`rng_state`).

:func:`save_training` writes a run's ``<out>/checkpoint.pt``: weights, optimiser, scheduler,
step, every RNG state, the config, the code version and the provenance of the encoders.
:func:`resume_path` decides which checkpoint a run continues from, :func:`check_resumable`
refuses one written with a setting that changes the numbers, and :func:`restore_training`
puts its state back, so the resumed run computes the very losses the uninterrupted one would.

:func:`load_checkpoint` is what every entry point reads a checkpoint with (``sazs-train run
--resume``, ``sazs-eval run`` and ``sazs-eval predict``): a file that is missing, truncated,
not a sazs-train checkpoint (e.g. a bare state dict) or that holds pickled objects (e.g.
one written by an older sazs-train, which pickled NumPy's RNG state) fails with a
:class:`CheckpointError` naming the file and the fix. :func:`restore_model` does the same
for weights that do not fit the model their config describes, and
:func:`load_for_inference` rebuilds the model of a checkpoint.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from sazs.core import limits
from sazs.core.devices import resolve_device
from sazs.core.files import atomic_file
from sazs.core.torchfiles import TorchFileError, load_torch_file

from .encoders import RANDOM_WEIGHTS_WARNING
from .model import ModelConfig, build_model

CHECKPOINT = "checkpoint.pt"  # in the run directory
# What a checkpoint must hold to rebuild its model, and to continue its training.
INFERENCE_KEYS = ("config", "model")
RESUME_KEYS = (*INFERENCE_KEYS, "step", "optimizer", "scheduler", "rng")
# Exact types: subclasses (numpy floats, torch's TorchVersion string) pickle as objects.
_PLAIN = {str, int, float, bool, type(None), torch.Size}


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


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what to do instead."""


class ResumeMismatchError(ValueError):
    """A checkpoint to resume was written with a setting that changes the numbers."""


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """Every RNG state the training draws from, as tensors and plain values (no pickled objects)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured, exactly."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- writing


def _not_plain(obj, where: str = "checkpoint") -> str | None:
    """Where ``obj`` holds something ``weights_only`` loading would refuse, or None."""
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            bad = _not_plain(k, f"{where} key") or _not_plain(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if type(obj) in (list, tuple):
        return next((bad for i, v in enumerate(obj) if (bad := _not_plain(v, f"{where}[{i}]"))), None)
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor):
        return None
    return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> None:
    """Write ``ckpt`` atomically (a crash leaves the previous checkpoint); tensors and plain values only."""
    bad = _not_plain(ckpt)
    if bad:  # a bug in the trainer, not a user error: the checkpoint could not be loaded back
        raise TypeError(
            f"refusing to save a checkpoint holding a Python object at {bad}: "
            "checkpoints hold tensors and plain containers only"
        )
    with atomic_file(path) as f:
        torch.save(ckpt, f)


def save_training(
    path: str | os.PathLike,
    step: int,
    model,
    optimizer,
    scheduler,
    *,
    config: dict,
    code_version: str,
    split,
    train_names,
    text_embeddings: torch.Tensor,
    dataset,
    save_backbone: bool,
) -> None:
    """The checkpoint of a run at ``step``: what resumes it exactly, and its provenance."""
    save_checkpoint(
        {
            "step": step,
            "model": model.checkpoint_state(include_backbone=save_backbone or None),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "config": config,
            "code_version": code_version,
            "clip": model.info,
            "random_weights": model.random_weights,
            "warning": RANDOM_WEIGHTS_WARNING if model.random_weights else None,
            "backbone_digest": model.backbone_digest,
            "split": split.describe(),
            "train_names": list(train_names),
            "text_embeddings": text_embeddings.cpu(),
            "store_fingerprint": getattr(dataset, "store_fingerprint", None),
            "skipped_images": dataset.skipped,
            "torch_version": str(torch.__version__),
        },
        path,
    )


# ----------------------------------------------------------------------------- reading


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def load_checkpoint(path: str | os.PathLike, *, need: tuple[str, ...] = INFERENCE_KEYS) -> dict:
    """Read a sazs-train checkpoint without running any code in it, and check it holds ``need``.

    Raises :class:`CheckpointError` (one line: the file and the fix) for a file that is
    truncated or not a checkpoint, holds pickled objects, or lacks what ``need`` names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `make train` / sazs-train")
    try:
        ckpt = load_torch_file(path, f"checkpoint {path}")
    except TorchFileError as exc:
        raise CheckpointError(str(exc)) from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a refused object: a damaged pickle
            raise CheckpointError(
                f"cannot read checkpoint {path}: {_first_line(exc)}; the file is damaged or not "
                "a checkpoint: copy it again or pass the checkpoint.pt sazs-train wrote"
            ) from None
        raise CheckpointError(
            f"refusing checkpoint {path}: it holds a pickled Python object ({found.group(1)}) and loading it could "
            "run code; sazs reads checkpoints as tensors and plain values only. A checkpoint written by an older "
            "sazs-train (which pickled NumPy's RNG state) is refused too: train it again with this version"
        ) from None
    except (RuntimeError, EOFError, KeyError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or not a torch checkpoint "
            f"({_first_line(exc) or 'empty'}); copy it again or pass the checkpoint.pt "
            "sazs-train wrote"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, not a sazs-train checkpoint (a dict with the "
            "weights and the run's config); pass the checkpoint.pt sazs-train wrote"
        )
    missing = [k for k in need if k not in ckpt]
    if missing:
        if "config" in missing and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise CheckpointError(
                f"{path} is a bare state dict ({len(ckpt)} tensors) without the training config "
                "needed to rebuild the model; pass the checkpoint.pt sazs-train wrote, which "
                "holds both"
            )
        raise CheckpointError(
            f"{path} is not a complete sazs-train checkpoint (no {', '.join(missing)}); pass the "
            "checkpoint.pt sazs-train wrote"
        )
    config = ckpt.get("config")
    sections = ("data", "model", "loss", "train")
    if "config" in need and not (
        isinstance(config, dict)
        and all(isinstance(config.get(k), dict) for k in sections)
        and isinstance(config["data"].get("augment"), dict)
    ):
        raise CheckpointError(
            f"{path}: its 'config' is not a sazs-train run config (sections {', '.join(sections)}); "
            "pass the checkpoint.pt sazs-train wrote"
        )
    if "config" in need:
        check_config(config, path)
    weights = ckpt.get("model")
    if "model" in need and not (
        isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())
    ):
        raise CheckpointError(
            f"{path}: its 'model' is not a state dict of tensors; pass the checkpoint.pt sazs-train wrote"
        )
    return ckpt


def _int_in(lo: int, hi: int):
    return lambda v: type(v) is int and lo <= v <= hi


def _name(v) -> bool:  # a registry or package name: never a path, never huge
    return type(v) is str and 0 < len(v) <= 200 and not any(c in v for c in "/\\~\0") and not v.startswith(".")


# (section, field, default, check, what it must be): the values of a checkpoint's config that
# rebuild its model. A checkpoint is someone else's file: each is checked before it sizes
# anything (limits in core/limits.py).
_FIELDS = (
    ("model", "arch", None, _name, "an architecture name"),
    ("model", "text_encoder", "clip", lambda v: type(v) is str and 0 < len(v) <= 4096, "a text encoder"),
    ("model", "templates", "seg", _name, "a template set name"),
    ("model", "head_dim", 256, _int_in(1, limits.MAX_HEAD_DIM), f"an integer in 1..{limits.MAX_HEAD_DIM}"),
    ("model", "upsample", 2, _int_in(1, 64), "an integer in 1..64"),
    ("model", "init_temperature", 1 / 0.07, lambda v: type(v) is float and 0 < v <= 1e4, "a number in (0, 1e4]"),
    ("model", "finetune_backbone", False, lambda v: type(v) is bool, "true or false"),
    ("model", "boundary_head", False, lambda v: type(v) is bool, "true or false"),
    ("model", "clip_weights", None, lambda v: v is None or type(v) is str, "a file name or None"),
    ("model", "backbone_weights", None, lambda v: v is None or type(v) is str, "a file name or None"),
    ("augment", "crop_size", None, _int_in(1, limits.MAX_INPUT_SIDE), f"an integer in 1..{limits.MAX_INPUT_SIDE}"),
    ("data", "dataset", None, _name, "a dataset name"),
    ("train", "seed", 0, _int_in(-(2**63), 2**63 - 1), "a 64-bit integer"),
)
# Files a checkpoint's config names, opened only when given on the command line (the flag).
_WEIGHT_FLAGS = {"clip_weights": "--clip-weights", "backbone_weights": "--backbone-weights"}


def check_config(config: dict, path: str | os.PathLike) -> None:
    """CheckpointError naming the file and the field for a config value sazs-train never writes."""
    sections = {**config, "augment": config["data"]["augment"]}
    for section, field, default, ok, what in _FIELDS:
        value = sections[section].get(field, default)
        if not ok(value):
            where = "data.augment" if section == "augment" else section
            raise CheckpointError(
                f"{path}: its config's {where}.{field} = {_short(value)} is not {what}; the file was edited "
                "or damaged: pass the checkpoint.pt sazs-train wrote (bounds: $SAZS_MAX_* in core/limits.py)"
            )


def _short(value) -> str:
    if type(value) is int and abs(value) > 10**12:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value) if isinstance(value, int | float | str | bool | type(None)) else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def model_config(ckpt: dict, path: str | os.PathLike, files: dict[str, str | None] | None = None) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with, its weight files those of the command line.

    ``files`` maps clip_weights / backbone_weights / text_encoder to what the command line
    gave (None: not given). A checkpoint never chooses a local file to open: a weights file
    or a text-encoder folder its config names must be passed again (CheckpointError otherwise).
    """
    cfg = dict(ckpt["config"]["model"])
    files = files or {}
    for key, flag in _WEIGHT_FLAGS.items():
        if cfg.get(key) and not files.get(key):
            raise CheckpointError(
                f"{path} was trained with {flag} {_short(Path(cfg[key]).name)}: pass that file again with "
                f"{flag} PATH (sazs never opens a file a checkpoint names)"
            )
        cfg[key] = files.get(key) or None
    text = cfg.get("text_encoder", "clip")
    if files.get("text_encoder"):
        cfg["text_encoder"] = files["text_encoder"]
    elif not _name(text) or (text != "clip" and Path(text).is_dir()):
        raise CheckpointError(
            f"{path} was trained with the text encoder folder {_short(text)}: pass it again with "
            "--text-encoder DIR (sazs never opens a folder a checkpoint names)"
        )
    try:
        return ModelConfig(**cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: its model config does not fit this version of sazs ({_first_line(exc)}); "
            "train it again, or evaluate it with the sazs version that wrote it"
        ) from None


def restore_model(model, ckpt: dict, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights into ``model``; weights of another architecture fail naming the file."""
    try:
        model.load_checkpoint_state(ckpt["model"], ckpt.get("backbone_digest"))
    except (RuntimeError, ValueError) as exc:  # load_state_dict: size mismatch (RuntimeError); missing keys
        arch = ckpt["config"]["model"].get("arch")
        raise CheckpointError(
            f"{path}: its weights do not fit the {arch} model its config describes "
            f"({_first_line(exc)}); the file was edited or mixes two runs: pass the "
            "checkpoint.pt sazs-train wrote"
        ) from None


def resume_path(out: Path, resume: str | None, overwrite: bool) -> str | None:
    """The checkpoint a run in ``out`` continues from, or None for a fresh start.

    ``resume``: a checkpoint path, "auto" (``<out>/checkpoint.pt`` when present) or None. A
    fresh start in a directory that holds a run needs ``overwrite``.
    """
    ckpt_path = out / CHECKPOINT
    if resume == "auto":
        resume = str(ckpt_path) if ckpt_path.is_file() else None
    if resume is None and ckpt_path.is_file() and not overwrite:
        raise FileExistsError(
            f"{out} already holds a training run ({ckpt_path}); pass --resume to continue it, "
            "--overwrite to start over, or choose another --out"
        )
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {resume}")
    return resume


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def check_resumable(ckpt: dict, config: dict, path: str | os.PathLike) -> None:
    """Refuse to resume ``ckpt`` with a ``config`` that changes the numbers (ResumeMismatchError)."""
    changes = [d for d in _diff(ckpt["config"], config) if not d.startswith(_RESUMABLE_CHANGES)]
    if changes:
        raise ResumeMismatchError(
            f"cannot resume {path} with a different setting "
            f"({'; '.join(changes[:6])}); use the same flags or start a new run (--out)"
        )


def restore_training(ckpt: dict, path: str | os.PathLike, model, optimizer, scheduler) -> int:
    """Weights, optimiser, schedule and RNG states of a checkpoint to resume; returns its step."""
    restore_model(model, ckpt, path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"cannot resume {path}: its optimiser, schedule or RNG state does not fit this run "
            f"({_first_line(exc)}); start a new run (--out, or --overwrite)"
        ) from None
    return step


def load_for_inference(path: str | os.PathLike, device: str = "auto", files: dict[str, str | None] | None = None):
    """(model, text classifier, checkpoint dict) rebuilt from a training checkpoint.

    ``files``: the weight files of the command line (see :func:`model_config`).
    """
    dev = resolve_device(device)
    ckpt = load_checkpoint(path)
    cfg = model_config(ckpt, path, files)
    seed = ckpt["config"].get("train", {}).get("seed", 0)
    torch.manual_seed(int(seed))  # a random frozen backbone is recreated from the run's seed
    try:
        model, text = build_model(cfg, dev)
    except ValueError as exc:  # e.g. an architecture this version does not know
        raise CheckpointError(f"{path}: {_first_line(exc, 300)}") from None
    trained, given = (ckpt.get("clip") or {}).get("weights_sha256"), model.info.get("weights_sha256")
    if trained and given and trained != given:  # another file than the one it was trained with
        raise CheckpointError(
            f"{path} was trained with weights of SHA-256 {trained[:12]}..., the file passed has "
            f"{given[:12]}...: pass the weights file it was trained with"
        )
    restore_model(model, ckpt, path)
    model.eval()
    return model, text, ckpt
