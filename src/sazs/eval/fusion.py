"""Fusing network predictions with an image's spectral priors at inference.

Inputs are the class probabilities ``probs`` (C, H, W) of one image at its original size and
its eigenvectors ``eigvecs`` (K, H, W) upsampled to the same pixels (:func:`upsample_eigvecs`).
Eigen-segments are the positive parts {v_k > 0}, k = 1..n, of the first non-trivial vectors
(by the store's sign convention the positive part is the minority of patches, usually the
object side).

Ground-truth-free modes (any of them may be the headline number):

- ``none``: argmax of the probabilities.
- ``project``: every class map is projected onto the span of the image's K eigenvectors
  (orthonormal basis Q by QR: P <- Q Q^T P), then argmax. The inference counterpart of the
  spectral training loss ||P - Q Q^T P||^2.
- ``select`` (binary episodes): the eigen-segment with the highest IoU *with the predicted
  foreground mask* replaces the prediction when that agreement reaches ``select_threshold``;
  otherwise the prediction is kept. The same choice as the released SAZS code, with the
  prediction in place of the ground truth.
- ``segments`` (episodes and label maps): the prediction corrected by the image's segments
  (:mod:`sazs.eval.regions`): spectral segments from k-means on the eigenvectors' rows tell
  which parts of the image a predicted class lives in; SLIC superpixels of the image carry
  the decisions to the image's edges. Inside the class's segments, superpixels the network
  was half sure of join the class; outside them, weak predicted superpixels go back to
  background. ``background`` (the label the classes grow into) is 0 in episodes; a benchmark
  without background gets the per-superpixel vote.

The upper bound:

- ``oracle`` (binary episodes): the released SAZS evaluation. Among the predicted mask and the
  eigen-segments it keeps the one with the highest foreground IoU **against the ground
  truth** (ties keep the prediction). It reads the answer, so it is only an upper bound; it
  is labelled so (:func:`fusion_label`, :func:`fusion_key`) wherever it is printed or saved,
  and it can never be the headline (:func:`check_headline`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sazs.core.labels import IGNORE_INDEX
from sazs.core.linalg import orthonormal_basis
from sazs.core.registry import Registry

from .regions import SegmentMaps, grow_labels, segment_maps

# Every fusion mode with what it needs and where it applies. gt_free: False only for the oracle, an
# upper bound that is never the headline; semantic: defined for multi-class label maps too
# (generalised setting, predict), not only binary episodes.
MODES: Registry[None] = Registry("fusion")
MODES.add("none", None, help="argmax of the prediction", gt_free=True, priors=False, image=False, semantic=True)
MODES.add(
    "project",
    None,
    help="probabilities projected on the eigenvectors' span",
    gt_free=True,
    priors=True,
    image=False,
    semantic=True,
)
MODES.add(
    "select",
    None,
    help="the eigen-segment that agrees best with the prediction",
    gt_free=True,
    priors=True,
    image=False,
    semantic=False,
)
MODES.add(
    "segments",
    None,
    help="the prediction corrected by spectral segments and superpixels",
    gt_free=True,
    priors=True,
    image=True,
    semantic=True,
)
MODES.add(
    "oracle",
    None,
    help="SAZS's released evaluation: picks with the ground truth (upper bound)",
    gt_free=False,
    priors=True,
    image=False,
    semantic=False,
)


def _modes(**want) -> tuple[str, ...]:
    return tuple(m for m in MODES if all(MODES.entry(m).meta[k] == v for k, v in want.items()))


FUSIONS = tuple(MODES)
GT_FREE = _modes(gt_free=True)
UPPER_BOUNDS = _modes(gt_free=False)
NEEDS_PRIORS = frozenset(_modes(priors=True))
NEEDS_IMAGE = frozenset(_modes(image=True))
SEMANTIC = _modes(semantic=True)
DEFAULT_HEADLINE = "select"

UPPER_BOUND_TAG = "upper bound"


def list_fusions() -> list[str]:
    return list(FUSIONS)


def check_fusion(mode: str) -> str:
    return MODES.check(mode)


def check_headline(mode: str) -> str:
    """The fusion whose numbers are the headline: ground-truth-free only."""
    if mode in UPPER_BOUNDS:
        raise ValueError(
            f"fusion {mode!r} picks masks with the ground truth: it is an upper bound and can never "
            f"be the headline; choose from {list(GT_FREE)}"
        )
    if mode not in GT_FREE:
        raise ValueError(f"unknown headline fusion {mode!r}; choose from {list(GT_FREE)}")
    return mode


def fusion_label(mode: str) -> str:
    """How a fusion mode is named in tables and pictures."""
    check_fusion(mode)
    if mode in UPPER_BOUNDS:
        return f"{mode} ({UPPER_BOUND_TAG}, uses GT)"
    return mode


def fusion_key(mode: str) -> str:
    """How a fusion mode is named in JSON: the oracle's key says what it is."""
    check_fusion(mode)
    return f"{mode}_upper_bound" if mode in UPPER_BOUNDS else mode


@dataclass(frozen=True)
class FusionConfig:
    num_segments: int = 4  # eigen-segments {v_k > 0}, k = 1..n (select, oracle); the SAZS code used 5 masks
    num_eigs: int | None = None  # eigenvectors spanning the projection (None: every one in the store)
    select_threshold: float = 0.5  # select: IoU with the predicted mask needed to keep a segment
    rank_rtol: float = 1e-4  # basis directions weaker than this (relative) are dropped
    # segments (sazs.eval.regions): spectral segments (k-means on the rows of v1..v_{num_eigs-1};
    # 0 = one segment), SLIC superpixels of the image (about ``superpixels``; 0 = none), the share
    # of a class's prediction that makes a spectral segment its own, and the mean probability a
    # superpixel needs to join the class there (and below which it leaves it elsewhere). Chosen
    # on the VOC 2007 val cut, PASCAL-5i fold 0 (docs/BENCHMARKS.md).
    spectral_segments: int = 8
    superpixels: int = 400
    slic_compactness: float = 20.0
    seed_share: float = 0.2
    grow_threshold: float = 0.3

    def __post_init__(self) -> None:
        if self.num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {self.num_segments}")
        if self.num_eigs is not None and self.num_eigs < 1:
            raise ValueError(f"num_eigs must be >= 1, got {self.num_eigs}")
        if not 0.0 <= self.select_threshold <= 1.0:
            raise ValueError(f"select_threshold must lie in [0, 1], got {self.select_threshold}")
        if self.spectral_segments < 0 or self.superpixels < 0:
            raise ValueError(
                f"spectral_segments and superpixels must be >= 0, got {self.spectral_segments}, {self.superpixels}"
            )
        if not self.slic_compactness > 0:
            raise ValueError(f"slic_compactness must be > 0, got {self.slic_compactness}")
        if not (0.0 < self.seed_share <= 1.0 and 0.0 <= self.grow_threshold <= 1.0):
            raise ValueError(
                f"seed_share must lie in (0, 1] and grow_threshold in [0, 1], got {self.seed_share}, "
                f"{self.grow_threshold}"
            )


# ----------------------------------------------------------------------------- spectral pieces


def project_probs(probs: torch.Tensor, eigvecs: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """(C, H, W) probabilities projected onto span(eigvecs (K, H, W)): Q Q^T P per class."""
    c, h, w = probs.shape
    if tuple(eigvecs.shape[-2:]) != (h, w):
        raise ValueError(f"eigvecs {tuple(eigvecs.shape[-2:])} and probabilities {(h, w)} differ in size")
    q = orthonormal_basis(eigvecs.reshape(eigvecs.shape[0], -1).to(probs.device).double(), rtol=rtol).float()
    p = probs.reshape(c, -1).T.float()
    return (q @ (q.T @ p)).T.reshape(c, h, w)


def segment_masks(eigvecs: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(n, H, W) bool: the eigen-segments {v_k > 0} for k = 1..n (vector 0 is the trivial one)."""
    if eigvecs.shape[0] < 2:
        raise ValueError("eigen-segments need at least 2 eigenvectors (the first one is trivial)")
    return eigvecs[1 : 1 + num_segments] > 0


def mask_iou(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of binary masks; ``a`` may be a stack (n, H, W). Empty union -> 0."""
    if valid is not None:
        a, b = a & valid, b & valid
    inter = (a & b).flatten(-2).sum(-1).double()
    union = (a | b).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def fusion_maps(eigvecs: torch.Tensor | None, image: np.ndarray | None, cfg: FusionConfig) -> SegmentMaps:
    """The segment maps ``segments`` reads (:func:`sazs.eval.regions.segment_maps` with ``cfg``'s sizes)."""
    return segment_maps(
        eigvecs,
        image,
        spectral=cfg.spectral_segments,
        superpixels=cfg.superpixels,
        compactness=cfg.slic_compactness,
        num_eigs=cfg.num_eigs,
    )


# ----------------------------------------------------------------------------- fusion


@dataclass
class Fused:
    """A fused binary mask and what was chosen (segment k >= 1, or 0 = the prediction)."""

    mask: torch.Tensor  # (H, W) bool foreground
    choice: int = 0
    score: float | None = None  # select: agreement with the prediction; oracle: IoU with the truth


def fuse_binary(
    mode: str,
    probs: torch.Tensor,
    eigvecs: torch.Tensor | None = None,
    *,
    cfg: FusionConfig = FusionConfig(),
    target: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    image: np.ndarray | None = None,
    maps: SegmentMaps | None = None,
) -> Fused:
    """Foreground mask of a binary episode; ``probs`` (2, H, W): background, class.

    ``target`` (H, W: 1 class, 0 background, ``ignore_index``) is read by ``oracle`` only;
    ``image`` (H, W, 3) uint8 by ``segments`` (or its ``maps``, :func:`fusion_maps`, computed
    once per image when several episodes share it).
    """
    check_fusion(mode)
    if probs.dim() != 3 or probs.shape[0] != 2:
        raise ValueError(f"binary fusion needs probabilities (2, H, W), got {tuple(probs.shape)}")
    pred = probs.argmax(0) == 1
    if mode == "none":
        return Fused(pred)
    if eigvecs is None:
        raise ValueError(f"fusion {mode!r} needs the image's eigenvectors (a prior store)")
    eigvecs = eigvecs.to(probs.device)
    if mode == "project":
        vecs = eigvecs[: cfg.num_eigs] if cfg.num_eigs else eigvecs
        return Fused(project_probs(probs, vecs, cfg.rank_rtol).argmax(0) == 1)
    if mode == "segments":
        maps = maps if maps is not None else fusion_maps(eigvecs, image, cfg)
        labels = grow_labels(probs, maps, seed_share=cfg.seed_share, grow_threshold=cfg.grow_threshold)
        return Fused(labels == 1)
    segments = segment_masks(eigvecs, cfg.num_segments)
    if mode == "select":
        agreement = mask_iou(segments, pred[None].expand_as(segments))
        k = int(agreement.argmax())
        score = float(agreement[k])
        if score >= cfg.select_threshold and bool(pred.any()):
            return Fused(segments[k], k + 1, score)
        return Fused(pred, 0, score)
    # oracle: the released SAZS rule, the answer in hand
    if target is None:
        raise ValueError("the oracle fusion needs the ground truth (it is an upper bound, not a method)")
    target = target.to(probs.device)
    valid = target != ignore_index
    truth = target == 1
    candidates = torch.cat([pred[None], segments])
    iou = mask_iou(candidates, truth[None].expand_as(candidates), valid[None].expand_as(candidates))
    k = int(iou.argmax())  # first maximum: a tie keeps the prediction, as the SAZS code
    return Fused(candidates[k], k, float(iou[k]))


def fuse_semantic(
    mode: str,
    probs: torch.Tensor,
    eigvecs: torch.Tensor | None = None,
    *,
    cfg: FusionConfig = FusionConfig(),
    image: np.ndarray | None = None,
    maps: SegmentMaps | None = None,
    background: int | None = 0,
) -> torch.Tensor:
    """(H, W) label map from (C, H, W) probabilities: ``none``, ``project`` or ``segments``.

    ``select`` and ``oracle`` choose one binary mask and are defined for episodes only.
    """
    check_fusion(mode)
    if mode not in SEMANTIC:
        raise ValueError(
            f"fusion {mode!r} is defined for binary episodes only; for label maps choose from {list(SEMANTIC)}"
        )
    if mode == "none":
        return probs.argmax(0)
    if eigvecs is None:
        raise ValueError(f"fusion {mode!r} needs the image's eigenvectors (a prior store)")
    if mode == "segments":
        maps = maps if maps is not None else fusion_maps(eigvecs, image, cfg)
        return grow_labels(
            probs, maps, background=background, seed_share=cfg.seed_share, grow_threshold=cfg.grow_threshold
        )
    vecs = eigvecs[: cfg.num_eigs] if cfg.num_eigs else eigvecs
    return project_probs(probs, vecs.to(probs.device), cfg.rank_rtol).argmax(0)
