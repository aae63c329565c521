"""Comparing prior stores array by array: what the end-to-end tests mean by "the same store"."""

import numpy as np

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
