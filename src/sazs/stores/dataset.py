"""``PriorDataset``: the priors of any list of image ids as a map-style dataset, for any trainer.

A ``torch.utils.data.DataLoader`` accepts any object with ``__len__`` and ``__getitem__``,
so this class needs no torch (``sazs.stores`` imports none). Samples are dicts of numpy
arrays, which the DataLoader's default collate turns into tensors::

    from torch.utils.data import DataLoader
    from sazs.stores import PriorDataset

    ds = PriorDataset("priors/voc-train.zarr", ids, transform=my_transform)
    for batch in DataLoader(ds, batch_size=8, num_workers=2):
        batch["eigvecs"]  # (B, K, h, w) once my_transform brings every image to one grid

The store is opened once in the constructing process to check the ids (all in the store,
none pending, none failed unless ``skip_failed``), then closed; each process that reads a
sample (every DataLoader worker) opens its own handle on first use, because a Zarr/fsspec
handle must not be pickled into, or inherited by, another process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .format import FAILED, PENDING, StoreError
from .reader import Prior, PriorStore, open_store

log = logging.getLogger(__name__)


class PriorDataset:
    """Priors of ``ids`` (default: every image of the store that has priors), in that order.

    ``dataset[i]`` is ``{"id", "index", "eigvecs" (K, h, w) float32, "eigvals" (K,),
    "grid" (2,), "image_size" (2,)}``, plus ``"image"`` = ``load_image(id)`` when given,
    passed through ``transform`` when given. ``num_eigs`` keeps the first K vectors.
    ``url`` may be an already open :class:`PriorStore` (its URL and options are reused).
    """

    def __init__(
        self,
        url: str | Path | PriorStore,
        ids: Sequence[str] | None = None,
        transform: Callable[[dict], Any] | None = None,
        *,
        num_eigs: int | None = None,
        load_image: Callable[[str], Any] | None = None,
        skip_failed: bool = False,
        storage_options: dict | None = None,
    ):
        store = url if isinstance(url, PriorStore) else open_store(url, storage_options=storage_options)
        self.url, self.storage_options = store.url, store.storage_options
        self.fingerprint = store.fingerprint
        self.transform, self.load_image = transform, load_image
        self.num_eigs = num_eigs or store.num_eigs
        if not 1 <= self.num_eigs <= store.num_eigs:
            raise ValueError(f"num_eigs={self.num_eigs} but store {store.url} holds K={store.num_eigs}")
        self.ids, self.skipped = self._check(store, store.done_ids() if ids is None else list(ids), skip_failed)
        self._store: PriorStore | None = None  # opened on first use, per process
        self._pid = -1

    @staticmethod
    def _check(store: PriorStore, ids: list[str], skip_failed: bool) -> tuple[list[str], dict[str, str]]:
        known = set(store.ids)
        missing = [i for i in ids if i not in known]
        if missing:
            raise KeyError(
                f"{len(missing)} of the {len(ids)} ids are not in store {store.url} (e.g. {missing[:3]}); "
                "it holds the priors of another image list"
            )
        status = store.status()
        pending = [i for i in ids if status[store.index(i)] == PENDING]
        if pending:
            raise StoreError(
                f"store {store.url} is incomplete: {len(pending)} of the ids are pending (e.g. "
                f"{pending[:3]}); finish it by re-running the sazs-priors command that wrote it"
            )
        failures = store.failures()
        failed = {i: failures[i] for i in ids if status[store.index(i)] == FAILED}
        if failed and not skip_failed:
            shown = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3])
            raise StoreError(
                f"{len(failed)} of the ids have failed priors in {store.url} ({shown}); pass "
                "skip_failed=True to leave them out"
            )
        if failed:
            log.warning("skipping %d image(s) whose priors failed (e.g. %s)", len(failed), list(failed)[:3])
        return [i for i in ids if i not in failed], failed

    @property
    def store(self) -> PriorStore:
        """This process's handle on the store (a forked worker opens its own)."""
        if self._store is None or self._pid != os.getpid():
            self._store = open_store(self.url, storage_options=self.storage_options)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None  # never ship an open store handle to a worker
        return state

    def __len__(self) -> int:
        return len(self.ids)

    def prior(self, i: int) -> Prior:
        """The :class:`Prior` of image ``i``, its first ``num_eigs`` vectors."""
        prior = self.store.get(self.ids[i])
        if self.num_eigs < len(prior.eigvals):
            k = self.num_eigs
            prior = Prior(
                id=prior.id,
                eigvals=prior.eigvals[:k],
                eigvecs=prior.eigvecs[:k],
                residuals=prior.residuals[:k],
                grid=prior.grid,
                image_size=prior.image_size,
            )
        return prior

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i = i % len(self)
        prior = self.prior(i)
        sample = {
            "id": prior.id,
            "index": i,
            "eigvecs": prior.eigvecs,
            "eigvals": prior.eigvals,
            "grid": np.asarray(prior.grid, np.int64),
            "image_size": np.asarray(prior.image_size, np.int64),
        }
        if self.load_image is not None:
            sample["image"] = self.load_image(prior.id)
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return f"PriorDataset({self.url!r}, images={len(self)}, K={self.num_eigs})"
