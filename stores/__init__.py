"""Prior stores: write, read, verify, share, export and import the spectral priors (Zarr v3).

``from sazs.stores import PriorDataset, open_store`` are the entry points for other
trainers; the names are resolved on first use so that importing a submodule (e.g.
``sazs.stores.manifest``, which needs only the standard library) loads nothing else.
"""

__all__ = ["PriorDataset", "PriorStore", "open_store"]


def __getattr__(name: str):
    if name == "PriorDataset":
        from .dataset import PriorDataset

        return PriorDataset
    if name in ("PriorStore", "open_store"):
        from . import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'sazs.stores' has no attribute {name!r}")
