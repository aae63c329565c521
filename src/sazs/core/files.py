"""Files written whole or not at all, and file digests.

``atomic_file`` writes to a temporary name in the destination's folder and renames it into
place, so a reader (or a crash) never sees half a file. The temporary name ends in
``.partial``, the suffix Zarr's local store uses too, so the store's ``finalize`` recognises
and removes what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` when the block ends, and vanishes if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name is cut so that the temporary name fits 255 bytes whenever the final one does.
    short = path.name.encode()[:200].decode(errors="ignore")
    tmp = path.with_name(f".{short}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic_file(path, fsync=fsync) as f:
        f.write(data)


def sha256_stream(f: BinaryIO) -> str:
    """SHA-256 of what remains in an open binary file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a local file; memoised on (path, size, mtime) so large weights are hashed once."""
    st = os.stat(path)
    return _sha256_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)
