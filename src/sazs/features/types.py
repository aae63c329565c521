"""What an extractor hands the graph stage: one image's patch ``Features``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Features:
    feats: np.ndarray  # (h*w, d) float32, unit rows, row-major over the grid (a torch tensor on
    #                    the extractor's device when extracted with on_device=True)
    grid: tuple[int, int]  # (h, w)
