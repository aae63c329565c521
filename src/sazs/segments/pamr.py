"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020, "Single-Stage Semantic
Segmentation from Image Labels", Sec. 3.3).

Soft class maps are refined by repeated averaging over each pixel's neighbours, weighted by
how alike the image is there: for the 8 neighbours at each dilation d in ``dilations``, the
affinity is a softmax over all neighbours of -|I_j - I_i| / (0.1 · std_i) (mean over colour
channels; std_i the local standard deviation of the image over the same neighbourhood, so the
kernel adapts to the local contrast), and ``num_iter`` times m_i <- sum_j a_ij m_j. Labels
spread within regions of like colour and stop at edges.

Written here by hand (about 40 lines of torch): the authors' module lives in their training
repository, not in a package. It runs on ``work_side``-pixel images (the affinities of
a 480p image at full size cost 48 neighbour maps per iteration); the refined soft map is
upsampled back, which keeps the edges to within a pixel or two of the image's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PamrConfig:
    num_iter: int = 10
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    # the short side the refinement runs at (pixels); None: the image's own size
    work_side: int | None = 240

    def __post_init__(self) -> None:
        if self.num_iter < 1 or not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"PAMR needs num_iter >= 1 and dilations >= 1, got {self}")


_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _neighbours(x: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """(C, H, W) -> (C, P, H, W): the values of the 8 neighbours at every dilation (border replicated)."""
    h, w = x.shape[-2:]
    pad = max(dilations)
    xp = F.pad(x[None], (pad, pad, pad, pad), mode="replicate")[0]
    out = [
        xp[:, pad + dy * d : pad + dy * d + h, pad + dx * d : pad + dx * d + w]
        for d in dilations
        for dy, dx in _OFFSETS
    ]
    return torch.stack(out, 1)


def pamr(image: np.ndarray, probs: np.ndarray, cfg: PamrConfig = PamrConfig()) -> np.ndarray:
    """Refine soft maps ``probs`` (C, H, W) with ``image`` (H, W, 3) uint8 -> (C, H, W) float32."""
    h, w = probs.shape[-2:]
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255
    m = torch.from_numpy(np.ascontiguousarray(probs, np.float32))[None]
    scale = 1.0 if cfg.work_side is None else min(1.0, cfg.work_side / min(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size != (h, w):
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    img, m = img[0], m[0]
    near = _neighbours(img, cfg.dilations)  # (3, P, h, w)
    with_centre = torch.cat([near, img[:, None]], 1)
    std = with_centre.std(1, keepdim=True)  # (3, 1, h, w)
    logits = -((near - img[:, None]).abs() / (1e-8 + 0.1 * std)).mean(0)  # (P, h, w)
    aff = torch.softmax(logits, 0)
    for _ in range(cfg.num_iter):
        m = (_neighbours(m, cfg.dilations) * aff[None]).sum(1)
    if size != (h, w):
        m = F.interpolate(m[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return m.numpy()
