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

Pixels whose target is ``ignore_index`` (255) count nowhere. IoU of a class with an empty
union is NaN and left out of means (``nanmean``); a class that is never present but is
predicted gets IoU 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = 255


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
        raise ValueError(f"targets must lie in 0..{num_classes - 1} or be {ignore_index}, "
                         f"got {int(t.min())}..{int(t.max())}")
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


class SegMeter:
    """Confusion matrix over a whole evaluation set; IoUs computed from the sums."""

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX,
                 class_names: Sequence[str] | None = None):  # fmt: skip
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
        binary = torch.stack([
            torch.stack([cm[background, background], cm[background, fg].sum()]),
            torch.stack([cm[fg, background].sum(), cm[fg][:, fg].sum()]),
        ])  # fmt: skip
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
            self.intersection[:, c] += inter
            self.union[:, c] += union
            self.episodes[c] += 1

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
