"""Streaming data: joint augmentation of image / mask / eigenvectors, store checks, workers."""

import itertools
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sazs.datasets.base import Dataset, DatasetConfig
from sazs.datasets.synthetic import make_voc
from sazs.datasets.voc import VOC_CLASSES
from sazs.model.model import CLIP_MEAN, CLIP_STD
from sazs.pipeline import cli as priors_cli
from sazs.stores.manifest import build_manifest
from sazs.stores.writer import ImageResult, StoreWriter
from sazs.train.data import (
    AugmentConfig,
    DataConfig,
    EpochSampler,
    PriorSegDataset,
    StoreMismatchError,
    build_loader,
    center_geometry,
    warp_sample,
)


class ArrayDataset(Dataset):
    """In-memory VOC-like dataset: exact (lossless) images, so geometry can be checked to the pixel."""

    name = "voc"

    def __init__(self, arrays: dict, split: str = "train"):
        paths = {k: Path(f"/nonexistent/{k}.png") for k in arrays}
        super().__init__(
            DatasetConfig(name="voc"), root="/nonexistent", split=split, paths=paths, class_names=list(VOC_CLASSES)
        )
        self.arrays = arrays

    def load_image(self, id):
        return self.arrays[id][0]

    def load_mask(self, id):
        return self.arrays[id][1]


def ramp_arrays(n=3, seed=0):
    """R = x, G = y (exact ramps); mask = vertical stripes 8 px wide, labels 1..20."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)
        mask = (1 + (xx // 8) % 20).astype(np.uint8)
        out[f"img{i}"] = (img, mask)
    return out


def write_store(path, dataset, vec_fn, *, k=3, failed=(), pending=(), wrong_size=(), shard_size=64, max_grid=(72, 72)):
    manifest = build_manifest(
        dataset=dataset.describe(),
        extractor={"name": "test", "architecture": "none", "weights_sha256": None},
        graph={"k": 1},
        solver={"solver": "test", "residual_tol": 1.0},
        num_eigs=k,
        layout={"shard_size": shard_size, "max_grid": list(max_grid), "eigvecs_dtype": "float16"},
    )
    with StoreWriter.open(path, ids=dataset.ids, manifest=manifest) as w:
        for shard in range(w.num_shards):
            results = []
            for i in w.shard_range(shard):
                id_ = dataset.ids[i]
                if id_ in pending:
                    continue
                if id_ in failed:
                    results.append(ImageResult(index=i, error=f"synthetic failure of {id_}"))
                    continue
                img, mask = dataset.load_image(id_), dataset.load_mask(id_)
                vecs = vec_fn(img, mask).astype(np.float16)
                size = (img.shape[0] + 1, img.shape[1]) if id_ in wrong_size else img.shape[:2]
                results.append(
                    ImageResult(
                        index=i,
                        image_size=size,
                        grid=vecs.shape[1:],
                        eigvecs=vecs,
                        eigvals=np.arange(k, dtype=np.float32),
                        residuals=np.zeros(k, np.float32),
                    )
                )
            w.write_shard(shard, results)
    return path


def ramp_vecs(img, mask):
    """v0 = 1, v1 = x (the R ramp), v2 = 1 where the label is even: a function of the mask."""
    return np.stack([np.ones(mask.shape), img[..., 0].astype(float), (mask % 2 == 0).astype(float)])


def _unnormalize(x):
    return x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


@pytest.mark.parametrize("stride", [1, 4])
def test_one_transform_for_image_mask_and_eigenvectors(tmp_path, stride):
    ds0 = ArrayDataset(ramp_arrays())
    store = write_store(tmp_path / "s.zarr", ds0, ramp_vecs)
    aug = AugmentConfig(crop_size=48, scale_min=0.7, scale_max=1.6, rotate=15)
    cfg = DataConfig(dataset="voc", fold=None, priors=str(store), prior_stride=stride, augment=aug, seed=3)
    ds = PriorSegDataset(cfg, dataset=ds0)
    checked_flip = set()
    for epoch, i in itertools.product(range(6), range(len(ds))):
        s = ds[(epoch, i)]
        img = _unnormalize(s["image"]) * 255  # R = source x, G = source y (bilinear of exact ramps)
        mask, vec, valid = s["mask"], s["eigvecs"], s["prior_valid"]
        assert vec.shape == (3, 48 // stride, 48 // stride) and valid.shape == vec.shape[1:]
        # image <-> eigenvector: v1 sampled at each cell centre = mean of the image's R over the
        # cell's central 2x2 (or 1x1) pixels, wherever the cell is well inside the source
        r = img[0]
        if stride > 1:
            r = torch.nn.functional.avg_pool2d(r[None, None, stride // 2 - 1 :, stride // 2 - 1 :], 2, stride)[0, 0]
        inner = valid & (torch.nn.functional.avg_pool2d((mask != 255).float()[None, None], stride)[0, 0] == 1)
        inner &= (vec[1] > 1) & (vec[1] < ds0.arrays[ds.ids[i]][0].shape[1] - 2)
        assert inner.sum() > 20
        assert (vec[1][inner] - r[inner]).abs().max() < 0.15  # float16 store + bilinear: sub-pixel agreement
        # mask <-> eigenvector: v2 == (label is even), on pixels whose 5x5 neighbourhood has one label
        if stride == 1:
            m = mask.float()[None, None]
            const = (torch.nn.functional.max_pool2d(m, 5, 1, 2) == -torch.nn.functional.max_pool2d(-m, 5, 1, 2))[0, 0]
            const &= (mask != 255) & valid
            const[:2], const[-2:], const[:, :2], const[:, -2:] = False, False, False, False  # window cut by the crop
            assert const.sum() > 50
            torch.testing.assert_close(vec[2][const], (mask[const] % 2 == 0).float(), atol=1e-4, rtol=0)
            # mask <-> image: stripe label = 1 + x // 8 where x is not near a stripe border
            x = img[0]
            safe = const & ((x % 8) > 1) & ((x % 8) < 7)
            assert torch.equal(mask[safe], (1 + (x[safe] + 0.5).floor().long() // 8 % 20))
        # padding (crop overhang, rotation corners): mask 255, priors invalid and zero
        assert (vec[:, ~valid] == 0).all()
        dx = np.sign(float(vec[1][inner].reshape(-1)[-1] - vec[1][inner].reshape(-1)[0]) or 1)
        checked_flip.add(dx)
    assert checked_flip == {1.0, -1.0}, "both flipped and unflipped samples were drawn"


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    ds0 = ArrayDataset(ramp_arrays())
    cfg = DataConfig(dataset="voc", fold=None, augment=AugmentConfig(crop_size=32), seed=1)
    ds = PriorSegDataset(cfg, dataset=ds0)
    a, b, c = ds[(2, 1)], ds[(2, 1)], ds[(3, 1)]
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    assert "eigvecs" not in a  # no store configured: no priors


def test_center_geometry_is_identity_like():
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.random.default_rng(1).integers(0, 5, (32, 32), dtype=np.uint8)
    out = warp_sample(img, mask, None, center_geometry((32, 32), 32), 32, 1)
    assert torch.equal(out["mask"], torch.from_numpy(mask).long())
    torch.testing.assert_close(out["image"] * 255, torch.from_numpy(img).permute(2, 0, 1).float(), atol=1e-3, rtol=0)


def test_unseen_pixels_are_ignored(tmp_path):
    ds0 = ArrayDataset(ramp_arrays(1))
    cfg = DataConfig(dataset="voc", fold=0, augment=AugmentConfig(crop_size=32, rotate=0, scale_min=1, scale_max=1))
    ds = PriorSegDataset(cfg, dataset=ds0)
    _, labels, _ = ds.load(0)
    raw = ds0.load_mask("img0")
    assert (labels[(raw >= 1) & (raw <= 5)] == 255).all()  # fold 0 holds out labels 1..5
    assert (labels[raw == 6] == 1).all()


def test_store_of_another_split_or_id_list_is_refused(tmp_path):
    arrays = ramp_arrays(4)
    val = write_store(tmp_path / "val.zarr", ArrayDataset(arrays, split="val"), ramp_vecs)
    cfg = DataConfig(dataset="voc", fold=None, priors=str(val))
    with pytest.raises(StoreMismatchError, match="holds priors of voc/val .* but training uses voc/train"):
        PriorSegDataset(cfg, dataset=ArrayDataset(arrays))
    part = write_store(tmp_path / "part.zarr", ArrayDataset(dict(list(arrays.items())[:2])), ramp_vecs)
    with pytest.raises(StoreMismatchError, match="no entry for 2 of the 4 training images"):
        PriorSegDataset(DataConfig(dataset="voc", fold=None, priors=str(part)), dataset=ArrayDataset(arrays))
    with pytest.raises(StoreMismatchError, match="num_eigs=5 but store"):
        PriorSegDataset(
            DataConfig(dataset="voc", fold=None, priors=str(part), num_eigs=5),
            dataset=ArrayDataset(dict(list(arrays.items())[:2])),
        )


def test_failed_pending_and_resized_images(tmp_path):
    ds0 = ArrayDataset(ramp_arrays(4))
    store = write_store(tmp_path / "f.zarr", ds0, ramp_vecs, failed={"img1"}, wrong_size={"img3"})
    cfg = DataConfig(dataset="voc", fold=None, priors=str(store), augment=AugmentConfig(crop_size=32))
    with pytest.raises(
        StoreMismatchError,
        match=r"1 training image\(s\) have failed priors .*img1: synthetic "
        r"failure of img1.*--skip-failed",
    ):
        PriorSegDataset(cfg, dataset=ds0)
    ds = PriorSegDataset(replace(cfg, skip_failed=True), dataset=ds0)
    assert ds.ids == ["img0", "img2", "img3"] and ds.skipped == {"img1": "synthetic failure of img1"}
    ds[0]
    with pytest.raises(StoreMismatchError, match="computed on a .* image but the dataset's image is"):
        ds[2]
    pend = write_store(tmp_path / "p.zarr", ds0, ramp_vecs, pending={"img2", "img3"}, shard_size=2)
    with pytest.raises(StoreMismatchError, match=r"incomplete: 2 training image\(s\) are pending"):
        PriorSegDataset(DataConfig(dataset="voc", fold=None, priors=str(pend)), dataset=ds0)


def test_sampler_resumes_mid_epoch():
    full = list(itertools.islice(EpochSampler(5, seed=4), 17))
    assert sorted(i for _, i in full[:5]) == list(range(5)) and full[5][0] == 1
    assert list(itertools.islice(EpochSampler(5, seed=4, start=7), 10)) == full[7:]


@pytest.fixture(scope="module")
def synth_voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    voc = make_voc(root, num_train=6, num_val=2, size=(64, 80))
    store = root / "train.zarr"
    rc = priors_cli.main(
        [
            "run",
            "--dataset",
            "voc",
            "--data",
            str(voc),
            "--split",
            "train",
            "--extractor",
            "color",
            "--short-side",
            "48",
            "--out",
            str(store),
            "--no-progress",
            "--preview",
            "0",
        ]
    )
    assert rc == 0
    return voc, store


def test_loader_workers_open_the_store_lazily(synth_voc):
    voc, store = synth_voc
    cfg = DataConfig(
        dataset="voc", root=str(voc), fold=0, priors=str(store), prior_stride=8, augment=AugmentConfig(crop_size=64)
    )
    ds = PriorSegDataset(cfg)
    assert ds.priors._store is None and ds.num_eigs == 8  # checked in the main process, then closed
    ds[0]
    assert ds.priors._store is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.priors._store is None and clone.ids == ds.ids
    loader = build_loader(ds, batch_size=2, num_workers=2, seed=0)
    batches = list(itertools.islice(iter(loader), 4))  # more than one epoch of 6 images
    b = batches[0]
    assert b["image"].shape == (2, 3, 64, 64) and b["mask"].shape == (2, 64, 64)
    assert b["eigvecs"].shape == (2, 8, 8, 8) and b["prior_valid"].dtype == torch.bool
    assert b["mask"].max() <= 255 and set(b["mask"].unique().tolist()) <= set(range(16)) | {255}
    # the same stream in the main process (no workers) gives the same batches
    same = list(itertools.islice(iter(build_loader(ds, batch_size=2, num_workers=0, seed=0)), 4))
    for x, y in zip(batches, same):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["eigvecs"], y["eigvecs"])
