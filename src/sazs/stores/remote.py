"""Published prior stores, and what publishing and pulling share.

A published store is an exact copy of a finalised local store under any fsspec URL
(``s3://bucket/priors/voc-val.zarr``, ``gs://...``, ``memory://...``, a local path), so
``open_store(url)`` and ``verify(url)`` work on it directly.

Published stores are immutable. ``sazs-summary.json`` is uploaded **last**: its presence
marks a complete upload, and its ``checksums_sha256`` identifies the store. Publishing
the same store again is a no-op; publishing a different one to the same URL is refused.
While an upload runs, the destination holds a ``.sazs-lock`` naming the store being
uploaded (its ``checksums_sha256``), so an interrupted publish is resumed by re-running
it: objects already there with the right size are kept (object stores write each
object atomically), the rest are uploaded. The root ``zarr.json`` goes up after every
other object, so a partial upload is never mistaken for a store by a reader.

``pull`` downloads into a hidden sibling directory, verifies it, and only then renames
it into place: a failed or interrupted pull never leaves a half store at the
destination.

Plain web hosting: a published store is a tree of static files, so any web server or
public bucket that serves them makes it readable at ``https://host/path/x.zarr``
(``open_store``, ``pull``, ``verify``, training and evaluation), through fsspec's HTTP
filesystem. HTTP cannot list a directory, so everything works from known keys: the
summary and checksum file name every object. ``publish`` needs a writable destination (a
local directory that the web server serves, or the bucket's own s3:// / gs:// URL).
Over HTTP a download that fails on the way (a dropped connection, an HTTP 5xx) is retried.

``publish`` is in stores/publish.py, ``pull`` in stores/pull.py; this module holds the
transfer of objects in parallel threads and the reading of single objects that both use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

from .format import StoreError
from .integrity import DAMAGE, VerifyReport
from .reader import http_errors

# Object-store transfers are network-bound, not CPU-bound: a few threads hide latency.
MAX_WORKERS = 8
ROOT_META = "zarr.json"


def sha256_hex(data: bytes) -> str:
    """SHA-256 (hex) of ``data``: the identity of a published store is that of its checksum file."""
    return hashlib.sha256(data).hexdigest()


def read_object(fs, path: str) -> bytes | None:
    """Bytes of one object, or None if it does not exist; StoreError if the server cannot be read."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except (OSError, *http_errors(fs)) as exc:
        raise StoreError(
            f"cannot read {path} ({type(exc).__name__}: {exc}); check the URL, the credentials "
            "and that the server is up, then re-run"
        ) from None


def transfer(
    jobs: list[tuple[str, int | None]],
    do: Callable[[str], int | None],
    *,
    what: str,
    url: str,
    progress: bool,
    max_workers: int,
    total: int | None = None,
) -> None:
    """Run ``do(key)`` for every (key, size) in parallel threads, with a byte progress bar.

    A size of None (HTTP: unknown before the download) counts what ``do`` returns.
    """
    if not jobs:
        return
    from tqdm import tqdm

    total = total or sum(size or 0 for _, size in jobs)
    with (
        tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=not progress, leave=False
        ) as bar,
        ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs)))) as pool,
    ):
        futures = {pool.submit(do, key): (key, size) for key, size in jobs}
        try:
            for fut in as_completed(futures):
                key, size = futures[fut]
                try:
                    done = fut.result()
                except OSError as exc:
                    raise StoreError(
                        f"{what} {key} failed for {url} ({type(exc).__name__}: {exc}); "
                        "check the URL and credentials, then re-run"
                    ) from None
                bar.update(size if size is not None else done or 0)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def problems(report: VerifyReport, limit: int = 5) -> str:
    """The damage ``verify`` found, in one line (at most ``limit`` items of each kind)."""
    parts = []
    for name in DAMAGE:
        items = getattr(report, name)
        if items:
            shown = ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
            parts.append(f"{name}: {shown}")
    return "; ".join(parts)
