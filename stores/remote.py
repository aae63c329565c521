"""Publishing a finalised prior store to object storage, and pulling it back.

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
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from .integrity import (
    CHECKSUM_FILE,
    DAMAGE,
    LOCK_FILE,
    SUMMARY_FILE,
    VerifyReport,
    list_objects,
    read_checksums,
    verify,
)
from .reader import http_errors, is_http, split_url
from .schema import StoreError, parse_json

log = logging.getLogger(__name__)

# Object-store transfers are network-bound, not CPU-bound: a few threads hide latency.
MAX_WORKERS = 8
# Over HTTP each download is tried this many times in all, waiting RETRY_WAIT_S * attempt between tries.
HTTP_ATTEMPTS = 3
RETRY_WAIT_S = 1.0
ROOT_META = "zarr.json"


# -- helpers ------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cat(fs, path: str) -> bytes | None:
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


def _read_json(fs, path: str, url: str) -> dict | None:
    data = _cat(fs, path)
    if data is None:
        return None
    return _json_object(data, f"{url}: {PurePosixPath(path).name}")


def _json_object(data: bytes, where: str, hint: str = "") -> dict:
    """`data` parsed as a JSON object (size and depth bounded first), or a StoreError naming `where` (and `hint`)."""
    out = parse_json(data, where, hint)
    if not isinstance(out, dict):
        raise StoreError(f"{where} is not a JSON object{hint}")
    return out


def _safe_key(key: str, url: str) -> str:
    """Refuse object keys that would escape the store directory (``..``, absolute paths)."""
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StoreError(
            f"{url}/{CHECKSUM_FILE} lists the object key {key!r}, which is not a plain relative "
            "path; refusing to transfer it (the store was not written by sazs or was tampered with)"
        )
    return key


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _transfer(
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


def _problems(report: VerifyReport, limit: int = 5) -> str:
    parts = []
    for name in DAMAGE:
        items = getattr(report, name)
        if items:
            shown = ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
            parts.append(f"{name}: {shown}")
    return "; ".join(parts)


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
    summary = _json_object(summary_path.read_bytes(), f"{path}/{SUMMARY_FILE}", f"; {hint}")
    if summary.get("checksums_sha256") != _sha256(text):
        raise StoreError(
            f"{path}/{SUMMARY_FILE} does not match {CHECKSUM_FILE} (edited after finalize?); "
            f"verify it (sazs-store verify {path}) and {hint}"
        )
    return summary, text


# -- publish ------------------------------------------------------------------------------


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
            f"{src} fails verification ({_problems(report)}); not publishing a damaged store: "
            f"re-create it, or pull a good copy (sazs-store verify {src} for details)"
        )
    local_fs = _local_fs()
    expected = read_checksums(local_fs, str(src))
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

    if _is_local(fs):
        for parent in sorted({str(PurePosixPath(f"{root}/{k}").parent) for k in expected}):
            fs.makedirs(parent, exist_ok=True)
    # Same fields as a writer's lock (stores/lock.py), so `sazs-store` can describe it,
    # plus the identity of the store being uploaded.
    now = datetime.now(UTC).isoformat(timespec="seconds")
    token = {
        "owner": f"{_user()}@{socket.gethostname()}",
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
    _transfer(todo, upload, what="uploading", url=url, progress=progress, max_workers=max_workers)
    if ROOT_META not in keep:
        _transfer([(ROOT_META, sizes[ROOT_META])], upload, what="uploading", url=url, progress=False, max_workers=1)

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


def _local_fs():
    import fsspec

    return fsspec.filesystem("file")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# -- pull ---------------------------------------------------------------------------------


def _parse_summary(data: bytes | None, url: str) -> dict:
    if data is None:
        raise StoreError(
            f"{url} is not a published store / upload incomplete (no {SUMMARY_FILE}); "
            "check the URL, or re-run `sazs-store publish` to complete the upload"
        )
    return _json_object(data, f"{url}/{SUMMARY_FILE}", "; the published store is damaged")


def published_summary(url: str, *, storage_options: dict | None = None) -> dict:
    """The summary of the store published at ``url``; StoreError if there is none (or it is incomplete)."""
    fs, root = split_url(url, storage_options)
    return _parse_summary(_cat(fs, f"{root.rstrip('/')}/{SUMMARY_FILE}"), url)


def pull(
    url: str,
    dest: str | Path,
    *,
    storage_options: dict | None = None,
    progress: bool = True,
    max_workers: int = MAX_WORKERS,
) -> VerifyReport:
    """Download the store published at ``url`` into the local directory ``dest`` and verify it.

    ``dest`` must be absent, empty, or already a copy of the same store (verified, and
    replaced only if damaged). Returns the verification report of ``dest``.
    """
    fs, root = split_url(url, storage_options)
    root = root.rstrip("/")
    summary_bytes = _cat(fs, f"{root}/{SUMMARY_FILE}")
    summary = _parse_summary(summary_bytes, url)
    identity = summary.get("checksums_sha256")
    checksum_text = _cat(fs, f"{root}/{CHECKSUM_FILE}")
    if checksum_text is None or _sha256(checksum_text) != identity:
        state = "missing" if checksum_text is None else f"does not match {SUMMARY_FILE}"
        raise StoreError(
            f"{url}/{CHECKSUM_FILE} {state}: the published store is damaged; "
            "re-publish it from a good copy to a new URL"
        )

    dest = Path(dest)
    if dest.is_file():
        raise StoreError(f"{dest} is a file; pull into a new or empty directory")
    replace = dest.is_dir() and any(dest.iterdir())
    if replace:
        local = _local_summary(dest)
        if local is None or local.get("checksums_sha256") != identity:
            raise StoreError(
                f"{dest} is not empty and does not hold the store published at {url}; "
                "pull into a new or empty directory"
            )
        report = verify(str(dest), progress=progress)
        if report.ok:
            log.info("%s already holds %s (verified); nothing to do", dest, url)
            return report
        log.warning("%s is a damaged copy of %s (%s); pulling it again", dest, url, _problems(report))

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.pulling"
    if tmp.exists():
        log.info("removing %s left by an interrupted pull", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / CHECKSUM_FILE).write_bytes(checksum_text)
        expected = read_checksums(_local_fs(), str(tmp))
        keys = [_safe_key(k, url) for k in sorted(expected)]
        # Plain HTTP cannot list: an object missing there is found by its download (HTTP 404).
        listing = dict.fromkeys(keys) if is_http(fs) else list_objects(fs, root)
        missing = [k for k in keys if k not in listing]
        if missing:
            raise StoreError(_lacks(url, missing))
        for parent in sorted({(tmp / k).parent for k in keys}):
            parent.mkdir(parents=True, exist_ok=True)

        def download(key: str) -> int:
            _download(fs, f"{root}/{key}", tmp / key, key=key, url=url, dest=dest)
            return (tmp / key).stat().st_size

        _transfer(
            [(k, listing[k]) for k in keys],
            download,
            what="downloading",
            url=url,
            progress=progress,
            max_workers=max_workers,
            total=summary.get("total_bytes") if is_http(fs) else None,
        )
        (tmp / SUMMARY_FILE).write_bytes(summary_bytes)
        report = verify(str(tmp), progress=progress)
        if not report.ok:
            raise StoreError(
                f"the store pulled from {url} fails verification ({_problems(report)}); the "
                f"published copy is damaged: nothing was written to {dest}; re-publish it from a "
                "good copy to a new URL"
            )
        if summary.get("fingerprint") != report.fingerprint:
            raise StoreError(
                f"{url}: {SUMMARY_FILE} names fingerprint {summary.get('fingerprint')}, but the "
                f"store's manifest has {report.fingerprint}; the published store is inconsistent"
            )
        _swap_into_place(tmp, dest, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.url = str(dest)
    log.info("pulled %s to %s: %d object(s), verified", url, dest, report.num_objects)
    return report


def _lacks(url: str, missing: list[str]) -> str:
    return (
        f"{url} lacks {len(missing)} object(s) listed in its checksums ({', '.join(missing[:5])}); the "
        "published store is damaged: re-publish it from a good copy to a new URL"
    )


def _download(fs, path: str, local: Path, *, key: str, url: str, dest: Path) -> None:
    """Copy one object to ``local``; over HTTP retry what the network broke, then fail naming it."""
    transient = http_errors(fs)
    attempts = HTTP_ATTEMPTS if transient else 1
    for attempt in range(1, attempts + 1):
        try:
            fs.get_file(path, str(local))
            return
        except FileNotFoundError:
            raise StoreError(_lacks(url, [key])) from None
        except transient as exc:
            status = getattr(exc, "status", None)  # an HTTP error response: only a 5xx may pass
            if attempt == attempts or (status is not None and status < 500):
                tries = f" (attempt {attempt} of {attempts})" if attempts > 1 else ""
                raise StoreError(
                    f"downloading {key} from {url} failed{tries}: {type(exc).__name__}: {exc}; "
                    f"nothing was written to {dest}: check that the server is up and serves the "
                    "store's files, then re-run the pull"
                ) from None
            log.warning("downloading %s from %s failed (%s: %s); retrying", key, url, type(exc).__name__, exc)
            time.sleep(RETRY_WAIT_S * attempt)


def _local_summary(path: Path) -> dict | None:
    try:
        return _json_object((path / SUMMARY_FILE).read_bytes(), f"{path}/{SUMMARY_FILE}")
    except (OSError, StoreError):
        return None


def _swap_into_place(tmp: Path, dest: Path, replace: bool) -> None:
    if not replace:
        if dest.is_dir():
            dest.rmdir()  # empty
        tmp.rename(dest)
        return
    old = dest.parent / f".{dest.name}.replaced"
    shutil.rmtree(old, ignore_errors=True)
    dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
