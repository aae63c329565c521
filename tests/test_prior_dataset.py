"""sazs.stores.PriorDataset: any id list joined with a store, through a plain DataLoader with workers."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_store_export import write_store
from torch.utils.data import DataLoader

from sazs.stores import PriorDataset
from sazs.stores.format import StoreError


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    images = {
        f"img{i}": (
            (40, 60),
            np.sort(rng.random(4)).astype(np.float32) * [0, 1, 1, 1],
            rng.standard_normal((4, 3, 5)).astype(np.float16).astype(np.float32),
        )
        for i in range(5)
    }
    return write_store(tmp_path / "s.zarr", images, k=4, max_grid=(3, 5), failed=("bad",)), images


def test_dataloader_with_two_workers_reads_the_given_ids_in_order(store):
    path, images = store
    ids = ["img3", "img0", "img4", "img1"]  # any image list, in its own order
    ds = PriorDataset(
        str(path),
        ids,
        num_eigs=3,
        load_image=lambda id_: np.full((2, 2), int(id_[-1]), np.uint8),
        transform=lambda s: {**s, "eigvecs": s["eigvecs"] * 2},
    )
    assert len(ds) == 4 and ds._store is None  # checked, then closed: each worker opens its own
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert [i for b in batches for i in b["id"]] == ids
    b = batches[0]
    assert b["eigvecs"].shape == (2, 3, 3, 5) and b["eigvecs"].dtype == torch.float32
    torch.testing.assert_close(b["eigvecs"][1], torch.from_numpy(images["img0"][2][:3] * 2))
    assert b["image"][0].unique().tolist() == [3] and b["image_size"].tolist() == [[40, 60], [40, 60]]
    assert b["grid"].tolist() == [[3, 5], [3, 5]] and b["index"].tolist() == [0, 1]
    assert ds._store is None  # the main process never opened it


def test_default_ids_handle_pickling_and_checks(store):
    path, _ = store
    ds = PriorDataset(path)
    assert ds.ids == [f"img{i}" for i in range(5)]  # every image with priors
    ds[0]
    assert ds._store is not None
    assert pickle.loads(pickle.dumps(ds))._store is None
    with pytest.raises(KeyError, match="1 of the 2 ids are not in store"):
        PriorDataset(path, ["img0", "nope"])
    with pytest.raises(StoreError, match="failed priors.*cannot decode it"):
        PriorDataset(path, ["img0", "bad"])
    ds = PriorDataset(path, ["img0", "bad"], skip_failed=True)
    assert ds.ids == ["img0"] and ds.skipped == {"bad": "cannot decode it"}
    with pytest.raises(ValueError, match="holds K=4"):
        PriorDataset(path, num_eigs=5)


def test_stores_package_needs_no_torch():
    """`from sazs.stores import PriorDataset` loads no torch: a trainer brings its own."""
    code = "import sys; from sazs.stores import PriorDataset; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
