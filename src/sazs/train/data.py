"""Training data: images and masks of a pipeline dataset joined with their priors from a store.

One random geometric transform per sample (scale, rotation, horizontal flip, crop) is drawn
as a single affine map from output-crop pixels to source-image pixels, and that same map
samples the image (bilinear), the mask (nearest) and the eigenvector maps (bilinear, at the
coarser ``prior_stride`` resolution). The eigenvectors live on the extractor's patch grid,
which covers the whole image, so one normalised coordinate addresses both: they stay
aligned with the image whatever the scale, angle or crop.

Randomness is a function of (seed, epoch, image index) only, never of the worker or of the
order in which workers finish, so a resumed run sees exactly the batches the interrupted one
would have seen (the sampler restarts at the number of samples already consumed).

The priors are read through :class:`sazs.stores.PriorDataset`, which opens the store lazily
in each DataLoader worker (a Zarr/fsspec handle is not pickled into workers); the main
process opens it once to check that it belongs to the training set and to drop images whose
priors failed when ``skip_failed`` is set.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sazs.core.metrics import IGNORE_INDEX
from sazs.datasets.base import Dataset, DatasetConfig
from sazs.datasets.registry import build_dataset
from sazs.datasets.zeroshot import ZeroShotSplit, check_dataset_classes, zero_shot_split
from sazs.model.model import normalize
from sazs.stores.dataset import PriorDataset
from sazs.stores.reader import PriorStore, open_store

log = logging.getLogger(__name__)


class StoreMismatchError(ValueError):
    """The prior store does not belong to the training set (dataset, split, ids or images)."""


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: int = 512
    base_size: int | None = None  # short side before the random scale (None: crop_size)
    scale_min: float = 0.5
    scale_max: float = 2.0
    rotate: float = 10.0  # max |angle| in degrees
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.crop_size < 8:
            raise ValueError(f"crop_size must be >= 8, got {self.crop_size}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "voc"
    root: str | None = None
    split: str = "train"
    limit: int | None = None
    fold: int | None = 0  # None: every class seen
    unseen: str = "ignore"  # "ignore" (255) or "others" (folded into class 0)
    priors: str | None = None  # prior store path or URL; None: no priors
    storage_options: str | None = None  # JSON for fsspec (object storage)
    num_eigs: int | None = None  # use the first K eigenvectors (None: all in the store)
    skip_failed: bool = False  # drop images whose priors failed instead of refusing
    prior_stride: int = 8  # eigenvector maps at crop_size / prior_stride
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    views: int = 0  # 0: a fresh random view per epoch; N: N fixed views per image (feature cache)
    view_seed: int = 0  # fixed views are drawn from (view_seed, epoch mod N, index), not from seed


# ----------------------------------------------------------------------------- geometry


def random_geometry(rng: np.random.Generator, src_hw: tuple[int, int], cfg: AugmentConfig) -> np.ndarray:
    """(2, 3) affine map from output-crop pixel coordinates to source-image coordinates.

    Coordinates are continuous with pixel i covering [i, i+1). The image is scaled so its
    short side is ``base_size`` times a random factor, rotated by a random angle and mirrored
    about the crop centre, and a crop_size square is taken at a random offset (uniform over
    positions inside the image; where the image is smaller the crop overhangs, and the
    overhang is padding: ignore in the mask, not valid for the priors).
    """
    h, w = src_hw
    crop = cfg.crop_size
    scale = (cfg.base_size or crop) / min(h, w) * rng.uniform(cfg.scale_min, cfg.scale_max)
    angle = math.radians(rng.uniform(-cfg.rotate, cfg.rotate)) if cfg.rotate else 0.0
    flip = -1.0 if cfg.hflip and rng.random() < 0.5 else 1.0
    hs, ws = h * scale, w * scale
    oy = rng.uniform(min(0.0, hs - crop), max(0.0, hs - crop))
    ox = rng.uniform(min(0.0, ws - crop), max(0.0, ws - crop))
    cos, sin = math.cos(angle), math.sin(angle)
    rf = np.array([[cos * flip, -sin], [sin * flip, cos]])  # rotation after the mirror, in (x, y)
    c = np.array([crop / 2, crop / 2])
    a = rf / scale
    t = (c + np.array([ox, oy]) - rf @ c) / scale
    return np.concatenate([a, t[:, None]], axis=1)


def center_geometry(src_hw: tuple[int, int], crop: int) -> np.ndarray:
    """Deterministic counterpart: short side to ``crop``, centred square crop, no flip."""
    h, w = src_hw
    scale = crop / min(h, w)
    ox, oy = (w * scale - crop) / 2, (h * scale - crop) / 2
    return np.array([[1 / scale, 0.0, ox / scale], [0.0, 1 / scale, oy / scale]])


def sampling_grid(matrix: np.ndarray, out_size: int, stride: int, src_hw: tuple[int, int]) -> torch.Tensor:
    """grid_sample grid (1, n, n, 2), n = out_size // stride, for output cells of ``stride`` px.

    Each cell samples the source at the image of its centre; normalised for
    ``align_corners=False``, where -1 and 1 are the outer edges of the source.
    """
    n = out_size // stride
    centres = (np.arange(n) + 0.5) * stride
    xx, yy = np.meshgrid(centres, centres)
    pts = np.stack([xx, yy, np.ones_like(xx)], axis=-1) @ matrix.T  # (n, n, 2) source (x, y)
    h, w = src_hw
    norm = np.stack([2 * pts[..., 0] / w - 1, 2 * pts[..., 1] / h - 1], axis=-1)
    return torch.from_numpy(norm).float()[None]


def _inside(grid: torch.Tensor) -> torch.Tensor:
    return (grid.abs() <= 1).all(-1)[0]  # (n, n) bool


def warp_sample(
    image: np.ndarray, labels: np.ndarray, eigvecs: np.ndarray | None, matrix: np.ndarray, crop: int, prior_stride: int
) -> dict[str, torch.Tensor]:
    """Apply one geometry to image (H, W, 3) uint8, labels (H, W) uint8 and eigvecs (K, h, w).

    Returns "image" (3, crop, crop) float in [0, 1] (0 outside the source), "mask" (crop, crop)
    int64 (255 outside), and, with eigenvectors, "eigvecs" (K, n, n) float32 and
    "prior_valid" (n, n) bool, n = crop // prior_stride.
    """
    src_hw = image.shape[:2]
    grid = sampling_grid(matrix, crop, 1, src_hw)
    inside = _inside(grid)
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    img = img * inside
    lab = torch.from_numpy(np.ascontiguousarray(labels))[None, None].float()
    lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="border", align_corners=False)[0, 0]
    lab = torch.where(inside, lab, torch.full_like(lab, IGNORE_INDEX)).long()
    out = {"image": img.clamp_(0, 1), "mask": lab}
    if eigvecs is not None:
        pgrid = sampling_grid(matrix, crop, prior_stride, src_hw)
        vec = torch.from_numpy(np.ascontiguousarray(eigvecs, dtype=np.float32))[None]
        vec = F.grid_sample(vec, pgrid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        valid = _inside(pgrid)
        out["eigvecs"] = vec * valid
        out["prior_valid"] = valid
    return out


# ----------------------------------------------------------------------------- store checks


def check_store(store: PriorStore, dataset: Dataset, *, skip_failed: bool) -> tuple[list[str], dict[str, str]]:
    """Training ids that have priors, and {id: reason} of the ones skipped.

    Refuses (StoreMismatchError) a store of another dataset or split, a store missing some
    training ids, pending (not yet computed) images, and failed images unless ``skip_failed``.
    """
    ds = store.manifest.get("dataset", {})
    hint = (
        f"compute priors for the training set with: sazs-priors run --dataset {dataset.name} "
        f"--data {dataset.root} --split {dataset.split} (make priors DATASET={dataset.name} "
        f"DATA=... SPLIT={dataset.split})"
    )
    if ds.get("name") != dataset.name or ds.get("split") != dataset.split:
        raise StoreMismatchError(
            f"prior store {store.url} holds priors of {ds.get('name')}/{ds.get('split')} "
            f"({len(store)} images) but training uses {dataset.name}/{dataset.split}; {hint}"
        )
    known = set(store.ids)
    missing = [i for i in dataset.ids if i not in known]
    if missing:
        raise StoreMismatchError(
            f"prior store {store.url} has no entry for {len(missing)} of the {len(dataset)} training images "
            f"(e.g. {missing[:3]}); it was computed on another id list of {dataset.name}/{dataset.split}; {hint}"
        )
    status = store.status()
    index = [store.index(i) for i in dataset.ids]
    pending = [i for i, j in zip(dataset.ids, index) if status[j] == 0]
    if pending:
        raise StoreMismatchError(
            f"prior store {store.url} is incomplete: {len(pending)} training image(s) are pending "
            f"(e.g. {pending[:3]}); finish it by re-running the same sazs-priors command"
        )
    failures = store.failures()
    failed = {i: failures.get(i, "") for i, j in zip(dataset.ids, index) if status[j] == 2}
    if failed and not skip_failed:
        examples = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3])
        raise StoreMismatchError(
            f"{len(failed)} training image(s) have failed priors in {store.url} ({examples}); "
            "pass --skip-failed to train without them, or recompute with sazs-priors run --retry-failed"
        )
    if failed:
        log.warning("skipping %d image(s) whose priors failed (e.g. %s)", len(failed), list(failed)[:3])
    return [i for i in dataset.ids if i not in failed], failed


# ----------------------------------------------------------------------------- dataset


class PriorSegDataset(torch.utils.data.Dataset):
    """Augmented (image, training mask, eigenvector maps) samples of one dataset split.

    Indexed by ``(epoch, i)`` (what :class:`EpochSampler` yields) or by ``i`` (epoch 0).
    ``with_priors=False`` reads no store (CE-only training; the benchmark's baseline).
    """

    def __init__(self, cfg: DataConfig, *, with_priors: bool = True, dataset: Dataset | None = None):
        self.cfg = cfg
        self.split: ZeroShotSplit = zero_shot_split(cfg.dataset, cfg.fold, cfg.unseen)
        self.dataset = dataset or build_dataset(
            DatasetConfig(name=cfg.dataset, root=cfg.root, split=cfg.split, limit=cfg.limit)
        )
        check_dataset_classes(self.split, self.dataset.class_names)
        self.lut = self.split.label_map()
        self.with_priors = bool(with_priors and cfg.priors)
        self.ids: list[str] = list(self.dataset.ids)
        self.skipped: dict[str, str] = {}
        self.num_eigs = 0
        self.priors: PriorDataset | None = None
        if self.with_priors:
            opts = json.loads(cfg.storage_options) if cfg.storage_options else None
            store = open_store(cfg.priors, storage_options=opts)
            self.ids, self.skipped = check_store(store, self.dataset, skip_failed=cfg.skip_failed)
            k = cfg.num_eigs or store.num_eigs
            if k > store.num_eigs:
                raise StoreMismatchError(f"num_eigs={k} but store {store.url} holds K={store.num_eigs}")
            self.num_eigs = k
            self.store_fingerprint = store.fingerprint
            self.priors = PriorDataset(store, self.ids, num_eigs=k)  # reopened lazily in each worker
        if not self.ids:
            raise ValueError(f"no training images left in {self.dataset!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Image (H, W, 3) uint8, training labels (H, W) uint8 and eigenvectors (K, h, w) or None."""
        id_ = self.ids[i]
        image = self.dataset.load_image(id_)
        mask = self.dataset.load_mask(id_)
        if mask is None:
            raise ValueError(f"image {id_!r} of {self.dataset!r} has no mask")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask of {id_!r} is {mask.shape} but the image is {image.shape[:2]}")
        vecs = None
        if self.with_priors:
            prior = self.priors.prior(i)
            if tuple(prior.image_size) != tuple(image.shape[:2]):
                raise StoreMismatchError(
                    f"priors of {id_!r} in {self.cfg.priors} were computed on a {prior.image_size[0]}x"
                    f"{prior.image_size[1]} image but the dataset's image is {image.shape[0]}x{image.shape[1]}; "
                    "the store belongs to another copy of the dataset"
                )
            vecs = prior.eigvecs
        return image, self.lut[mask], vecs

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        image, labels, vecs = self.load(i)
        if self.cfg.views:  # one of N fixed views, the same in every run (their features are cached)
            rng = np.random.default_rng([self.cfg.view_seed, epoch % self.cfg.views, i])
        else:
            rng = np.random.default_rng([self.cfg.seed, epoch, i])
        matrix = random_geometry(rng, image.shape[:2], self.cfg.augment)
        crop = self.cfg.augment.crop_size
        out = warp_sample(image, labels, vecs, matrix, crop, self.cfg.prior_stride)
        out["image"] = normalize(out["image"])
        out["index"] = i
        # What identifies this view's pixels: the feature cache's key (with the backbone's).
        out["view"] = json.dumps(
            [
                self.dataset.name,
                str(self.dataset.root),
                self.ids[i],
                list(image.shape[:2]),
                np.round(matrix, 6).tolist(),
                crop,
            ]
        )
        return out


class EpochSampler(torch.utils.data.Sampler):
    """Endless stream of (epoch, index): a permutation per epoch drawn from (seed, epoch).

    ``start`` = samples already consumed, so a resumed run continues mid-epoch exactly.
    """

    def __init__(self, num_items: int, *, seed: int = 0, start: int = 0, shuffle: bool = True):
        self.n, self.seed, self.start, self.shuffle = num_items, seed, start, shuffle

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n)

    def __iter__(self):
        epoch, offset = divmod(self.start, self.n)
        while True:
            for i in self.order(epoch)[offset:]:
                yield epoch, int(i)
            epoch, offset = epoch + 1, 0


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode and warp; BLAS threads would only contend


def build_loader(
    ds: PriorSegDataset, *, batch_size: int, num_workers: int, start: int = 0, pin_memory: bool = False, seed: int = 0
) -> torch.utils.data.DataLoader:
    """Endless DataLoader over ``ds`` starting after ``start`` consumed samples."""
    sampler = EpochSampler(len(ds), seed=seed, start=start)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)
    return torch.utils.data.DataLoader(
        ds,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
