"""The dataset registry: every reader by name, :func:`list_datasets` and :func:`build_dataset`.

Example::

    ds = build_dataset(DatasetConfig(name="voc", root="data/VOCdevkit/VOC2012", split="val"))
    image, mask = ds.load_image(ds.ids[0]), ds.load_mask(ds.ids[0])
"""

from __future__ import annotations

import logging

from .base import Dataset, DatasetConfig
from .camvid import CamVidDataset
from .coco import COCODataset
from .davis import DAVISDataset
from .folders import FolderDataset, MasksDataset, SampleDataset
from .voc import VOCDataset

logger = logging.getLogger(__name__)

DATASETS: dict[str, type[Dataset]] = {
    cls.name: cls
    for cls in (SampleDataset, FolderDataset, VOCDataset, COCODataset, DAVISDataset, MasksDataset, CamVidDataset)
}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def build_dataset(cfg: DatasetConfig) -> Dataset:
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose from {list_datasets()}")
    ds = DATASETS[cfg.name](cfg)
    logger.info("dataset %s/%s: %d images from %s", ds.name, ds.split, len(ds), ds.root)
    return ds
