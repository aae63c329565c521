"""Scoring a model on the protocols: episodes (binary, per fold) and the generalised setting.

The model is anything with ``background`` (the checkpoint's background word: "background" or
"others") and ``logits(image, names) -> (C, H, W)`` at the image's size, where the logit of a
class depends on that class alone (a cosine classifier; :class:`sazs.eval.predict.Predictor`).
An image is therefore run once with the background and all of its episode classes, and the
2-way probabilities of each episode are the softmax of (background, class): what a 2-way
classifier [background, class] gives, as in LSeg / SAZS episodes.

Each distinct (image, class) episode is scored once; its counts are added as many times as
the protocol drew it (HSNet cycles through its PASCAL lists), which equals scoring every
draw because inference is deterministic.

Priors come from a prior store of the validation split (:class:`StorePriors`); this module
never imports the trainer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sazs.core.labels import IGNORE_INDEX
from sazs.core.metrics import (
    BoundaryMeter,
    EpisodeMeter,
    SegMeter,
    boundary_counts,
    harmonic_mean,
    intersection_union,
)
from sazs.datasets.zeroshot import ZeroShotSplit
from sazs.segments.refine import upsample_eigvecs
from sazs.stores.format import DONE
from sazs.stores.reader import PriorStore

from .episodes import FoldEpisodes
from .fusion import (
    DEFAULT_HEADLINE,
    FUSIONS,
    NEEDS_IMAGE,
    NEEDS_PRIORS,
    SEMANTIC,
    FusionConfig,
    check_fusion,
    check_headline,
    fuse_binary,
    fuse_semantic,
    fusion_maps,
)
from .splits import Episode

log = logging.getLogger(__name__)


# The chance level of an episode (every pixel marked foreground), scored beside the fusion modes.
CHANCE = "chance"


class PriorsMismatchError(ValueError):
    """The prior store does not belong to the evaluated images."""


@dataclass(frozen=True)
class EvalConfig:
    fusions: tuple[str, ...] = FUSIONS
    headline: str = DEFAULT_HEADLINE
    fusion: FusionConfig = field(default_factory=FusionConfig)
    boundary_tolerance: float = 0.008  # >= 1: pixels; < 1: fraction of the image diagonal (DAVIS)
    allow_missing_priors: bool = False  # images without priors: prior-based modes keep the prediction
    draw: int = 6  # episodes drawn in the PNG grid per fold
    progress: bool = True

    def __post_init__(self) -> None:
        for mode in self.fusions:
            check_fusion(mode)
        if not self.fusions:
            raise ValueError("no fusion mode to evaluate")
        check_headline(self.headline)
        if self.headline not in self.fusions:
            raise ValueError(f"the headline fusion {self.headline!r} is not among the evaluated ones {self.fusions}")

    @property
    def needs_priors(self) -> bool:
        return any(m in NEEDS_PRIORS for m in self.fusions)


# ----------------------------------------------------------------------------- priors


class StorePriors:
    """Eigenvectors of the evaluated images from a prior store, checked against the dataset."""

    def __init__(
        self, store: PriorStore, *, dataset_name: str, split: str, ids: Sequence[str], allow_missing: bool = False
    ):
        ds = store.manifest.get("dataset", {})
        hint = (
            f"compute them with: sazs-priors run --dataset {dataset_name} --data ... --split {split} "
            f"(make priors DATASET={dataset_name} DATA=... SPLIT={split})"
        )
        if ds.get("name") != dataset_name or ds.get("split") != split:
            raise PriorsMismatchError(
                f"prior store {store.url} holds priors of {ds.get('name')}/{ds.get('split')} "
                f"but the evaluation uses {dataset_name}/{split}; {hint}"
            )
        self.store = store
        status = store.status()
        known = set(store.ids)
        self.missing: dict[str, str] = {}
        for id_ in dict.fromkeys(ids):
            if id_ not in known:
                self.missing[id_] = "not in the store"
            elif status[store.index(id_)] != DONE:
                self.missing[id_] = "failed" if status[store.index(id_)] == 2 else "pending"
        if self.missing and not allow_missing:
            examples = ", ".join(f"{k} ({v})" for k, v in list(self.missing.items())[:3])
            raise PriorsMismatchError(
                f"{len(self.missing)} evaluated image(s) have no priors in {store.url} "
                f"(e.g. {examples}); {hint}, or pass --allow-missing-priors to keep the "
                "network's prediction for them in the prior-based fusion modes"
            )
        if self.missing:
            log.warning(
                "%d image(s) without priors: prior-based fusion keeps the prediction there (e.g. %s)",
                len(self.missing),
                list(self.missing)[:3],
            )

    def __call__(self, image_id: str, image_hw: tuple[int, int]) -> np.ndarray | None:
        if image_id in self.missing:
            return None
        prior = self.store.get(image_id)
        if tuple(prior.image_size) != tuple(image_hw):
            raise PriorsMismatchError(
                f"priors of {image_id!r} in {self.store.url} were computed on a {prior.image_size[0]}x"
                f"{prior.image_size[1]} image but the dataset's image is {image_hw[0]}x{image_hw[1]}; "
                "the store belongs to another copy of the dataset"
            )
        return prior.eigvecs


PriorsFn = Callable[[str, tuple[int, int]], "np.ndarray | None"]


# ----------------------------------------------------------------------------- episodes


@dataclass
class EpisodeScore:
    intersection: torch.Tensor  # (2,) background, foreground
    union: torch.Tensor
    boundary: np.ndarray  # (4,) boundary_counts
    choice: int  # select / oracle: 0 = prediction kept, k = eigen-segment k
    fallback: bool = False  # no priors: the prediction was kept

    @property
    def iou(self) -> float:
        u = int(self.union[1])
        return int(self.intersection[1]) / u if u else float("nan")


def binary_target(mask: np.ndarray, label: int) -> torch.Tensor:
    """Episode ground truth: 1 = the class, 0 = everything else, 255 stays ignored."""
    m = torch.from_numpy(np.asarray(mask).astype(np.int64))
    return torch.where(m == IGNORE_INDEX, torch.full_like(m, IGNORE_INDEX), (m == label).long())


def _pick_samples(episodes: Sequence[Episode], n: int) -> list[Episode]:
    """Up to ``n`` episodes for the picture: first episode of each new image, in episode order."""
    seen, out = set(), []
    if n <= 0:
        return out
    for e in episodes:
        if e.image_id not in seen:
            seen.add(e.image_id)
            out.append(e)
        if len(out) >= n:
            break
    return out


def _thumb(x: np.ndarray, max_side: int = 256) -> np.ndarray:
    """Nearest-neighbour downscale (for the picture only; never for scoring)."""
    h, w = x.shape[:2]
    step = max(1, math.ceil(max(h, w) / max_side))
    return np.ascontiguousarray(x[::step, ::step])


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="img", disable=None)


def evaluate_episodes(model, dataset, fold_eps: FoldEpisodes, priors: PriorsFn | None, cfg: EvalConfig) -> dict:
    """Score every fusion mode on the episodes of one fold; returns a JSON-able dict + samples.

    Result keys: "fold", "protocol" (list source, rule, counts), "modes" {mode: {"miou",
    "fb_iou", "boundary_f", "iou" per class, "boundary_f_per_class", "segment_rate",
    "fallbacks"}}, "seconds", and "samples" (arrays for the picture; not JSON).
    """
    split = fold_eps.split
    if cfg.needs_priors and priors is None:
        raise ValueError(
            f"fusion modes {sorted(set(cfg.fusions) & NEEDS_PRIORS)} need a prior store of the "
            "validation split; pass one, or evaluate --fusion none"
        )
    counts = fold_eps.counts()
    by_image: dict[str, list[int]] = {}
    for e in counts:  # Counter keeps first-appearance order
        by_image.setdefault(e.image_id, []).append(e.label)
    samples_wanted = {e for e in _pick_samples(fold_eps.episodes, cfg.draw)}
    scores: dict[Episode, dict[str, EpisodeScore]] = {}
    samples: list[dict] = []
    t0 = time.perf_counter()
    for image_id in _progress(list(by_image), f"fold {split.fold} episodes", cfg.progress):
        image = dataset.load_image(image_id)
        mask = dataset.load_mask(image_id)
        if mask is None:
            raise ValueError(f"episode image {image_id!r} has no mask")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask of {image_id!r} is {mask.shape} but the image is {image.shape[:2]}")
        labels = sorted(set(by_image[image_id]))
        logits = model.logits(image, [model.background, *(split.name(c) for c in labels)])
        eig_grid = priors(image_id, image.shape[:2]) if priors is not None and cfg.needs_priors else None
        eig = upsample_eigvecs(eig_grid, mask.shape).to(logits.device) if eig_grid is not None else None
        # one partition of the image for all of its episodes
        maps = fusion_maps(eig, image, cfg.fusion) if eig is not None and NEEDS_IMAGE & set(cfg.fusions) else None
        for j, label in enumerate(labels):
            episode = Episode(image_id, label)
            probs = torch.softmax(logits[[0, j + 1]].float(), 0)
            target = binary_target(mask, label)
            per_mode: dict[str, EpisodeScore] = {}
            fused_masks: dict[str, torch.Tensor] = {}
            for mode in cfg.fusions:
                fallback = mode in NEEDS_PRIORS and eig is None
                fused = fuse_binary(
                    "none" if fallback else mode,
                    probs,
                    eig,
                    cfg=cfg.fusion,
                    target=target.to(probs.device),
                    image=image,
                    maps=maps,
                )
                fg = fused.mask.cpu()
                inter, union = intersection_union(fg.long(), target, 2)
                edges = boundary_counts(fg, target, tolerance=cfg.boundary_tolerance)
                per_mode[mode] = EpisodeScore(inter, union, edges, fused.choice, fallback)
                fused_masks[mode] = fg
            # chance level: every pixel marked foreground
            every = torch.ones_like(target, dtype=torch.bool)
            inter, union = intersection_union(every.long(), target, 2)
            per_mode[CHANCE] = EpisodeScore(inter, union, np.zeros(4), 0)
            scores[episode] = per_mode
            if episode in samples_wanted:
                samples.append(
                    {
                        "image_id": image_id,
                        "class": split.name(label),
                        "image": _thumb(image),
                        "target": _thumb(target.numpy().astype(np.uint8)),
                        "masks": {m: _thumb(v.numpy()) for m, v in fused_masks.items()},
                        "iou": {m: s.iou for m, s in per_mode.items()},
                        "eigvecs": eig_grid,
                    }
                )
    seconds = time.perf_counter() - t0
    order = {e: i for i, e in enumerate(fold_eps.episodes)}
    samples.sort(key=lambda s: order[Episode(s["image_id"], split.class_names.index(s["class"]) + 1)])

    num_classes = len(split.class_names)
    fold_classes = [c - 1 for c in split.unseen]
    modes = {}
    chance = EpisodeMeter(num_classes)
    for episode, n in counts.items():
        s = scores[episode][CHANCE]
        chance.add(episode.label - 1, s.intersection, s.union, n)
    for mode in cfg.fusions:
        meter = EpisodeMeter(num_classes)
        bmeter = BoundaryMeter(num_classes, tolerance=cfg.boundary_tolerance)
        replaced = fallbacks = 0
        for episode, n in counts.items():
            s = scores[episode][mode]
            meter.add(episode.label - 1, s.intersection, s.union, n)
            bmeter.add(episode.label - 1, s.boundary, n)
            replaced += n * (s.choice > 0)
            fallbacks += n * s.fallback
        iou = meter.iou()
        bf = bmeter.f_score()
        modes[mode] = {
            "miou": meter.miou(fold_classes),
            "fb_iou": meter.fb_iou(fold_classes),
            "boundary_f": bmeter.mean_f(fold_classes),
            "iou": {split.name(c + 1): _num(iou[c]) for c in fold_classes},
            "boundary_f_per_class": {split.name(c + 1): _num(bf[c]) for c in fold_classes},
            "segment_rate": replaced / len(fold_eps.episodes) if mode in ("select", "oracle") else None,
            "fallbacks": fallbacks,
        }
    log.info(
        "%s fold %d: %d episodes (%d distinct, %d images) in %.1fs; %s",
        split.benchmark,
        split.fold,
        len(fold_eps.episodes),
        len(counts),
        len(by_image),
        seconds,
        "  ".join(f"{m} mIoU {100 * r['miou']:.1f}" for m, r in modes.items()),
    )
    return {
        "fold": split.fold,
        "protocol": fold_eps.describe(),
        "modes": modes,
        "chance": {"miou": chance.miou(fold_classes), "fb_iou": chance.fb_iou(fold_classes)},
        "seconds": seconds,
        "samples": samples,
    }


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# ----------------------------------------------------------------------------- generalised


def evaluate_generalised(
    model, dataset, split: ZeroShotSplit, ids: Sequence[str], priors: PriorsFn | None, cfg: EvalConfig
) -> dict:
    """All classes at once on whole validation masks: seen / unseen mIoU and their harmonic mean.

    The classifier holds the background word and every class (every class only, for a
    benchmark without background: CamVid); seen mIoU counts background as seen (the GZS3Net
    convention). Fusion modes: those of ``cfg.fusions`` defined for label maps (``none``,
    ``project``, ``segments``).
    """
    modes_run = [m for m in cfg.fusions if m in SEMANTIC]
    names = [model.background, *split.class_names] if split.background else list(split.class_names)
    meters = {m: SegMeter(len(names), class_names=list(split.all_names())) for m in modes_run}
    bmeters = {m: BoundaryMeter(len(names), tolerance=cfg.boundary_tolerance) for m in modes_run}
    fallbacks = 0
    t0 = time.perf_counter()
    for image_id in _progress(list(ids), f"fold {split.fold} generalised", cfg.progress):
        image = dataset.load_image(image_id)
        mask = dataset.load_mask(image_id)
        if mask is None:
            raise ValueError(f"validation image {image_id!r} has no mask")
        target = torch.from_numpy(mask.astype(np.int64))
        target[(target > len(names) - 1) & (target != IGNORE_INDEX)] = IGNORE_INDEX
        probs = torch.softmax(model.logits(image, names).float(), 0)
        eig = maps = None
        if set(modes_run) & NEEDS_PRIORS and priors is not None:
            grid = priors(image_id, image.shape[:2])
            eig = upsample_eigvecs(grid, mask.shape) if grid is not None else None
            fallbacks += grid is None
            if eig is not None and NEEDS_IMAGE & set(modes_run):
                maps = fusion_maps(eig, image, cfg.fusion)
        for mode in modes_run:
            pred = fuse_semantic(
                mode if (mode == "none" or eig is not None) else "none",
                probs,
                eig,
                cfg=cfg.fusion,
                image=image,
                maps=maps,
                background=0 if split.background else None,
            ).cpu()
            meters[mode].update(pred, target)
            bmeters[mode].update_semantic(pred.numpy(), target.numpy())
    out = {}
    seen = list(split.seen_scored())
    for mode in modes_run:
        m = meters[mode]
        seen_miou = m.miou(seen)
        unseen_miou = m.miou(split.unseen)
        iou = m.iou()
        out[mode] = {
            "seen_miou": seen_miou,
            "unseen_miou": unseen_miou,
            "harmonic_miou": harmonic_mean(seen_miou, unseen_miou),
            "fb_iou": m.fb_iou(),
            "boundary_f_unseen": bmeters[mode].mean_f(split.unseen),
            "boundary_f_seen": bmeters[mode].mean_f(seen),
            "iou": {n: _num(v) for n, v in zip(split.all_names(), iou)},
        }
    return {
        "fold": split.fold,
        "images": len(ids),
        "modes": out,
        "fallbacks": fallbacks,
        "seconds": time.perf_counter() - t0,
    }
