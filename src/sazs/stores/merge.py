"""Merging stores computed on disjoint parts of one dataset (two teams, two clusters).

Rules, per image (the same rules are in FORMAT.md and `sazs-store merge --help`):

* every input must have the same fingerprint (same dataset ids, extractor, graph, solver);
* *done* beats *failed* beats *pending*;
* an image done in several inputs must hold identical numbers in each (bitwise, after the
  float16 storage); otherwise the merge stops with the list of conflicting ids, unless
  ``on_conflict="first"``, which takes the first input (in command-line order) that has it;
* a failed image keeps the reason from the first input that records it.

The merged store is written next to ``out`` under a temporary name and renamed into place
only when every shard is written, so a failed merge never leaves a half store at ``out``.
Shards are read, compared and written in parallel with dask's threaded scheduler; each
task owns one output shard.
"""

from __future__ import annotations

import copy
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .format import DONE, FAILED, StoreError
from .integrity import missing_objects
from .manifest import fingerprint_diff
from .objects import list_objects
from .reader import PriorStore, open_store, shard_workers
from .writer import ImageResult, StoreWriter

log = logging.getLogger(__name__)

ON_CONFLICT = ("error", "first")


def _read_shard(store: PriorStore, lo: int, hi: int) -> dict[str, np.ndarray]:
    g = store.group
    return {
        name: np.asarray(g[name][lo:hi])
        for name in ("status", "errors", "image_size", "grid", "eigvals", "residual", "eigvecs")
    }


def _has_data(part: dict[str, np.ndarray], j: int) -> bool:
    """Whether image ``j`` of a shard read by _read_shard holds data (missing chunks read as fill values)."""
    h, w = (int(x) for x in part["grid"][j])
    return h > 0 and w > 0 and not np.isnan(part["eigvals"][j]).all() and bool(part["eigvecs"][j][:, :h, :w].any())


def _merge_shard(writer: StoreWriter, stores: list[PriorStore], shard: int) -> list[str]:
    """Merge one shard into ``writer``; returns the ids done in several inputs with different numbers."""
    rng = writer.shard_range(shard)
    lo, hi = rng.start, rng.stop
    parts = [_read_shard(s, lo, hi) for s in stores]
    results, conflicts = [], []
    for j, i in enumerate(rng):
        done = [p for p in parts if p["status"][j] == DONE]
        if done:
            src = done[0]
            h, w = (int(x) for x in src["grid"][j])
            for part, store in zip(parts, stores):
                if part["status"][j] == DONE and not _has_data(part, j):
                    raise StoreError(
                        f"cannot merge {store.url}: image {stores[0].ids[i]!r} is marked done but its data is "
                        "missing (a chunk object was deleted); run `sazs-store verify` on it and re-compute it"
                    )
            for other in done[1:]:
                same = (
                    np.array_equal(other["grid"][j], src["grid"][j])
                    and np.array_equal(other["eigvals"][j], src["eigvals"][j], equal_nan=True)
                    and np.array_equal(other["eigvecs"][j], src["eigvecs"][j], equal_nan=True)
                )
                if not same:
                    conflicts.append(stores[0].ids[i])
                    break
            results.append(
                ImageResult(
                    index=i,
                    image_size=tuple(src["image_size"][j]),
                    grid=(h, w),
                    eigvals=src["eigvals"][j],
                    eigvecs=src["eigvecs"][j][:, :h, :w],
                    residuals=src["residual"][j],
                )
            )
            continue
        failed = [p for p in parts if p["status"][j] == FAILED]
        if failed:
            results.append(
                ImageResult(
                    index=i, image_size=tuple(failed[0]["image_size"][j]), error=str(failed[0]["errors"][j]) or "failed"
                )
            )
    if results:
        writer.write_shard(shard, results)
    return conflicts


def merge(
    out: str | Path,
    inputs: list[str],
    *,
    on_conflict: str = "error",
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> dict[str, int]:
    """Merge ``inputs`` (paths or URLs) into a new local store at ``out``; returns its counts."""
    import dask

    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"unknown on_conflict {on_conflict!r}; choose from {list(ON_CONFLICT)}")
    if len(inputs) < 2:
        raise StoreError("merge needs at least two input stores")
    stores = [open_store(u, storage_options=storage_options) for u in inputs]
    first = stores[0]
    for other in stores[1:]:
        if other.fingerprint != first.fingerprint:
            diff = "; ".join(fingerprint_diff(first.manifest, other.manifest)) or "fingerprints differ"
            raise StoreError(f"cannot merge {other.url} into {first.url}: different settings ({diff})")
        if other.ids != first.ids:
            raise StoreError(f"cannot merge {other.url}: its image ids differ from {first.url}'s")
    for store in stores:
        gone = missing_objects(store, list_objects(store.fs, store.root))
        if gone:
            id_, key = next(iter(gone.items()))
            raise StoreError(
                f"cannot merge {store.url}: {len(gone)} image(s) marked done lack their data objects (e.g. "
                f"{id_!r}: {key}); run `sazs-store verify` on it and re-compute or pull a good copy"
            )
    out = Path(out)
    if out.exists() and not overwrite:
        raise StoreError(f"{out} already exists; choose a new output path or pass --overwrite")
    tmp = out.with_name(out.name + ".merging")
    if tmp.exists():
        shutil.rmtree(tmp)
    manifest = copy.deepcopy(first.manifest)
    manifest["layout"]["max_grid"] = [max(int(s.manifest["layout"]["max_grid"][d]) for s in stores) for d in (0, 1)]
    manifest["merged_from"] = [
        {"url": s.url, "counts": s.counts(), "created": s.manifest.get("created")} for s in stores
    ]
    manifest["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    writer = StoreWriter.open(tmp, ids=first.ids, manifest=manifest)
    try:
        tasks = [dask.delayed(_merge_shard)(writer, stores, s) for s in range(writer.num_shards)]
        workers = shard_workers(first, copies=len(stores) + 1)
        conflicts = [c for part in dask.compute(*tasks, scheduler="threads", num_workers=workers) for c in part]
        if conflicts and on_conflict == "first":
            log.warning("%d conflicting image(s) taken from the first input that has them", len(conflicts))
        elif conflicts:
            raise StoreError(
                f"{len(conflicts)} image(s) are done in several inputs with different numbers: "
                f"{conflicts[:10]}{' ...' if len(conflicts) > 10 else ''}; pass --on-conflict first to take "
                "the first input's, or check how the inputs were computed"
            )
        counts = writer.counts()
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    writer.close()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("merged %d stores into %s: %s", len(stores), out, counts)
    return counts
