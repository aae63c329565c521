"""Integrity of a prior store: finalize (checksum every object) and verify.

A finalised store carries two side files at its root:

* ``sazs-checksums.sha256``: one line ``<sha256>  <key>`` per object, sorted by key, in
  the format of ``sha256sum`` (so ``cd store && sha256sum -c sazs-checksums.sha256`` works
  without sazs);
* ``sazs-summary.json``: fingerprint, counts, object count and bytes, who/when, and the
  SHA-256 of the checksum file itself.

``verify`` recomputes the checksums (missing, extra and corrupted objects) and checks the
content shard by shard (status, NaN/Inf, residuals above the solver's tolerance, eigenvalue
order). Both passes run in parallel over objects / shards with dask's threaded scheduler.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np

from .manifest import code_version
from .reader import PriorStore, open_store, split_url
from .writer import DONE, FAILED, PENDING, StoreError

log = logging.getLogger(__name__)

CHECKSUM_FILE = "sazs-checksums.sha256"
SUMMARY_FILE = "sazs-summary.json"
LOCK_FILE = ".sazs-lock"
SIDE_FILES = frozenset({CHECKSUM_FILE, SUMMARY_FILE, LOCK_FILE})
TEMP_SUFFIX = ".partial"  # what Zarr's local store leaves behind when a write is killed


def _key(root: str, path: str) -> str:
    return path[len(root.rstrip("/")) + 1:]


def list_objects(fs, root: str) -> dict[str, int]:
    """Every object of the store (key relative to the root → size), side files excluded."""
    found = fs.find(root, detail=True)
    return {_key(root, p): int(info.get("size") or 0) for p, info in found.items()
            if info.get("type", "file") == "file" and _key(root, p) not in SIDE_FILES}


def sha256_of(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_all(fs, root: str, keys: list[str], progress: bool) -> dict[str, str]:
    import dask
    from dask.diagnostics import ProgressBar

    tasks = [dask.delayed(sha256_of)(fs, f"{root.rstrip('/')}/{k}") for k in keys]
    ctx = ProgressBar() if progress else _nullcontext()
    with ctx:
        digests = dask.compute(*tasks, scheduler="threads")
    return dict(zip(keys, digests))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def read_checksums(fs, root: str) -> dict[str, str] | None:
    path = f"{root.rstrip('/')}/{CHECKSUM_FILE}"
    if not fs.exists(path):
        return None
    out = {}
    for n, line in enumerate(fs.cat_file(path).decode().splitlines(), 1):
        digest, sep, key = line.partition("  ")
        if not sep or len(digest) != 64:
            raise StoreError(f"{CHECKSUM_FILE} line {n} is malformed: {line[:80]!r}")
        out[key] = digest
    return out


def is_finalized(url: str, storage_options: dict | None = None) -> bool:
    fs, root = split_url(url, storage_options)
    return fs.exists(f"{root.rstrip('/')}/{CHECKSUM_FILE}")


def finalize(url: str, *, storage_options: dict | None = None, allow_incomplete: bool = False,
             progress: bool = False) -> dict:
    """Write the checksum file and summary of a store whose writers have finished."""
    store = open_store(url, storage_options=storage_options)
    fs, root = store.fs, store.root
    if fs.exists(f"{root.rstrip('/')}/{LOCK_FILE}"):
        raise StoreError(f"{url} is locked by a writer ({LOCK_FILE}); finalize after the job ends "
                         "(or `sazs-store unlock` a stale lock)")
    counts = store.counts()
    if counts["pending"] and not allow_incomplete:
        raise StoreError(f"{url} has {counts['pending']} pending image(s); finish the job (re-run it) "
                         "or pass --allow-incomplete")
    objects = list_objects(fs, root)
    for key in [k for k in objects if k.endswith(TEMP_SUFFIX)]:
        log.info("removing leftover temporary file %s", key)
        fs.rm(f"{root.rstrip('/')}/{key}")
        objects.pop(key)
    digests = _hash_all(fs, root, sorted(objects), progress)
    text = "".join(f"{digests[k]}  {k}\n" for k in sorted(digests))
    fs.pipe_file(f"{root.rstrip('/')}/{CHECKSUM_FILE}", text.encode())
    summary = {
        "fingerprint": store.fingerprint,
        "format_version": store.manifest["format_version"],
        "num_images": len(store),
        **counts,
        "num_objects": len(objects),
        "total_bytes": int(sum(objects.values())),
        "checksums_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "finalized": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finalized_with": code_version(),
    }
    fs.pipe_file(f"{root.rstrip('/')}/{SUMMARY_FILE}", json.dumps(summary, indent=2).encode())
    log.info("finalized %s: %d objects, %d bytes", url, len(objects), summary["total_bytes"])
    return summary


@dataclass
class VerifyReport:
    url: str
    finalized: bool = False
    fingerprint: str = ""
    num_objects: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    not_ascending: list[str] = field(default_factory=list)
    high_residual: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damage: every object intact, every done image finite and well-formed."""
        return not (self.missing or self.extra or self.corrupted or self.unreadable or self.nonfinite
                    or self.not_ascending)

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def lines(self, limit: int = 10) -> list[str]:
        out = [f"store       {self.url}",
               f"finalized   {'yes' if self.finalized else 'no (no checksums: content checks only)'}"]
        for name in ("missing", "extra", "corrupted", "unreadable", "nonfinite", "not_ascending",
                     "high_residual", "pending", "failed", "temp_files"):
            items = getattr(self, name)
            if items:
                shown = ", ".join(items[:limit]) + (f" ... (+{len(items) - limit})" if len(items) > limit else "")
                out.append(f"{name:<11} {len(items)}: {shown}")
        out.append("result      " + ("OK" if self.ok else "DAMAGED") +
                   (f" ({len(self.pending)} image(s) pending)" if self.pending else ""))
        return out


def _check_shard(store: PriorStore, shard: int, residual_tol: float) -> dict[str, list[str]]:
    """Content checks for one shard; returns id lists per problem kind."""
    s = int(store.manifest["layout"]["shard_size"])
    lo, hi = shard * s, min((shard + 1) * s, len(store))
    out: dict[str, list[str]] = {"unreadable": [], "nonfinite": [], "not_ascending": [], "high_residual": []}
    try:
        status = np.asarray(store.group["status"][lo:hi])
        eigvals = np.asarray(store.group["eigvals"][lo:hi])
        residual = np.asarray(store.group["residual"][lo:hi])
        eigvecs = np.asarray(store.group["eigvecs"][lo:hi])
    except (KeyError, ValueError, RuntimeError, OSError, TypeError) as exc:
        out["unreadable"].append(f"shard {shard} (images {lo}..{hi - 1}): {type(exc).__name__}: {exc}")
        return out
    for j in np.flatnonzero(status == DONE):
        id_ = store.ids[lo + j]
        if not (np.isfinite(eigvals[j]).all() and np.isfinite(residual[j]).all() and np.isfinite(eigvecs[j]).all()):
            out["nonfinite"].append(id_)
            continue
        if np.any(np.diff(eigvals[j]) < -1e-6):
            out["not_ascending"].append(id_)
        if np.any(residual[j] > residual_tol):
            out["high_residual"].append(id_)
    return out


def verify(url: str, *, storage_options: dict | None = None, progress: bool = False) -> VerifyReport:
    """Recompute checksums (if finalised) and check the content of every shard.

    The checksum pass needs no working metadata, so damage anywhere (a ``zarr.json``
    included) is reported as a corrupted object rather than as a failure to open.
    """
    import dask

    fs, root = split_url(url, storage_options)
    report = VerifyReport(url=str(url))
    if not fs.exists(f"{root.rstrip('/')}/zarr.json"):
        open_store(url, storage_options=storage_options)  # raises the reader's "not a prior store" error
    objects = list_objects(fs, root)
    report.num_objects = len(objects)
    report.temp_files = sorted(k for k in objects if k.endswith(TEMP_SUFFIX))
    expected = read_checksums(fs, root)
    if expected is not None:
        report.finalized = True
        report.missing = sorted(set(expected) - set(objects))
        report.extra = sorted(set(objects) - set(expected))
        present = sorted(set(expected) & set(objects))
        digests = _hash_all(fs, root, present, progress)
        report.corrupted = [k for k in present if digests[k] != expected[k]]
    try:
        store = open_store(url, storage_options=storage_options)
        status = store.status()
    except StoreError as exc:
        report.unreadable.append(str(exc))
        return report
    report.fingerprint = store.fingerprint
    report.pending = [store.ids[i] for i in np.flatnonzero(status == PENDING)]
    report.failed = [store.ids[i] for i in np.flatnonzero(status == FAILED)]
    tol = float(store.manifest["solver"].get("residual_tol", 1e-3))
    num_shards = -(-len(store) // int(store.manifest["layout"]["shard_size"]))
    results = dask.compute(*[dask.delayed(_check_shard)(store, s, tol) for s in range(num_shards)],
                           scheduler="threads")
    for part in results:
        for name, items in part.items():
            getattr(report, name).extend(items)
    return report
