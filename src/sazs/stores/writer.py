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
places where the crash tests kill the process (core/faults.py).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from sazs.core.console import disk_error_message
from sazs.core.faults import fault_point
from sazs.core.files import TEMP_SUFFIX
from sazs.core.limits import MAX_IMAGES, MAX_STRING_BYTES

from . import codecs  # noqa: F401  (installs the bounded decoders before any store is opened)
from .format import (
    ARRAYS,
    CHECKSUM_FILE,
    DONE,
    FAILED,
    LOCK_FILE,
    PENDING,
    SIDE_FILES,
    STATUS_NAMES,
    StoreError,
    local_fs,
)
from .lock import acquire_lock
from .manifest import FORMAT_NAME, REQUIRED_KEYS, fingerprint_diff
from .marks import finalized_mark
from .reader import RegularFileStore
from .schema import check_layout, read_json_object, validate_store

log = logging.getLogger(__name__)

EIGVECS_DTYPE = "float16"
# What a writer creates at a store's root besides the side files (lock, checksums, summary).
_WRITER_ENTRIES = frozenset({"zarr.json", *ARRAYS})


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


def inspect_dir(path: str | Path) -> tuple[str, str]:
    """(kind, reason) of what ``path`` holds, reading nothing but a bounded root ``zarr.json``.

    kind is ``"empty"`` (absent, or only a lock), ``"store"`` (a Zarr group with a sazs
    manifest; whether it is intact is for ``validate_store`` to say), ``"leftover"`` (only
    what a sazs writer creates, without a usable manifest: e.g. a creation that crashed
    before the manifest was written) or ``"foreign"`` (anything else: never deleted).
    """
    path = Path(path)
    if not path.is_dir():
        return ("empty", "") if not path.exists() else ("foreign", "it is a file")
    names = {p.name for p in path.iterdir()} - {LOCK_FILE}
    if not names:
        return "empty", ""
    reason = "it has no zarr.json"
    if "zarr.json" in names:
        try:
            meta = read_json_object(local_fs(), str(path / "zarr.json"), f"{path}/zarr.json")
            attributes = meta.get("attributes") if isinstance(meta.get("attributes"), dict) else {}
            manifest = attributes.get("manifest")
            if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME:
                return "store", ""
            reason = "its zarr.json has no sazs manifest (was its creation interrupted?)"
        except (StoreError, OSError) as exc:
            reason = str(exc)
    ours = all(n in _WRITER_ENTRIES or n in SIDE_FILES or n.endswith(TEMP_SUFFIX) for n in names)
    if ours:
        return "leftover", reason
    shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
    return "foreign", f"it holds {shown}"


@contextlib.contextmanager
def disk_errors(path, doing: str):
    """Turn an OSError of a full or read-only disk into a StoreError naming ``path`` and the fix."""
    try:
        yield
    except OSError as exc:
        msg = disk_error_message(exc, path)
        if msg is None:
            raise
        raise StoreError(f"{doing}: {msg}") from None


def _refuse_foreign(path: Path, reason: str) -> StoreError:
    return StoreError(
        f"{path} exists and is not a prior store ({reason}); refusing to write into it or delete "
        f"it: choose another output path (--out / OUT=), or remove it yourself (rm -r {path}) if "
        "nothing in it is needed"
    )


def _refuse_leftover(path: Path, reason: str) -> StoreError:
    return StoreError(
        f"{path} is not a usable prior store ({reason}); it holds only what a sazs writer creates, "
        "so re-run with --overwrite (OVERWRITE=1) to replace it"
    )


class StoreWriter:
    """Creates a store, or reopens one with the same fingerprint to resume it.

    Use it as a context manager (or call ``close()``) so that the store's lock is released.
    """

    def __init__(self, group: zarr.Group, lock=None):
        self.group = group
        self.lock = lock  # stores.lock.StoreLock, or None for a writer built without open()
        self.closed = False
        self.path = str(getattr(group.store, "root", group.store))
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
    ) -> StoreWriter:
        """Create the store at ``path``, or resume it if it holds the same setting.

        A store with a different fingerprint is refused unless ``overwrite`` is set, in
        which case it is deleted first; so is a leftover without a usable manifest (a
        directory holding only what a writer creates, see ``inspect_dir``). Any other
        non-empty directory is never deleted. A store is resumed only after the checks
        the reader makes (``schema.validate_store``). The store's lock is taken first; a
        store locked by another writer (or a stale lock of a dead one) is refused unless
        ``take_over_lock`` is set.
        """
        path = Path(path)
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise StoreError(f"manifest is missing {missing}")
        if path.is_file():
            raise StoreError(f"{path} is a file, not a prior store directory")
        existed = path.exists()
        kind, reason = inspect_dir(path)
        if kind == "foreign":
            raise _refuse_foreign(path, reason)
        if kind == "leftover" and not overwrite:
            raise _refuse_leftover(path, reason)
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
    def _open_locked(cls, path: Path, *, ids: list[str], manifest: dict, overwrite: bool) -> StoreWriter:
        kind, reason = inspect_dir(path)  # again: it may have changed before we took the lock
        if kind == "foreign":
            raise _refuse_foreign(path, reason)
        if kind == "store" and not overwrite:
            if (path / CHECKSUM_FILE).exists() or finalized_mark(local_fs(), str(path)):
                raise StoreError(
                    f"{path} is finalised (immutable: it has checksums, or had them); write to another "
                    "path, or pass --overwrite (OVERWRITE=1) to replace it"
                )
            # Every check the reader makes (codecs allow-listed, sizes bounded, fingerprint
            # recomputed from the settings) before Zarr decodes anything of it.
            existing, _ = validate_store(local_fs(), str(path), str(path))
            if existing["fingerprint"] == manifest["fingerprint"]:
                log.info("resuming store %s", path)
                return cls(zarr.open_group(RegularFileStore(path), mode="r+", zarr_format=3))
            diff = "; ".join(fingerprint_diff(existing, manifest)) or "fingerprint differs"
            raise StoreError(
                f"{path} holds priors of a different setting ({diff}); "
                "choose another output path or pass --overwrite (OVERWRITE=1) to replace it"
            )
        if kind == "leftover" and not overwrite:
            raise _refuse_leftover(path, reason)
        if kind != "empty":
            log.warning("--overwrite: deleting the existing %s %s", "store" if kind == "store" else "leftover", path)
            for entry in path.iterdir():  # everything but the lock we hold
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        return cls._create(path, ids=ids, manifest=manifest)

    @classmethod
    def _create(cls, path: Path, *, ids: list[str], manifest: dict) -> StoreWriter:
        n = len(ids)
        if n == 0:
            raise StoreError("the dataset has no images; nothing to write")
        if n > MAX_IMAGES:
            raise StoreError(f"the dataset has {n} images; a store holds at most {MAX_IMAGES}")
        layout = manifest["layout"]
        s = max(1, min(int(layout["shard_size"]), n))
        layout["shard_size"] = s
        hmax, wmax = (int(x) for x in layout["max_grid"])
        k = int(manifest["num_eigs"])
        check_layout(k, [hmax, wmax], s, str(path))
        with disk_errors(path, "creating the store"):
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
            # The manifest goes last: a directory without it is not a store (inspect_dir), so a
            # crash during creation never leaves something that looks resumable (--overwrite
            # replaces such a leftover).
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

    def __enter__(self) -> StoreWriter:
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
        try:
            return np.asarray(self.group["status"][:])
        except (ValueError, TypeError, RuntimeError, KeyError) as exc:  # codecs.ChunkTooLarge is a ValueError
            raise StoreError(
                f"cannot decode {self.path}/status ({type(exc).__name__}: {exc}); the store is damaged: "
                "run `sazs-store verify` and re-create it (--overwrite)"
            ) from None

    def todo(self, *, retry_failed: bool = False) -> dict[int, list[int]]:
        """Images still to compute, grouped by shard (shard -> image indices)."""
        status = self.status()
        # A status byte that is not a defined value holds no result: recomputed like a pending one.
        undefined = ~np.isin(status, list(STATUS_NAMES))
        wanted = (status == PENDING) | (retry_failed & (status == FAILED)) | undefined
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
                # Readers decode at most MAX_STRING_BYTES a string (stores/codecs.py).
                errors[j] = r.error.encode()[:MAX_STRING_BYTES].decode(errors="ignore")
                status[j] = FAILED
        with disk_errors(self.path, f"writing shard {shard}"):
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
