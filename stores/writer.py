"""Writing a prior store (Zarr v3), one shard at a time.

Layout (format v1, see DESIGN.md): one group with the arrays ``ids``, ``image_size``,
``grid``, ``eigvals``, ``eigvecs``, ``residual``, ``status`` and ``errors`` (the failure
message per image, beside ``status``). ``eigvecs`` has one chunk per image inside
shards of ``shard_size`` images; every other per-image array has one chunk per shard,
so a writer that owns a shard owns exactly one object of each array and no two writers
ever touch the same object.

Crash safety rests on ordering: the data of a shard is written first and its ``status``
chunk last, so an interrupted shard is still *pending* and is recomputed on resume.
(Zarr's local store writes each object to a temporary file and renames it into place.)

One writer at a time: ``StoreWriter.open`` takes the store's lock file (stores/lock.py)
and ``close()`` (or leaving the ``with`` block) gives it back. ``fault_point`` marks the
places where the crash tests kill the process (stores/faults.py).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .faults import fault_point
from .manifest import REQUIRED_KEYS, fingerprint_diff

log = logging.getLogger(__name__)

PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
EIGVECS_DTYPE = "float16"


class StoreError(Exception):
    """A store cannot be created, opened or written as asked."""


@dataclass
class ImageResult:
    """Outcome for one image: either the spectrum (``error is None``) or a failure."""

    index: int
    image_size: tuple[int, int] = (0, 0)
    grid: tuple[int, int] = (0, 0)
    eigvals: np.ndarray | None = None  # (K,)
    eigvecs: np.ndarray | None = None  # (K, h, w)
    residuals: np.ndarray | None = None  # (K,)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def is_store(path: str | Path) -> bool:
    root = Path(path) / "zarr.json"
    if not root.is_file():
        return False
    try:
        group = zarr.open_group(str(path), mode="r")
    except (OSError, ValueError, KeyError):
        return False
    return "manifest" in group.attrs


class StoreWriter:
    """Creates a store, or reopens one with the same fingerprint to resume it.

    Use it as a context manager (or call ``close()``) so that the store's lock is released.
    """

    def __init__(self, group: zarr.Group, lock=None):
        self.group = group
        self.lock = lock  # stores.lock.StoreLock, or None for a writer built without open()
        self.closed = False
        self.manifest: dict = dict(group.attrs["manifest"])
        layout = self.manifest["layout"]
        self.shard_size = int(layout["shard_size"])
        self.max_grid = tuple(int(x) for x in layout["max_grid"])
        self.num_eigs = int(self.manifest["num_eigs"])
        self.num_images = int(group["status"].shape[0])

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        ids: list[str],
        manifest: dict,
        overwrite: bool = False,
        take_over_lock: bool = False,
    ) -> "StoreWriter":
        """Create the store at ``path``, or resume it if it holds the same setting.

        A store with a different fingerprint is refused unless ``overwrite`` is set, in
        which case it is deleted first. A non-empty directory that is not a store is
        never deleted. The store's lock is taken first; a store locked by another writer
        (or a stale lock of a dead one) is refused unless ``take_over_lock`` is set.
        """
        # Imported here: lock.py needs LOCK_FILE from integrity.py, which imports this module.
        from .integrity import LOCK_FILE
        from .lock import acquire_lock

        path = Path(path)
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise StoreError(f"manifest is missing {missing}")
        if path.is_file():
            raise StoreError(f"{path} is a file, not a prior store directory")
        existed = path.exists()
        if existed and not is_store(path) and any(p.name != LOCK_FILE for p in path.iterdir()):
            raise StoreError(f"{path} exists and is not a prior store; refusing to write into it")
        lock = acquire_lock(path, take_over=take_over_lock)
        try:
            writer = cls._open_locked(path, ids=ids, manifest=manifest, overwrite=overwrite)
        except BaseException:
            lock.release()
            if not existed:
                with contextlib.suppress(OSError):
                    path.rmdir()  # only if empty: nothing but the lock was made
            raise
        writer.lock = lock
        return writer

    @classmethod
    def _open_locked(cls, path: Path, *, ids: list[str], manifest: dict, overwrite: bool) -> "StoreWriter":
        from .integrity import LOCK_FILE

        if is_store(path):
            if (path / "sazs-checksums.sha256").exists() and not overwrite:
                raise StoreError(f"{path} is finalised (immutable: it has checksums); write to another "
                                 "path, or pass --overwrite (OVERWRITE=1) to replace it")
            existing = dict(zarr.open_group(str(path), mode="r").attrs["manifest"])
            if existing.get("fingerprint") == manifest["fingerprint"] and not overwrite:
                log.info("resuming store %s", path)
                return cls(zarr.open_group(str(path), mode="r+"))
            if not overwrite:
                diff = "; ".join(fingerprint_diff(existing, manifest)) or "fingerprint differs"
                raise StoreError(
                    f"{path} holds priors of a different setting ({diff}); "
                    "choose another output path or pass --overwrite (OVERWRITE=1) to replace it"
                )
            log.warning("--overwrite: deleting the existing store %s", path)
            for entry in path.iterdir():  # everything but the lock we hold
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        elif any(p.name != LOCK_FILE for p in path.iterdir()):  # appeared before we took the lock
            raise StoreError(f"{path} exists and is not a prior store; refusing to write into it")
        return cls._create(path, ids=ids, manifest=manifest)

    @classmethod
    def _create(cls, path: Path, *, ids: list[str], manifest: dict) -> "StoreWriter":
        n = len(ids)
        if n == 0:
            raise StoreError("the dataset has no images; nothing to write")
        layout = manifest["layout"]
        s = max(1, min(int(layout["shard_size"]), n))
        layout["shard_size"] = s
        hmax, wmax = (int(x) for x in layout["max_grid"])
        k = int(manifest["num_eigs"])
        # Mode "a", not "w": "w" would empty the directory, lock file included ("w-" refuses
        # a directory holding the lock). The directory holds nothing else at this point.
        group = zarr.open_group(str(path), mode="a", zarr_format=3)
        group.create_array("ids", shape=(n,), dtype=str, chunks=(s,))
        group.create_array("image_size", shape=(n, 2), dtype="int32", chunks=(s, 2), fill_value=0)
        group.create_array("grid", shape=(n, 2), dtype="int16", chunks=(s, 2), fill_value=0)
        group.create_array("eigvals", shape=(n, k), dtype="float32", chunks=(s, k), fill_value=float("nan"))
        group.create_array("residual", shape=(n, k), dtype="float32", chunks=(s, k), fill_value=float("nan"))
        group.create_array(
            "eigvecs",
            shape=(n, k, hmax, wmax),
            dtype=EIGVECS_DTYPE,
            chunks=(1, k, hmax, wmax),
            shards=(s, k, hmax, wmax),
            fill_value=0,
        )
        group.create_array("errors", shape=(n,), dtype=str, chunks=(s,))
        group.create_array("status", shape=(n,), dtype="uint8", chunks=(s,), fill_value=PENDING)
        group["ids"][:] = np.asarray(ids, dtype=object)
        # The manifest goes last: a directory without it is not a store (is_store), so a
        # crash during creation never leaves something that looks resumable.
        group.attrs["manifest"] = manifest
        log.info("created store %s: %d images, %d shards of %d", path, n, -(-n // s), s)
        return cls(group)

    # -- lock --------------------------------------------------------------------------

    def close(self) -> None:
        """Release the store's lock; the writer cannot write afterwards. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shards ------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_images))

    def status(self) -> np.ndarray:
        return np.asarray(self.group["status"][:])

    def todo(self, *, retry_failed: bool = False) -> dict[int, list[int]]:
        """Images still to compute, grouped by shard (shard -> image indices)."""
        status = self.status()
        wanted = (status == PENDING) | (retry_failed & (status == FAILED))
        todo: dict[int, list[int]] = {}
        for i in np.flatnonzero(wanted):
            todo.setdefault(int(i) // self.shard_size, []).append(int(i))
        return todo

    def write_shard(self, shard: int, results: list[ImageResult]) -> None:
        """Write one shard's results; images of the shard not in ``results`` keep their data."""
        fault_point("write_shard.start")
        if self.closed:
            raise StoreError(f"the writer of {self.group.store} is closed")
        rng = self.shard_range(shard)
        start, stop = rng.start, rng.stop
        by_index = {r.index: r for r in results}
        if not set(by_index) <= set(rng):
            raise StoreError(f"results for images outside shard {shard} ({start}..{stop - 1})")
        g = self.group
        n, k = stop - start, self.num_eigs
        hmax, wmax = self.max_grid
        status = np.asarray(g["status"][start:stop])
        keep_old = len(by_index) < n and bool((status != PENDING).any())
        if keep_old:
            image_size = np.asarray(g["image_size"][start:stop])
            grid = np.asarray(g["grid"][start:stop])
            eigvals = np.asarray(g["eigvals"][start:stop])
            residual = np.asarray(g["residual"][start:stop])
            eigvecs = np.asarray(g["eigvecs"][start:stop])
            errors = np.asarray(g["errors"][start:stop], dtype=object)
        else:
            image_size = np.zeros((n, 2), np.int32)
            grid = np.zeros((n, 2), np.int16)
            eigvals = np.full((n, k), np.nan, np.float32)
            residual = np.full((n, k), np.nan, np.float32)
            eigvecs = np.zeros((n, k, hmax, wmax), EIGVECS_DTYPE)
            errors = np.full(n, "", dtype=object)
        for i, r in by_index.items():
            j = i - start
            image_size[j] = r.image_size
            grid[j] = 0
            eigvals[j] = np.nan
            residual[j] = np.nan
            eigvecs[j] = 0
            if r.ok:
                h, w = r.grid
                if h > hmax or w > wmax:
                    raise StoreError(f"grid {r.grid} of image {i} exceeds the store's max grid {self.max_grid}")
                if r.eigvecs.shape != (k, h, w):
                    raise StoreError(f"eigvecs of image {i} have shape {r.eigvecs.shape}, expected {(k, h, w)}")
                grid[j] = r.grid
                eigvals[j] = r.eigvals
                residual[j] = r.residuals
                eigvecs[j, :, :h, :w] = r.eigvecs
                errors[j] = ""
                status[j] = DONE
            else:
                errors[j] = r.error
                status[j] = FAILED
        if self.lock is not None:
            self.lock.heartbeat()  # also stops here if another writer took the lock over
        # Data first, status last (see module docstring).
        g["eigvecs"][start:stop] = eigvecs
        fault_point("write_shard.after_eigvecs")
        g["eigvals"][start:stop] = eigvals
        g["residual"][start:stop] = residual
        g["grid"][start:stop] = grid
        g["image_size"][start:stop] = image_size
        g["errors"][start:stop] = errors
        fault_point("write_shard.after_data")
        g["status"][start:stop] = status
        fault_point("write_shard.after_status")

    def counts(self) -> dict[str, int]:
        status = self.status()
        return {name: int((status == code).sum()) for code, name in STATUS_NAMES.items()}
