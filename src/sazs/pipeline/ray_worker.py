"""What runs on the Ray workers of a priors job: decoding a shard's images, and the
long-lived `ShardWorker` actor that builds the extractor once and computes shards.

Every image is computed with the local executor's functions in the same batches
(`compute.load_images`, `compute.priors_of_shard`, `compute.solve_features`), so a store
written through Ray is bitwise identical to one written by `job.run_local` with as many
threads as an actor has. Ray itself is imported only where a worker asks for its context.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from sazs.core.faults import arm_from_environment, fault_point
from sazs.datasets.base import Dataset
from sazs.datasets.images import read_image
from sazs.features.extractors import ExtractorConfig, build_extractor
from sazs.features.types import Features
from sazs.stores.writer import ImageResult

from .compute import batches, extract_features, load_images, priors_of_shard, solve_features, to_result
from .graph import GraphConfig
from .spectral import SpectralConfig


@dataclass(frozen=True)
class ShardSource:
    """What a worker needs to decode a shard's images: absolute paths (workers do not share
    the driver's working directory) and the dataset's size check. Shipping the paths, not
    the Dataset, keeps big annotation indexes (COCO) off the workers. ``load`` is what
    ``Dataset.load_image`` does: ``read_image(path, min_side, max_pixels, root=image_root)``."""

    paths: dict[int, str]
    min_side: int
    max_pixels: int
    root: str | None  # the dataset's image_root (absolute), which no path may leave; None: no check

    @classmethod
    def of(cls, dataset: Dataset, indices: list[int]) -> ShardSource:
        return cls(
            {i: os.path.abspath(dataset.image_path(dataset.ids[i])) for i in indices},
            dataset.min_side,
            dataset.max_pixels,
            dataset.image_root,
        )

    def load(self, i: int) -> np.ndarray:
        return read_image(self.paths[i], self.min_side, self.max_pixels, root=self.root)


def decode_shard(source: ShardSource, indices: list[int]) -> dict[int, np.ndarray | ImageResult]:
    """A shard's decoded images (or the failures of unusable ones)."""
    return load_images(source.load, indices)


class Extracted(NamedTuple):
    """One image's features on their way from an actor to a solve task (solve_on="cpu-tasks")."""

    index: int
    image_size: tuple[int, int]
    features: Features
    image: np.ndarray | None  # only when the graph's colour term needs it


def solve_shard(items: list, graph_cfg: GraphConfig, spectral_cfg: SpectralConfig) -> list[ImageResult]:
    """Graph + spectrum of every image of a shard from ``ShardWorker.extract``'s output."""
    ready = [x for x in items if isinstance(x, Extracted)]
    solved = dict(
        zip((x.index for x in ready), solve_features([(x.image, x.features) for x in ready], graph_cfg, spectral_cfg))
    )
    return [to_result(x.index, x.image_size, solved[x.index]) if isinstance(x, Extracted) else x for x in items]


class ShardWorker:
    """A long-lived worker (a Ray actor): builds the extractor once, then computes shards."""

    def __init__(self, extractor_cfg: ExtractorConfig, graph_cfg: GraphConfig, spectral_cfg: SpectralConfig):
        arm_from_environment()  # a worker process: the driver's $SAZS_FAULT reaches it through the runtime env
        t0 = time.perf_counter()
        self.extractor = build_extractor(extractor_cfg)
        self.graph_cfg, self.spectral_cfg = graph_cfg, spectral_cfg
        self.batch = max(1, extractor_cfg.batch_size)
        self.startup_s = time.perf_counter() - t0

    def info(self) -> dict:
        import ray

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": str(self.extractor.device),
            "threads": torch.get_num_threads(),
            "startup_s": round(self.startup_s, 3),
            "provenance": self.extractor.provenance(),
            "max_grid": list(self.extractor.max_grid),
        }

    def _loaded(self, indices: list[int], images) -> dict:
        # A decode task's output (resolved by Ray), or the paths: then decode here.
        if not isinstance(images, dict):
            return decode_shard(images, indices)
        # Arrays from the object store are read-only views; torch warns on those.
        return {i: np.array(v) if isinstance(v, np.ndarray) and not v.flags.writeable else v for i, v in images.items()}

    def compute(self, indices: list[int], images) -> list[ImageResult]:
        """Features, graphs and spectra of a shard's images, batch by batch as ``run_local`` does."""
        fault_point("ray.actor_shard")
        return priors_of_shard(
            self._loaded(indices, images), indices, self.extractor, self.graph_cfg, self.spectral_cfg, batch=self.batch
        )

    def extract(self, indices: list[int], images) -> list[Extracted | ImageResult]:
        """Features only (solve_on="cpu-tasks"), in the same batches; failed loads pass through."""
        fault_point("ray.actor_shard")
        loaded = self._loaded(indices, images)
        keep_image = self.graph_cfg.color_weight > 0
        out: list[Extracted | ImageResult] = []
        for chunk in batches(indices, self.batch):
            ok = [i for i in chunk if isinstance(loaded[i], np.ndarray)]
            feats = dict(zip(ok, extract_features([loaded[i] for i in ok], self.extractor))) if ok else {}
            for i in chunk:
                if i not in feats:
                    out.append(loaded[i])
                elif isinstance(feats[i], Exception):
                    out.append(to_result(i, tuple(loaded[i].shape[:2]), feats[i]))
                else:
                    out.append(Extracted(i, tuple(loaded[i].shape[:2]), feats[i], loaded[i] if keep_image else None))
        return out
