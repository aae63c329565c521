"""The dataset registry: every reader by name, :func:`list_datasets` and :func:`build_dataset`.

Example::

    ds = build_dataset(DatasetConfig(name="voc", root="data/VOCdevkit/VOC2012", split="val"))
    image, mask = ds.load_image(ds.ids[0]), ds.load_mask(ds.ids[0])
"""

from __future__ import annotations

import logging

from sazs.core.registry import Registry

from .base import Dataset, DatasetConfig
from .camvid import CamVidDataset
from .coco import COCODataset
from .davis import DAVISDataset
from .folders import FolderDataset, MasksDataset, SampleDataset
from .voc import VOCDataset

logger = logging.getLogger(__name__)

# masks: what the dataset's masks are, for the quality tool: "object" (0 background, else the
# object: the single-object protocol), "labels" (class indices: label maps), None (no masks).
DATASETS: Registry[type[Dataset]] = Registry("dataset")
DATASETS.add("sample", SampleDataset, help="the colour photographs scikit-image ships", masks=None)
DATASETS.add("folder", FolderDataset, help="any folder of images, recursively", masks=None)
DATASETS.add("voc", VOCDataset, help="PASCAL VOC 2012 / 2007 segmentation (PASCAL-5i)", masks="labels")
DATASETS.add("coco", COCODataset, help="COCO 2014 / 2017 instances (COCO-20i)", masks="labels")
DATASETS.add("davis", DAVISDataset, help="DAVIS video object segmentation frames", masks="object")
DATASETS.add("masks", MasksDataset, help="salient objects: image and mask folders (ECSSD, DUTS, ...)", masks="object")
DATASETS.add("camvid", CamVidDataset, help="SegNet's CamVid-11 street scenes", masks="labels")


def list_datasets() -> list[str]:
    return DATASETS.names()


def datasets_with_masks(kind: str | None = None) -> list[str]:
    """Datasets whose masks are ``kind`` ("object" or "labels"), or that have masks at all."""
    return [
        n
        for n in DATASETS
        if DATASETS.entry(n).meta["masks"] is not None and kind in (None, DATASETS.entry(n).meta["masks"])
    ]


def build_dataset(cfg: DatasetConfig) -> Dataset:
    ds = DATASETS[cfg.name](cfg)
    logger.info("dataset %s/%s: %d images from %s", ds.name, ds.split, len(ds), ds.root)
    return ds
