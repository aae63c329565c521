"""Quick validation during training: whole images, one classifier over every class.

This is a sanity check of a training run (GZS3-style: background + all C classes are
scored at once, seen mIoU counts background as seen, hIoU is the harmonic mean of seen and
unseen mIoU). It is not the PASCAL-5i / COCO-20i episode protocol; that is ``eval/``'s job.
Unseen class names reach the text tower here, for scoring only, never the training loss.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from sazs.core.metrics import SegMeter
from sazs.datasets.base import Dataset
from sazs.datasets.zeroshot import ZeroShotSplit
from sazs.model.model import SegmentationModel, normalize
from sazs.model.text import TextClassifier

log = logging.getLogger(__name__)


def _resize_for_model(image: np.ndarray, short_side: int, multiple: int) -> torch.Tensor:
    """(1, 3, H', W') in [0, 1]: short side ~ short_side, both sides multiples of ``multiple``."""
    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    size = tuple(max(multiple, round(n * scale / multiple) * multiple) for n in (h, w))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


@torch.no_grad()
def validate(
    model: SegmentationModel,
    text: TextClassifier,
    dataset: Dataset,
    split: ZeroShotSplit,
    *,
    short_side: int,
    device: torch.device,
    limit: int | None = None,
    autocast=None,
) -> dict:
    """Seen / unseen / harmonic mIoU and FB-IoU over (the first ``limit``) images of ``dataset``."""
    names = split.all_names()
    emb = text(names).to(device)
    meter = SegMeter(len(names), class_names=list(names))
    was_training = model.training
    model.eval()
    ids = dataset.ids[:limit]
    try:
        for id_ in ids:
            image, mask = dataset.load_image(id_), dataset.load_mask(id_)
            if mask is None:
                raise ValueError(f"validation image {id_!r} has no mask")
            x = normalize(_resize_for_model(image, short_side, model.patch_size)).to(device)
            if autocast is not None:
                with autocast():
                    logits = model(x, emb)["logits"]
            else:
                logits = model(x, emb)["logits"]
            logits = F.interpolate(logits.float(), size=mask.shape, mode="bilinear", align_corners=False)
            target = torch.from_numpy(mask.astype(np.int64))
            target[target > len(names) - 1] = 255  # anything beyond the class table is unscored
            meter.update(logits.argmax(1)[0].cpu(), target)
    finally:
        model.train(was_training)
    seen = list(split.seen_scored())
    seen_miou = meter.miou(seen)
    unseen_miou = meter.miou(split.unseen) if split.unseen else float("nan")
    h = (
        2 * seen_miou * unseen_miou / (seen_miou + unseen_miou)
        if split.unseen and seen_miou + unseen_miou > 0
        else float("nan")
    )
    iou = meter.iou()
    return {
        "images": len(ids),
        "seen_miou": seen_miou,
        "unseen_miou": unseen_miou,
        "harmonic_miou": h,
        "fb_iou": meter.fb_iou(),
        "pixel_accuracy": meter.pixel_accuracy(),
        "iou": {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, iou)},
    }
