"""Store helpers shared by the tests: a toy manifest, and comparing stores array by array
(what the end-to-end tests mean by "the same store")."""

import numpy as np

from sazs.stores.manifest import build_manifest
from sazs.stores.reader import open_store

ARRAYS = ("ids", "image_size", "grid", "eigvals", "eigvecs", "residual", "status", "errors")


def arrays(path, names=ARRAYS) -> dict:
    """The store's arrays as numpy, by name."""
    group = open_store(path).group
    return {name: np.asarray(group[name][:]) for name in names}


def assert_same_arrays(a, b, names=ARRAYS) -> None:
    """Every array bitwise equal; a and b are store paths or `arrays()` results."""
    a = a if isinstance(a, dict) else arrays(a, names)
    b = b if isinstance(b, dict) else arrays(b, names)
    for name in names:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def toy_manifest(ids, *, num_eigs=4, knn=10, shard_size=3, max_grid=(6, 7)) -> dict:
    """A complete manifest for a small hand-made store of `ids`."""
    return build_manifest(
        dataset={"name": "toy", "split": "val", "root": "/nowhere", "num_images": len(ids), "ids_sha256": "x"},
        extractor={"name": "color", "weights_sha256": None, "facet": "key", "device": "cpu"},
        graph={"k": knn, "threshold": 0.0},
        solver={"solver": "eigsh", "num_eigs": num_eigs},
        num_eigs=num_eigs,
        layout={"shard_size": shard_size, "max_grid": list(max_grid), "eigvecs_dtype": "float16"},
    )
