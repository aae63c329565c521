"""Prior stores: write, read, verify, share, export and import the spectral priors (Zarr v3).

``from sazs.stores import PriorDataset, open_store`` are the entry points for other
trainers; neither needs torch.
"""

from .dataset import PriorDataset
from .reader import PriorStore, open_store

__all__ = ["PriorDataset", "PriorStore", "open_store"]
