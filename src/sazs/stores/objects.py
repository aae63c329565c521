"""The objects of a store: listing them (locally, on object storage, over plain HTTP) and hashing them.

Plain HTTP cannot list: there the objects are those the checksum file names that the server
has (one HEAD each). A failure of the server or the disk while hashing is one
:class:`TransportError` naming the object.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import dask
from dask.diagnostics import ProgressBar

from sazs.core.files import sha256_stream

from .format import CHECKSUM_FILE, SIDE_FILES, StoreError, TransportError, is_http
from .reader import TIMEOUT_HINT, http_errors, transport_text
from .schema import read_checksums


def _key(root: str, path: str) -> str:
    return path[len(root.rstrip("/")) + 1 :]


def list_objects(fs, root: str) -> dict[str, int]:
    """Every object of the store (key relative to the root → size), side files excluded.

    Plain HTTP cannot list: there the objects are those the checksum file names that the
    server has (one HEAD each).
    """
    if is_http(fs):
        return _served_objects(fs, root)
    found = fs.find(root, detail=True)
    return {
        _key(root, p): int(info.get("size") or 0)
        for p, info in found.items()
        if info.get("type", "file") == "file" and _key(root, p) not in SIDE_FILES
    }


def _served_objects(fs, root: str) -> dict[str, int]:
    expected = read_checksums(fs, root)
    if expected is None:
        raise StoreError(
            f"{root} has no {CHECKSUM_FILE}: over plain HTTP the objects of a store cannot be listed, "
            "only a finalised store can be read there; finalize it (sazs-store finalize) and publish "
            "it again"
        )

    def size(key: str) -> int | None:
        path = f"{root.rstrip('/')}/{key}"
        try:
            return int(fs.info(path).get("size") or 0)
        except FileNotFoundError as exc:
            # fsspec's HTTP info turns every failure into FileNotFoundError; only a 404 means missing.
            cause = exc.__cause__
            if cause is not None and getattr(cause, "status", None) != 404:
                raise TransportError(
                    f"cannot read {path} ({type(cause).__name__}: {cause}); check that the server is up, "
                    "then re-run" + TIMEOUT_HINT
                ) from None
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = dict(zip(expected, pool.map(size, expected)))
    return {k: n for k, n in sizes.items() if n is not None}


def sha256_of(fs, path: str) -> str:
    """SHA-256 of the object at ``path`` of ``fs``."""
    with fs.open(path, "rb") as f:
        return sha256_stream(f)


def _sha256_or_error(fs, path: str) -> str:
    """sha256_of, with a failure of the server or the disk turned into one StoreError naming ``path``."""
    try:
        return sha256_of(fs, path)
    except (OSError, *http_errors(fs)) as exc:
        raise TransportError(
            f"cannot read {path} ({transport_text(exc)}); check that the server is up, then re-run"
            + (TIMEOUT_HINT if is_http(fs) else "")
        ) from None


def hash_all(fs, root: str, keys: list[str], progress: bool) -> dict[str, str]:
    tasks = [dask.delayed(_sha256_or_error)(fs, f"{root.rstrip('/')}/{k}") for k in keys]
    with ProgressBar() if progress else contextlib.nullcontext():
        digests = dask.compute(*tasks, scheduler="threads")
    return dict(zip(keys, digests))
