"""Reading a prior store from a local path or an object-storage URL.

``open_store(url)`` validates the store before any chunk is decoded (stores/schema.py):
the manifest (format, major version, required fields, limits on its sizes, the
fingerprint recomputed from its settings) and, for every array, the raw ``zarr.json``
(size and nesting bounded, codecs, data type, shape). Only a fixed list of codecs is
accepted, so a store from somewhere else can never make the reader run code it names (no
pickle, no plugins).

Per-image metadata (ids, status, grid, eigenvalues, residuals) is small and read once,
on first use; ``get(id)`` then costs one byte-range read of the image's eigenvector chunk.

Plain web hosting (``http://``, ``https://``: any static web server or public bucket
serving a published store's files) goes through fsspec's HTTP filesystem (aiohttp). Reading
needs no listing, only GETs of known keys; the server must answer byte-range requests
(every common one does), which is checked once on opening.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from sazs.core.limits import MAX_PARALLEL_BYTES

from . import codecs  # noqa: F401  (installs the bounded decoders before any store is opened)
from .format import ARRAYS, DONE, FAILED, PENDING, StoreError, TransportError, is_http, is_local, split_url
from .http import http_options, redirect_refused, response_too_large
from .marks import image_size_problem
from .schema import read_checksums, validate_store
from .verified import VerifiedStore

log = logging.getLogger(__name__)

# Reads of an http(s):// store, each retried this many times in all when the connection fails.
HTTP_ATTEMPTS = 3
TIMEOUT_HINT = " (bounds: $SAZS_HTTP_TIMEOUT_S, $SAZS_HTTP_READ_TIMEOUT_S, $SAZS_MAX_HTTP_BYTES; see core/limits.py)"


@dataclass
class Prior:
    """The priors of one image: eigenvectors (K, h, w) on its patch grid."""

    id: str
    eigvals: np.ndarray  # (K,) float32 ascending
    eigvecs: np.ndarray  # (K, h, w) float32
    residuals: np.ndarray  # (K,) float32
    grid: tuple[int, int]
    image_size: tuple[int, int]


def http_errors(fs) -> tuple[type[BaseException], ...]:
    """What reading from ``fs`` raises, besides OSError, when the network or the server fails:
    for HTTP aiohttp's errors (a dropped connection, an HTTP 5xx) and timeouts; else nothing."""
    if not is_http(fs):
        return ()
    import aiohttp

    return (aiohttp.ClientError, TimeoutError)


def transport_text(exc: BaseException) -> str:
    """``Type: message`` of a network failure; a timeout (which carries no message) says so."""
    text = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else "no message")
    return f"{type(exc).__name__}: {text}"


def check_http_store(fs, root: str, url: str) -> None:
    """Fail in one line, naming ``url`` and the fix, unless the server holds a root zarr.json and answers ranges.

    Zarr reads each image's eigenvectors as a byte range of a shard; a server that ignores
    ``Range`` (``python -m http.server`` before Python 3.14, some proxies) would hand back whole
    shards, which fail to decode far from the cause.
    """
    where = f"{url.rstrip('/')}/zarr.json"
    try:
        head = fs.cat_file(f"{root.rstrip('/')}/zarr.json", start=0, end=1)
    except FileNotFoundError:
        raise StoreError(
            f"{url} is not a prior store ({where} is not found, HTTP 404); check the URL, and "
            "serve the files of a finalised store there (sazs-store publish STORE DIR, then serve "
            "DIR)"
        ) from None
    except response_too_large():  # more than the one byte asked for: the Range header was ignored
        head = b"  "
    except (OSError, *http_errors(fs)) as exc:
        raise StoreError(
            f"cannot read {where} ({transport_text(exc)}); check the URL and that the server "
            "is up and readable without credentials, then re-run"
        ) from None
    if len(head) != 1:
        raise StoreError(
            f"the server of {url} ignores HTTP Range requests (asked for 1 byte of zarr.json, got "
            f"{len(head)}); serve the store with one that supports them (nginx, Caddy, Apache, any "
            "object-storage bucket)"
        )


class RegularFileStore(LocalStore):
    """Zarr's LocalStore that reads only regular files: a chunk object that is a FIFO would block
    a read forever, a device would never end; either is a damaged object (ValueError)."""

    def _check(self, key: str) -> None:
        try:
            mode = os.stat(self.root / key).st_mode
        except OSError:
            return  # absent (or not a folder): Zarr reads it as absent
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ValueError(f"{self.root / key} is not a regular file (a FIFO, socket or device)")

    async def get(self, key, prototype=None, byte_range=None):
        self._check(key)
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            self._check(key)
        return await super().get_partial_values(prototype, key_ranges)


class PriorStore:
    """Read-only view of a prior store (local path or fsspec URL)."""

    def __init__(self, url: str | Path, *, storage_options: dict | None = None):
        self.url = str(url)
        self.storage_options = storage_options or {}
        self.fs, self.root = split_url(url, self.storage_options)
        self._http_errors = http_errors(self.fs)
        if is_http(self.fs):
            check_http_store(self.fs, self.root, self.url)
        # Every zarr.json is checked (bounded, codecs allow-listed, shapes within limits)
        # before Zarr parses any of them.
        self.manifest, _ = validate_store(self.fs, self.root, self.url)
        layout = self.manifest["layout"]
        self.num_eigs = int(self.manifest["num_eigs"])
        self.max_grid = tuple(int(x) for x in layout["max_grid"])
        try:
            self.group = zarr.open_group(self._zarr_store(), mode="r", zarr_format=3)
            # Parse every array's metadata now (not at first use) and keep the handles:
            # re-opening an array per read would double the cost of a random-access get().
            self._arrays = {name: self.group[name] for name in ARRAYS}
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreError(
                f"cannot open {self.url}: damaged metadata ({type(exc).__name__}: {exc}); "
                "run `sazs-store verify` and pull or re-create the store"
            ) from None
        self.ids: list[str] = [str(x) for x in self._read("ids")]
        self._index = {id_: i for i, id_ in enumerate(self.ids)}

    def _zarr_store(self):
        if is_local(self.fs):
            return RegularFileStore(self.root, read_only=True)
        if not getattr(self.fs, "async_impl", False):
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            return FsspecStore(AsyncFileSystemWrapper(self.fs, asynchronous=True), path=self.root, read_only=True)
        # Zarr runs its own event loop; self.fs (sync, e.g. s3fs or http) is bound to fsspec's
        # loop, where its HTTP session lives ("attached to a different loop"), so Zarr gets its
        # own asynchronous instance. Over HTTP a finalised store's objects are checked against
        # its checksum file (stores/verified.py).
        options = http_options(self.url, self.storage_options)
        checksums = read_checksums(self.fs, self.root) if is_http(self.fs) else None
        if checksums:
            return VerifiedStore.from_url(self.url, storage_options=options, read_only=True).verified(
                checksums, self.url
            )
        return FsspecStore.from_url(self.url, storage_options=options, read_only=True)

    # -- metadata --------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"PriorStore({self.url!r}, images={len(self)}, K={self.num_eigs}, fingerprint={self.fingerprint[:12]})"

    @cached_property
    def _meta(self) -> dict[str, np.ndarray]:
        return {name: self._read(name) for name in ("status", "grid", "image_size", "eigvals", "residual")}

    def _read(self, name: str, selection=slice(None)) -> np.ndarray:
        # A web server that drops a connection now and then must not end a training run:
        # over HTTP a failed read is retried (s3fs and gcsfs retry inside themselves).
        attempts = HTTP_ATTEMPTS if is_http(self.fs) else 1
        for attempt in itertools.count(1):
            try:
                return np.asarray(self._arrays[name][selection])
            except self._http_errors as exc:
                # A dropped connection is retried; a timeout, an oversized answer or a redirect elsewhere is not.
                final = isinstance(exc, TimeoutError | response_too_large() | redirect_refused())
                if attempt == attempts or final:
                    raise TransportError(
                        f"cannot read {self.url}/{name}: {transport_text(exc)} (after {attempt} "
                        "attempt(s)); check that the server is up, then re-run" + (TIMEOUT_HINT if final else "")
                    ) from None
                log.warning("reading %s/%s failed (%s: %s); retrying", self.url, name, type(exc).__name__, exc)
            except (KeyError, ValueError, RuntimeError, TypeError, OSError) as exc:
                raise StoreError(
                    f"cannot decode {self.url}/{name} ({type(exc).__name__}: {exc}); the object is "
                    "truncated or damaged: run `sazs-store verify` and pull or re-create the "
                    "store"
                ) from None

    def status(self) -> np.ndarray:
        return self._meta["status"]

    def done_ids(self) -> list[str]:
        return [self.ids[i] for i in np.flatnonzero(self.status() == DONE)]

    def failures(self) -> dict[str, str]:
        failed = np.flatnonzero(self.status() == FAILED)
        if not len(failed):
            return {}
        errors = self._read("errors")
        return {self.ids[i]: str(errors[i]) for i in failed}

    def counts(self) -> dict[str, int]:
        status = self.status()
        return {
            "done": int((status == DONE).sum()),
            "failed": int((status == FAILED).sum()),
            "pending": int((status == PENDING).sum()),
        }

    def index(self, id_: str) -> int:
        try:
            return self._index[id_]
        except KeyError:
            raise KeyError(f"image id {id_!r} is not in store {self.url}") from None

    # -- priors ----------------------------------------------------------------------------

    def get(self, id_: str) -> Prior:
        """Eigenvectors of one image cropped to its grid (K, h, w), with eigenvalues and residuals."""
        i = self.index(id_)
        meta = self._meta
        status = int(meta["status"][i])
        if status not in (DONE, FAILED, PENDING):
            raise StoreError(
                f"no priors for {id_!r} in {self.url}: its status is {status}, not a defined value; "
                "the store is damaged: run `sazs-store verify`"
            )
        if status != DONE:
            reason = str(self._read("errors", i)) if status == FAILED else "not computed yet"
            raise StoreError(f"no priors for {id_!r} in {self.url}: {reason}")
        h, w = (int(x) for x in meta["grid"][i])
        eigvals = meta["eigvals"][i]
        # A chunk that is missing reads back as its fill value (grid 0, NaN, zeros): for an
        # image marked done that is damage, never data.
        missing = (
            "grid"
            if not (0 < h <= self.max_grid[0] and 0 < w <= self.max_grid[1])
            else "eigvals"
            if np.isnan(eigvals).all()
            else ""
        )
        eigvecs = None
        if not missing and (bad := image_size_problem(meta["image_size"][i], (h, w))):
            raise StoreError(
                f"no priors for {id_!r} in {self.url}: its {bad} is impossible (the store is damaged); "
                "run `sazs-store verify` and pull or re-create the store"
            )
        if not missing:
            eigvecs = self._read("eigvecs", (i, slice(None), slice(0, h), slice(0, w)))
            missing = "" if eigvecs.any() else "eigvecs"
        if missing:
            raise StoreError(
                f"no priors for {id_!r} in {self.url}: it is marked done but its {missing} data is "
                "missing (the chunk object was deleted or never written); the store is damaged: "
                "run `sazs-store verify` and pull or re-create the store"
            )
        return Prior(
            id=id_,
            eigvals=eigvals.copy(),
            eigvecs=eigvecs.astype(np.float32),
            residuals=meta["residual"][i].copy(),
            grid=(h, w),
            image_size=(int(meta["image_size"][i][0]), int(meta["image_size"][i][1])),
        )

    def get_many(self, ids: list[str]) -> list[Prior]:
        return [self.get(id_) for id_ in ids]

    # -- dataset-wide views ------------------------------------------------------------------

    def to_dask(self) -> dict:
        """Every array as a lazy dask array, chunked as stored (eigvecs: one image per chunk)."""
        import dask.array as da

        return {name: da.from_zarr(array) for name, array in self._arrays.items()}


def shard_workers(store: PriorStore, copies: int = 1) -> int:
    """Threads that may each hold one shard of ``copies`` stores like ``store`` at once, within
    MAX_PARALLEL_BYTES (verify and merge; at least one, at most the CPU count)."""
    per = int(store.manifest["layout"]["shard_size"]) * store.num_eigs * (store.max_grid[0] * store.max_grid[1] * 2 + 8)
    return max(1, min(os.cpu_count() or 1, MAX_PARALLEL_BYTES // max(per * copies, 1)))


def open_store(url: str | Path, *, storage_options: dict | None = None) -> PriorStore:
    """Open a prior store read-only: a local path, or s3://, gs://, https://, memory://... through fsspec."""
    return PriorStore(url, storage_options=storage_options)
