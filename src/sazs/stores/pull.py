"""``pull``: download a published store into a local directory, verified before it appears.

The store is downloaded into a hidden sibling directory, verified, and only then renamed into
place, so a failed or interrupted pull never leaves a half store at the destination. Over
HTTP a download that fails on the way (a dropped connection, an HTTP 5xx) is retried.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path, PurePosixPath

from sazs.core import limits

from .format import CHECKSUM_FILE, SUMMARY_FILE, StoreError, TransportError, is_http, local_fs, split_url
from .http import redirect_refused, response_too_large
from .integrity import VerifyReport, list_objects, read_checksums, verify
from .reader import TIMEOUT_HINT, http_errors, transport_text
from .remote import MAX_WORKERS, problems, read_object, sha256_hex, transfer
from .schema import parse_json_object

log = logging.getLogger(__name__)

# Over HTTP each download is tried this many times in all, waiting RETRY_WAIT_S * attempt between tries.
HTTP_ATTEMPTS = 3
RETRY_WAIT_S = 1.0
HTTP_BLOCK_BYTES = 8 << 20  # an object is downloaded in byte ranges of this size


def _safe_key(key: str, url: str) -> str:
    """Refuse object keys that would escape the store directory (``..``, absolute paths)."""
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StoreError(
            f"{url}/{CHECKSUM_FILE} lists the object key {key!r}, which is not a plain relative "
            "path; refusing to transfer it (the store was not written by sazs or was tampered with)"
        )
    return key


def _parse_summary(data: bytes | None, url: str) -> dict:
    if data is None:
        raise StoreError(
            f"{url} is not a published store / upload incomplete (no {SUMMARY_FILE}); "
            "check the URL, or re-run `sazs-store publish` to complete the upload"
        )
    return parse_json_object(data, f"{url}/{SUMMARY_FILE}", "; the published store is damaged")


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
    summary_bytes = read_object(fs, f"{root}/{SUMMARY_FILE}")
    summary = _parse_summary(summary_bytes, url)
    identity = summary.get("checksums_sha256")
    checksum_text = read_object(fs, f"{root}/{CHECKSUM_FILE}")
    if checksum_text is None or sha256_hex(checksum_text) != identity:
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
        log.warning("%s is a damaged copy of %s (%s); pulling it again", dest, url, problems(report))

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.pulling"
    if tmp.exists():
        log.info("removing %s left by an interrupted pull", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / CHECKSUM_FILE).write_bytes(checksum_text)
        expected = read_checksums(local_fs(), str(tmp))
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

        transfer(
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
                f"the store pulled from {url} fails verification ({problems(report)}); the "
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


def _get_by_ranges(fs, path: str, local: Path) -> None:
    """Copy an object over HTTP in byte ranges of HTTP_BLOCK_BYTES, each bounded by stores/http.py,
    at most limits.MAX_HTTP_BYTES in all (an endless or oversized body never reaches the disk)."""
    with open(local, "wb") as f:
        offset = 0
        while True:
            try:
                data = fs.cat_file(path, start=offset, end=offset + HTTP_BLOCK_BYTES)
            except http_errors(fs) as exc:
                if offset and getattr(exc, "status", None) == 416:  # the size is a multiple of the block
                    return
                raise
            if len(data) > HTTP_BLOCK_BYTES:
                raise response_too_large()(f"{path}: the server ignores Range (sent {len(data)} bytes)")
            f.write(data)
            offset += len(data)
            if len(data) < HTTP_BLOCK_BYTES:
                return
            if offset > limits.MAX_HTTP_BYTES:
                raise response_too_large()(f"{path} is larger than MAX_HTTP_BYTES = {limits.MAX_HTTP_BYTES}")


def _download(fs, path: str, local: Path, *, key: str, url: str, dest: Path) -> None:
    """Copy one object to ``local``; over HTTP retry what the network broke, then fail naming it."""
    transient = http_errors(fs)
    attempts = HTTP_ATTEMPTS if transient else 1
    for attempt in range(1, attempts + 1):
        try:
            if transient:
                _get_by_ranges(fs, path, local)
            else:
                fs.get_file(path, str(local))
            return
        except FileNotFoundError:
            raise StoreError(_lacks(url, [key])) from None
        except transient as exc:
            status = getattr(exc, "status", None)  # an HTTP error response: only a 5xx may pass
            # A timeout, an oversized answer or a redirect elsewhere is not retried either.
            final = isinstance(exc, TimeoutError | response_too_large() | redirect_refused())
            if attempt == attempts or final or (status is not None and status < 500):
                tries = f" (attempt {attempt} of {attempts})" if attempts > 1 else ""
                raise TransportError(
                    f"downloading {key} from {url} failed{tries}: {transport_text(exc)}; "
                    f"nothing was written to {dest}: check that the server is up and serves the "
                    "store's files, then re-run the pull" + (TIMEOUT_HINT if final else "")
                ) from None
            log.warning("downloading %s from %s failed (%s: %s); retrying", key, url, type(exc).__name__, exc)
            time.sleep(RETRY_WAIT_S * attempt)


def _local_summary(path: Path) -> dict | None:
    try:
        return parse_json_object((path / SUMMARY_FILE).read_bytes(), f"{path}/{SUMMARY_FILE}")
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
