"""Pictures of an evaluation: the grid of episodes (image, ground truth, prediction, fused masks,
eigen-segments) and the colour palette of label maps.

The columns say which mask is which; the oracle's title says it is an upper bound that uses
the ground truth.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sazs.stores.preview import segment_labels

from .fusion import UPPER_BOUNDS, check_headline, fusion_label

log = logging.getLogger(__name__)


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours, the PASCAL VOC colour map (index 0 black)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def grid_titles(fusions: Sequence[str], headline: str) -> list[str]:
    """Column titles of the episode picture (the oracle's says it is an upper bound)."""
    check_headline(headline)
    titles = ["image", "ground truth", "prediction (fusion none)"]
    if headline != "none":
        titles.append(f"fused: {headline} [headline]")
    titles += [f"{fusion_label(m)}" for m in fusions if m in UPPER_BOUNDS]
    return titles + ["eigen-segments (signs of v1..v3)"]


def _gray(image: np.ndarray) -> np.ndarray:
    """Dimmed grey copy of an RGB image: the base of mask panels, so the mask colour stands out."""
    g = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat((0.35 * g + 60)[..., None], 3, axis=2)


def _overlay(image: np.ndarray, mask: np.ndarray, color, alpha: float = 0.7) -> np.ndarray:
    out = _gray(image)
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    return out.clip(0, 255).astype(np.uint8)


GT_COLOR, PRED_COLOR, IGNORE_COLOR = (255, 70, 40), (40, 170, 255), (255, 255, 255)


def _target_rgb(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = _overlay(image, target == 1, GT_COLOR)
    out[target == 255] = IGNORE_COLOR
    return out


def draw_episode_grid(
    samples: list[dict], out_png: str | Path, *, fusions: Sequence[str], headline: str, title: str, num_vectors: int = 3
) -> Path | None:
    """One row per episode: image, ground truth, prediction, fused, oracle (upper bound), eigen-segments."""
    if not samples:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = grid_titles(fusions, headline)
    modes = ["none"] + ([headline] if headline != "none" else []) + [m for m in fusions if m in UPPER_BOUNDS]
    cols = len(titles)
    fig, axes = plt.subplots(len(samples), cols, figsize=(2.7 * cols, 2.5 * len(samples) + 0.6), squeeze=False)
    for r, s in enumerate(samples):
        image, target = s["image"], s["target"]
        panels = [image, _target_rgb(image, target)]
        labels = ["", f"{s['class']}"]
        for m in modes:
            panels.append(_overlay(image, s["masks"][m], PRED_COLOR))
            iou = s["iou"].get(m)
            labels.append("" if iou is None or math.isnan(iou) else f"IoU {100 * iou:.1f}")
        for c, (panel, label) in enumerate(zip(panels, labels)):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xlabel(label, fontsize=8)
        ax = axes[r, cols - 1]
        if s.get("eigvecs") is not None and s["eigvecs"].shape[0] > 1:
            seg = segment_labels(s["eigvecs"], num_vectors)
            h, w = image.shape[:2]
            ax.imshow(seg, cmap="tab10", vmin=0, vmax=9, interpolation="nearest", extent=(0, w, h, 0))
        else:
            ax.text(0.5, 0.5, "no priors", ha="center", va="center", transform=ax.transAxes)
        axes[r, 0].set_ylabel(f"{s['image_id']}\n{s['class']}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for c, t in enumerate(titles):
        axes[0, c].set_title(t, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title above the column titles
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    log.info("wrote %s", out_png)
    return out_png
