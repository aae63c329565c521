"""The vocabulary of a format-v1 prior store, shared by every store module.

Status codes of an image, the error every store operation raises, the names of the side
files at a store's root, the arrays a store holds, and how a path or URL becomes an fsspec
filesystem. The store modules (writer, reader, lock, integrity, ...) import these from here,
so none of them needs another to know what a store is. (A side file being written, like any
file of a store whose write never completed, ends in ``sazs.core.files.TEMP_SUFFIX``.)
"""

from __future__ import annotations

from pathlib import Path

from .http import http_options


class StoreError(Exception):
    """A store cannot be created, opened or written as asked."""


class TransportError(StoreError):
    """The server or the network failed (or broke a bound of core/limits.py): no image's fault."""


PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}

CHECKSUM_FILE = "sazs-checksums.sha256"
SUMMARY_FILE = "sazs-summary.json"
LOCK_FILE = ".sazs-lock"
SIDE_FILES = frozenset({CHECKSUM_FILE, SUMMARY_FILE, LOCK_FILE})


def default_store_path(dataset: str, split: str, extractor: str) -> str:
    """Where `sazs-priors run` writes a dataset split's store, and where train and eval look for it."""
    return f"priors/{dataset}-{split}-{extractor}.zarr"


def array_spec(num_images: int, num_eigs: int, max_grid: tuple[int, int]) -> dict[str, tuple[tuple, str]]:
    """Expected (shape, data type) of every array of a format-v1 store."""
    n, k = num_images, num_eigs
    return {
        "ids": ((n,), "string"),
        "image_size": ((n, 2), "int32"),
        "grid": ((n, 2), "int16"),
        "eigvals": ((n, k), "float32"),
        "eigvecs": ((n, k, *max_grid), "float16"),
        "residual": ((n, k), "float32"),
        "status": ((n,), "uint8"),
        "errors": ((n,), "string"),
    }


ARRAYS = tuple(array_spec(0, 1, (1, 1)))


def split_url(url: str | Path, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) for a local path or a URL such as s3://b/x.zarr.

    An http(s) URL is read through the bounded client of stores/http.py (sizes, timeouts,
    redirects)."""
    import fsspec

    return fsspec.core.url_to_fs(str(url), **http_options(str(url), storage_options))


def local_fs():
    """fsspec's local filesystem."""
    import fsspec

    return fsspec.filesystem("file")


def _protocols(fs) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_http(fs) -> bool:
    """True for fsspec's HTTP filesystem: plain web hosting, where objects cannot be listed."""
    protocols = _protocols(fs)
    return "http" in protocols or "https" in protocols


def is_local(fs) -> bool:
    """True for fsspec's local filesystem, where a path is a file of this machine."""
    protocols = _protocols(fs)
    return "file" in protocols or "local" in protocols
