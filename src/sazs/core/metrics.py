"""Segmentation metrics: intersection / union accumulated over images, per-class IoU, mIoU, FB-IoU.

Two accumulators, both fed with label maps (torch tensors on any device, or numpy arrays):

- :class:`SegMeter` — semantic segmentation over C classes: a C x C confusion matrix
  summed over every image, so IoU_c = TP / (TP + FP + FN) over the whole set (the standard
  "accumulate intersection and union, divide once" definition, not a mean of per-image IoUs).
- :class:`EpisodeMeter` — the few-/zero-shot episode protocol of PASCAL-5i / COCO-20i as
  implemented by HSNet (and used by LSeg and SAZS): each episode is a binary mask for one
  class; foreground and background intersection / union are summed per episode class;
  mIoU is the mean foreground IoU over the classes of interest and FB-IoU the mean of the
  background and foreground IoUs of the summed counts.

- :class:`BoundaryMeter` — boundary F-score (the shape metric the priors are for): the
  boundary pixels of a predicted and a ground-truth binary mask are matched within a
  tolerance band; matched / total counts are summed per class over episodes (or images),
  then precision, recall and F = 2PR / (P + R) per class.

Pixels whose target is ``ignore_index`` (255) count nowhere. IoU of a class with an empty
union is NaN and left out of means (``nanmean``); a class that is never present but is
predicted gets IoU 0. (HSNet divides by max(union, 1) and so scores a class without
episodes as 0; with 1000 episodes every class has some, and the two agree.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from .labels import IGNORE_INDEX


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) int64 counts, rows = target class, columns = predicted class.

    Target pixels equal to ``ignore_index`` are dropped; a prediction outside 0..C-1 on a
    valid pixel is an error (it would silently vanish from the union otherwise).
    """
    pred, target = _as_tensor(pred), _as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    target = target.to(pred.device)
    valid = target != ignore_index
    p, t = pred[valid].long(), target[valid].long()
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"predictions must lie in 0..{num_classes - 1}, got {int(p.min())}..{int(p.max())}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"targets must lie in 0..{num_classes - 1} or be {ignore_index}, got {int(t.min())}..{int(t.max())}"
        )
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def intersection_union(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """Per-class (intersection, union) int64 tensors of one prediction (any shape)."""
    cm = confusion_matrix(pred, target, num_classes, ignore_index)
    inter = cm.diag()
    return inter, cm.sum(0) + cm.sum(1) - inter


def _iou(inter: torch.Tensor, union: torch.Tensor) -> np.ndarray:
    inter, union = inter.double().numpy(), union.double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); NaN if either is NaN, 0 if both are 0 (the hIoU of seen and unseen mIoU)."""
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


class SegMeter:
    """Confusion matrix over a whole evaluation set; IoUs computed from the sums."""

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred, target) -> None:
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def intersection(self) -> torch.Tensor:
        return self.confusion.diag()

    def union(self) -> torch.Tensor:
        cm = self.confusion
        return cm.sum(0) + cm.sum(1) - cm.diag()

    def iou(self) -> np.ndarray:
        """(C,) IoU per class, NaN where the class is neither present nor predicted."""
        return _iou(self.intersection(), self.union())

    def miou(self, classes: Sequence[int] | None = None) -> float:
        """Mean IoU over ``classes`` (default: all), ignoring classes with an empty union."""
        iou = self.iou()
        return _nanmean(iou if classes is None else iou[list(classes)])

    def fb_iou(self, background: int = 0) -> float:
        """Mean of background and foreground IoU after merging every other class into foreground."""
        cm = self.confusion
        fg = [c for c in range(self.num_classes) if c != background]
        binary = torch.stack(
            [
                torch.stack([cm[background, background], cm[background, fg].sum()]),
                torch.stack([cm[fg, background].sum(), cm[fg][:, fg].sum()]),
            ]
        )
        inter = binary.diag()
        return _nanmean(_iou(inter, binary.sum(0) + binary.sum(1) - inter))

    def pixel_accuracy(self) -> float:
        total = int(self.confusion.sum())
        return float(self.confusion.diag().sum()) / total if total else float("nan")

    def summary(self, classes: Sequence[int] | None = None) -> dict:
        iou = self.iou()
        keep = range(self.num_classes) if classes is None else classes
        return {
            "miou": self.miou(classes),
            "fb_iou": self.fb_iou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "iou": {self.class_names[c]: (None if np.isnan(iou[c]) else float(iou[c])) for c in keep},
        }


class EpisodeMeter:
    """HSNet-style accumulation for binary episodes of classes 0..num_classes-1.

    ``update(pred, target, class_ids)`` takes a batch of binary maps (B, H, W): 1 = the
    episode's class, 0 = background, ``ignore_index`` in the target = not evaluated.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersection = torch.zeros(2, num_classes, dtype=torch.int64)  # row 0 background, row 1 foreground
        self.union = torch.zeros(2, num_classes, dtype=torch.int64)
        self.episodes = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, pred, target, class_ids) -> None:
        pred, target = _as_tensor(pred), _as_tensor(target)
        class_ids = _as_tensor(class_ids).reshape(-1).long().cpu()
        if pred.dim() == 2:
            pred, target = pred[None], target[None]
        if len(class_ids) != len(pred):
            raise ValueError(f"{len(class_ids)} class ids for a batch of {len(pred)} episodes")
        if class_ids.numel() and (int(class_ids.min()) < 0 or int(class_ids.max()) >= self.num_classes):
            raise ValueError(f"episode class ids must lie in 0..{self.num_classes - 1}")
        for p, t, c in zip(pred, target, class_ids):
            inter, union = intersection_union(p, t, 2, self.ignore_index)
            self.add(int(c), inter, union)

    def add(self, class_id: int, intersection, union, count: int = 1) -> None:
        """Add the (background, foreground) counts of one episode ``count`` times.

        An evaluation that scores each distinct episode once and repeats its counts for
        every time the protocol drew it gets exactly what scoring every draw would give.
        """
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"episode class ids must lie in 0..{self.num_classes - 1}")
        self.intersection[:, class_id] += _as_tensor(intersection).long().cpu() * count
        self.union[:, class_id] += _as_tensor(union).long().cpu() * count
        self.episodes[class_id] += count

    def iou(self) -> np.ndarray:
        """(num_classes,) foreground IoU per class, NaN for classes without episodes."""
        return _iou(self.intersection[1], self.union[1])

    def miou(self, classes: Sequence[int] | None = None) -> float:
        iou = self.iou()
        return _nanmean(iou if classes is None else iou[list(classes)])

    def fb_iou(self, classes: Sequence[int] | None = None) -> float:
        """Mean over {background, foreground} of summed intersection / summed union."""
        idx = list(range(self.num_classes)) if classes is None else list(classes)
        inter, union = self.intersection[:, idx].sum(1), self.union[:, idx].sum(1)
        return _nanmean(_iou(inter, union))


# ----------------------------------------------------------------------------- boundaries


def boundary_tolerance_px(tolerance: float, shape: Sequence[int]) -> float:
    """Band half-width in pixels: ``tolerance`` >= 1 is pixels; below 1 it is a fraction of the
    image diagonal, rounded up (the DAVIS convention; 0.008 = 0.8 % of the diagonal)."""
    if tolerance <= 0:
        raise ValueError(f"boundary tolerance must be > 0, got {tolerance}")
    if tolerance >= 1:
        return float(tolerance)
    return float(math.ceil(tolerance * math.hypot(*shape[-2:])))


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of a binary mask: pixels of the mask with a 4-neighbour outside it.

    The image border is not a boundary (an object cut by the frame has no edge there).
    """
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=1)


def _within(points: np.ndarray, reference: np.ndarray, radius: float) -> np.ndarray:
    """Which pixels of ``points`` lie within ``radius`` (Euclidean) of a pixel of ``reference``."""
    if not reference.any() or not points.any():
        return np.zeros_like(points)
    return points & (ndimage.distance_transform_edt(~reference) <= radius)


def boundary_counts(pred, target, *, tolerance: float = 0.008, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(4,) int64 [pred matched, pred total, gt matched, gt total] of one binary episode.

    ``pred`` (H, W) is the predicted foreground (nonzero = class), ``target`` (H, W) holds
    1 = class, 0 = background, ``ignore_index`` = not evaluated. A predicted boundary pixel
    is matched when a ground-truth boundary pixel lies within the tolerance band, and vice
    versa. Predicted boundary pixels on ignored pixels are not counted (an edge drawn inside
    an unlabelled region is neither right nor wrong) but still match ground-truth boundary
    pixels: VOC outlines every object with a 255 band, and a predicted edge inside the band
    is exactly where it should be.
    """
    pred = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred) != 0
    target = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
    radius = boundary_tolerance_px(tolerance, target.shape)
    valid = target != ignore_index
    pred_b = mask_boundary(pred)
    gt_b = mask_boundary(target == 1)
    pred_counted = pred_b & valid
    return np.array(
        [
            _within(pred_counted, gt_b, radius).sum(),
            pred_counted.sum(),
            _within(gt_b, pred_b, radius).sum(),
            gt_b.sum(),
        ],
        np.int64,
    )


def _f_score(counts: np.ndarray) -> np.ndarray:
    """Per-row F from [pred matched, pred total, gt matched, gt total]; NaN when both totals are 0."""
    counts = np.asarray(counts, np.float64).reshape(-1, 4)
    pm, pt, gm, gt = counts.T
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pt > 0, pm / np.maximum(pt, 1), 0.0)
        recall = np.where(gt > 0, gm / np.maximum(gt, 1), 0.0)
        f = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    return np.where((pt == 0) & (gt == 0), np.nan, f)


class BoundaryMeter:
    """Boundary F-score accumulated per class (counts summed, F computed once per class).

    A class whose predictions and ground truths never have a boundary pixel is NaN and left
    out of means; one side empty and the other not gives F = 0.
    """

    def __init__(self, num_classes: int, *, tolerance: float = 0.008, ignore_index: int = IGNORE_INDEX):
        boundary_tolerance_px(tolerance, (1, 1))  # validates
        self.num_classes = num_classes
        self.tolerance = tolerance
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, 4), np.int64)

    def add(self, class_id: int, counts, count: int = 1) -> None:
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"class ids must lie in 0..{self.num_classes - 1}, got {class_id}")
        self.counts[class_id] += np.asarray(counts, np.int64) * count

    def update(self, pred, target, class_id: int) -> None:
        """One binary episode: ``pred`` foreground mask, ``target`` 1 / 0 / ignore."""
        self.add(class_id, boundary_counts(pred, target, tolerance=self.tolerance, ignore_index=self.ignore_index))

    def update_semantic(self, pred, target, classes: Sequence[int] | None = None) -> None:
        """A semantic label map: every class (of ``classes``) present in prediction or target."""
        pred = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred)
        target = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target)
        valid = target != self.ignore_index
        present = set(np.unique(pred[valid]).tolist()) | set(np.unique(target[valid]).tolist())
        for c in sorted(present if classes is None else present & set(classes)):
            binary = np.where(valid, target == c, self.ignore_index).astype(np.int64)
            self.update(pred == c, binary, int(c))

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        pm, pt, gm, gt = self.counts.T.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pt > 0, pm / np.maximum(pt, 1), np.nan), np.where(gt > 0, gm / np.maximum(gt, 1), np.nan)

    def f_score(self) -> np.ndarray:
        """(num_classes,) boundary F per class."""
        return _f_score(self.counts)

    def mean_f(self, classes: Sequence[int] | None = None) -> float:
        f = self.f_score()
        return _nanmean(f if classes is None else f[list(classes)])
