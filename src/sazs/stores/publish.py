"""``publish``: upload a finalised local store to any fsspec URL, immutably and resumably.

What a published store is, and the order of the upload, is in stores/remote.py: the root
``zarr.json`` after every other object, the checksum file, the lock removed, the summary last.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from sazs.core.host import user_name

from .format import CHECKSUM_FILE, LOCK_FILE, SUMMARY_FILE, StoreError, is_local, local_fs, split_url
from .integrity import list_objects, read_checksums, verify
from .remote import MAX_WORKERS, ROOT_META, problems, read_object, sha256_hex, transfer
from .schema import parse_json_object

log = logging.getLogger(__name__)


def _read_json(fs, path: str, url: str) -> dict | None:
    data = read_object(fs, path)
    if data is None:
        return None
    return parse_json_object(data, f"{url}: {PurePosixPath(path).name}")


def _local_finalised(path: Path) -> tuple[dict, bytes]:
    """(summary, checksum-file bytes) of a finalised local store, or StoreError."""
    hint = f"finalize it first: sazs-store finalize {path}"
    if not (path / ROOT_META).is_file():
        raise StoreError(f"{path} is not a prior store (no {ROOT_META}); nothing to publish")
    checksums = path / CHECKSUM_FILE
    summary_path = path / SUMMARY_FILE
    if not checksums.is_file() or not summary_path.is_file():
        missing = CHECKSUM_FILE if not checksums.is_file() else SUMMARY_FILE
        raise StoreError(f"{path} is not finalised (no {missing}); {hint}")
    text = checksums.read_bytes()
    summary = parse_json_object(summary_path.read_bytes(), f"{path}/{SUMMARY_FILE}", f"; {hint}")
    if summary.get("checksums_sha256") != sha256_hex(text):
        raise StoreError(
            f"{path}/{SUMMARY_FILE} does not match {CHECKSUM_FILE} (edited after finalize?); "
            f"verify it (sazs-store verify {path}) and {hint}"
        )
    return summary, text


def publish(
    store_path: str | Path,
    url: str,
    *,
    storage_options: dict | None = None,
    progress: bool = True,
    max_workers: int = MAX_WORKERS,
) -> str:
    """Upload the finalised local store ``store_path`` to ``url`` (any fsspec URL); returns ``url``.

    Immutable and idempotent: if ``url`` already holds this store (same checksums) nothing
    is uploaded; if it holds another one, StoreError. An interrupted publish is resumed
    by calling ``publish`` again.
    """
    src = Path(store_path)
    summary, checksum_text = _local_finalised(src)
    identity = summary["checksums_sha256"]
    fs, root = split_url(url, storage_options)
    root = root.rstrip("/")

    published = _read_json(fs, f"{root}/{SUMMARY_FILE}", url)
    if published is not None:
        if published.get("checksums_sha256") == identity:
            log.info("%s already published at %s (same checksums); nothing to do", src, url)
            return url
        raise StoreError(
            f"a different store is already published at {url} (fingerprint "
            f"{str(published.get('fingerprint'))[:12]}, checksums {str(published.get('checksums_sha256'))[:12]}; "
            f"this one: fingerprint {str(summary.get('fingerprint'))[:12]}, checksums {identity[:12]}); "
            "published stores are immutable: publish to a new URL"
        )

    report = verify(str(src), progress=progress)
    if not report.ok:
        raise StoreError(
            f"{src} fails verification ({problems(report)}); not publishing a damaged store: "
            f"re-create it, or pull a good copy (sazs-store verify {src} for details)"
        )
    expected = read_checksums(local_fs(), str(src))
    sizes = {k: (src / k).stat().st_size for k in expected}

    # What is already there: nothing, our own interrupted upload, or something else.
    lock = _read_json(fs, f"{root}/{LOCK_FILE}", url) or {}
    if lock and "publishing" not in lock:
        raise StoreError(
            f"{url} is locked by a writer ({lock.get('owner', '?')} pid {lock.get('pid', '?')}, "
            f"command: {lock.get('command', '?')}); a store is being written there: "
            "publish to a new URL"
        )
    existing = list_objects(fs, root) if fs.exists(root) else {}
    foreign = sorted(set(existing) - set(expected))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise StoreError(
            f"{url} already holds {len(foreign)} object(s) that are not part of {src} ({shown}) "
            f"and no {SUMMARY_FILE}; it is not an interrupted upload of this store: "
            "delete it or publish to a new URL"
        )
    resuming = lock.get("publishing") == identity
    if resuming:
        keep = {k for k, size in existing.items() if sizes.get(k) == size}
        log.info(
            "resuming the interrupted publish of %s to %s: %d of %d object(s) already there",
            src,
            url,
            len(keep),
            len(expected),
        )
    else:
        keep = set()
        if existing:
            log.warning("%s holds an incomplete upload (no %s); overwriting it", url, SUMMARY_FILE)

    if is_local(fs):
        for parent in sorted({str(PurePosixPath(f"{root}/{k}").parent) for k in expected}):
            fs.makedirs(parent, exist_ok=True)
    # Same fields as a writer's lock (stores/lock.py), so `sazs-store` can describe it,
    # plus the identity of the store being uploaded.
    now = datetime.now(UTC).isoformat(timespec="seconds")
    token = {
        "owner": f"{user_name()}@{socket.gethostname()}",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now,
        "heartbeat": now,
        "command": f"publish {src.resolve()} {url}",
        "token": secrets.token_hex(8),
        "publishing": identity,
        "fingerprint": summary.get("fingerprint"),
    }
    _put_bytes(fs, f"{root}/{LOCK_FILE}", json.dumps(token, indent=2).encode(), url)

    def upload(key: str) -> None:
        fs.put_file(str(src / key), f"{root}/{key}")

    # Data first, the root zarr.json after it (a partial upload is not an openable store).
    todo = [(k, sizes[k]) for k in sorted(expected) if k not in keep and k != ROOT_META]
    transfer(todo, upload, what="uploading", url=url, progress=progress, max_workers=max_workers)
    if ROOT_META not in keep:
        transfer([(ROOT_META, sizes[ROOT_META])], upload, what="uploading", url=url, progress=False, max_workers=1)

    # Every object there with its size, and the upload still ours, before the summary commits it.
    there = list_objects(fs, root)
    short = sorted(k for k in expected if there.get(k) != sizes[k])
    if short:
        raise StoreError(
            f"after uploading, {len(short)} object(s) at {url} are missing or have the wrong size "
            f"({', '.join(short[:5])}); re-run publish to resume"
        )
    if (_read_json(fs, f"{root}/{LOCK_FILE}", url) or {}) != token:
        raise StoreError(
            f"another publish to {url} started while this one ran ({LOCK_FILE} changed); "
            "not marking the upload complete: check what is there and publish to a new URL"
        )
    _put_bytes(fs, f"{root}/{CHECKSUM_FILE}", checksum_text, url)
    try:
        fs.rm_file(f"{root}/{LOCK_FILE}")
    except OSError as exc:
        raise StoreError(
            f"removing {LOCK_FILE} from {url} failed ({type(exc).__name__}: {exc}); re-run publish to finish"
        ) from None
    _put_bytes(fs, f"{root}/{SUMMARY_FILE}", (src / SUMMARY_FILE).read_bytes(), url)  # last: marks completion
    log.info(
        "published %s to %s: %d object(s), %d uploaded, %.1f MB",
        src,
        url,
        len(expected),
        len(todo),
        sum(sizes.values()) / 1e6,
    )
    return url


def _put_bytes(fs, path: str, data: bytes, url: str) -> None:
    try:
        fs.pipe_file(path, data)
    except OSError as exc:
        raise StoreError(
            f"writing {PurePosixPath(path).name} to {url} failed ({type(exc).__name__}: {exc}); "
            "check the URL and credentials, then re-run"
        ) from None
