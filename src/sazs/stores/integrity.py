"""Integrity of a prior store: finalize (checksum every object) and verify.

A finalised store carries two side files at its root:

* ``sazs-checksums.sha256``: one line ``<sha256>  <key>`` per object, sorted by key, in
  the format of ``sha256sum`` (so ``cd store && sha256sum -c sazs-checksums.sha256`` works
  without sazs);
* ``sazs-summary.json``: fingerprint, counts, object count and bytes, who/when, and the
  SHA-256 of the checksum file itself.

``verify`` recomputes the checksums (missing, extra and corrupted objects) and checks the
content shard by shard, finalised or not: every status byte is a defined value; every image
marked done has all its chunk objects (a missing object reads back as fill values: that is
damage, not zeros) and finite values in range (eigenvalues of the normalised Laplacian in
[0, 2], residuals >= 0); residuals above the solver's tolerance and eigenvalue order are
reported too. Both passes run in parallel over objects / shards with dask's threaded
scheduler.

Both side files are written atomically (a temporary file, fsync, rename; on object
storage one PUT each), so a finalize interrupted by a full disk never leaves a partial
checksum file that would make the store look finalised.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial

import dask
import numpy as np

from sazs.core.console import disk_error_message
from sazs.core.files import TEMP_SUFFIX, write_atomic

from .format import (
    ARRAYS,
    CHECKSUM_FILE,
    DONE,
    FAILED,
    LOCK_FILE,
    PENDING,
    STATUS_NAMES,
    SUMMARY_FILE,
    StoreError,
    TransportError,
    is_local,
    split_url,
)
from .manifest import code_version
from .marks import finalized_mark, ids_problems, image_size_problem, set_finalized_mark
from .objects import hash_all, list_objects, sha256_of  # noqa: F401  (sha256_of: part of this API)
from .reader import TIMEOUT_HINT, PriorStore, http_errors, open_store, shard_workers, transport_text
from .schema import read_checksums

log = logging.getLogger(__name__)
# Eigenvalues of the normalised Laplacian lie in [0, 2]; a Ritz value of any unit vector does
# too, so anything further out than rounding is damage, converged or not.
EIGVAL_RANGE = (-1e-3, 2 + 1e-3)
# Arrays every image marked done must have a chunk object of ("errors" is empty then, and
# Zarr does not store a chunk of fill values).
DONE_ARRAYS = tuple(a for a in ARRAYS if a not in ("status", "errors"))


def _write_side_file(fs, path: str, data: bytes) -> None:
    """Write a side file whole or not at all: temp file + fsync + rename locally, one PUT elsewhere."""
    try:
        if is_local(fs):
            write_atomic(path, data, fsync=True)
        else:
            fs.pipe_file(path, data)  # an object store writes each object atomically
    except OSError as exc:
        msg = disk_error_message(exc, path)
        if msg is None:
            raise
        raise StoreError(
            f"finalize: {msg}; nothing was half-written, re-run `sazs-store finalize` afterwards"
        ) from None


def _mark_or_none(fs, root: str) -> str | None:
    try:
        return finalized_mark(fs, root)
    except StoreError:
        return None  # a damaged root zarr.json: the content checks report it


def is_finalized(url: str, storage_options: dict | None = None) -> bool:
    fs, root = split_url(url, storage_options)
    return fs.exists(f"{root.rstrip('/')}/{CHECKSUM_FILE}")


def finalize(
    url: str, *, storage_options: dict | None = None, allow_incomplete: bool = False, progress: bool = False
) -> dict:
    """Write the checksum file and summary of a store whose writers have finished."""
    store = open_store(url, storage_options=storage_options)
    fs, root = store.fs, store.root
    if fs.exists(f"{root.rstrip('/')}/{LOCK_FILE}"):
        raise StoreError(
            f"{url} is locked by a writer ({LOCK_FILE}); finalize after the job ends "
            "(or `sazs-store unlock` a stale lock)"
        )
    counts = store.counts()
    if counts["pending"] and not allow_incomplete:
        raise StoreError(
            f"{url} has {counts['pending']} pending image(s); finish the job (re-run it) or pass --allow-incomplete"
        )
    _refuse_changed(fs, root, url, progress)
    if finalized_mark(fs, root) is None:  # before the checksums: zarr.json is one of the objects
        set_finalized_mark(fs, root, datetime.now(UTC).isoformat(timespec="seconds"), partial(_write_side_file, fs))
    objects = list_objects(fs, root)
    for key in [k for k in objects if k.endswith(TEMP_SUFFIX)]:
        log.info("removing leftover temporary file %s", key)
        fs.rm(f"{root.rstrip('/')}/{key}")
        objects.pop(key)
    digests = hash_all(fs, root, sorted(objects), progress)
    text = "".join(f"{digests[k]}  {k}\n" for k in sorted(digests))
    _write_side_file(fs, f"{root.rstrip('/')}/{CHECKSUM_FILE}", text.encode())
    summary = {
        "fingerprint": store.fingerprint,
        "format_version": store.manifest["format_version"],
        "num_images": len(store),
        **counts,
        "num_objects": len(objects),
        "total_bytes": int(sum(objects.values())),
        "checksums_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "finalized": datetime.now(UTC).isoformat(timespec="seconds"),
        "finalized_with": code_version(),
    }
    _write_side_file(fs, f"{root.rstrip('/')}/{SUMMARY_FILE}", json.dumps(summary, indent=2).encode())
    log.info("finalized %s: %d objects, %d bytes", url, len(objects), summary["total_bytes"])
    return summary


def _refuse_changed(fs, root: str, url: str, progress: bool) -> None:
    """StoreError unless a finalised store (re-finalised) still matches its checksums: finalize
    must never bless a store changed after it was finalised."""
    when = finalized_mark(fs, root)
    expected = read_checksums(fs, root)  # a malformed file raises
    completed = fs.exists(f"{root.rstrip('/')}/{SUMMARY_FILE}")  # else an interrupted finalize: re-run it
    if expected is None and (when is None or not completed):
        return
    fix = "pull a good copy, or re-create the store (sazs-priors run with --overwrite)"
    if expected is None:
        raise StoreError(
            f"{url} was finalised on {when} but its {CHECKSUM_FILE} is gone; refusing to re-finalise: {fix}"
        )
    objects = list_objects(fs, root)
    present = sorted(set(expected) & set(objects))
    digests = hash_all(fs, root, present, progress)
    changed = sorted(set(expected) ^ set(objects)) + [k for k in present if digests[k] != expected[k]]
    if changed:
        raise StoreError(
            f"{url} is finalised and {len(changed)} object(s) no longer match its checksums (e.g. "
            f"{changed[:3]}); refusing to re-finalise a changed store: {fix}"
        )


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
    missing_data: list[str] = field(default_factory=list)
    bad_ids: list[str] = field(default_factory=list)
    bad_status: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    out_of_range: list[str] = field(default_factory=list)
    not_ascending: list[str] = field(default_factory=list)
    high_residual: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damage: every object intact, every done image finite and well-formed."""
        return not any(getattr(self, name) for name in DAMAGE)

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def lines(self, limit: int = 10) -> list[str]:
        out = [
            f"store       {self.url}",
            f"finalized   {'yes' if self.finalized else 'no (no checksums: content checks only)'}",
        ]
        for name in (*DAMAGE, "high_residual", "pending", "failed", "temp_files"):
            items = getattr(self, name)
            if items:
                shown = ", ".join(items[:limit]) + (f" ... (+{len(items) - limit})" if len(items) > limit else "")
                out.append(f"{name:<11} {len(items)}: {shown}")
        out.append(
            "result      "
            + ("OK" if self.ok else "DAMAGED")
            + (f" ({len(self.pending)} image(s) pending)" if self.pending else "")
        )
        if not self.ok:
            out.append(
                "fix         pull a good copy (sazs-store pull), or re-create the store "
                "(sazs-priors run with --overwrite); images with an undefined status are recomputed "
                "by re-running the job that wrote it"
            )
        return out


# The report fields that mean damage (the others are information: pending, failed, ...).
DAMAGE = (
    "missing",
    "extra",
    "corrupted",
    "unreadable",
    "missing_data",
    "bad_ids",
    "bad_status",
    "nonfinite",
    "out_of_range",
    "not_ascending",
)


def _row_keys(array, name: str, i: int) -> list[str]:
    """Keys (relative to the store root) of the objects holding row ``i`` of ``array``."""
    chunk = array.shards or array.chunks  # the stored object: a shard when sharded
    rest = [range(-(-size // c)) for size, c in zip(array.shape[1:], chunk[1:])]
    return [
        f"{name}/{array.metadata.encode_chunk_key((i // chunk[0], *coords))}" for coords in itertools.product(*rest)
    ]


def missing_objects(store: PriorStore, objects: dict[str, int] | set[str]) -> dict[str, str]:
    """{id: first missing key} of the images marked done whose chunk objects are not in ``objects``.

    ``objects`` is the store's listing (``list_objects``); the keys come from Zarr's own chunk
    key encoding, so this holds for local and object-storage stores alike and decodes nothing
    but ``status``.
    """
    out: dict[str, str] = {}
    # An imported store's residuals are all NaN, the fill value, so Zarr stores no object of them.
    names = [n for n in DONE_ARRAYS if not (n == "residual" and "imported" in store.manifest)]
    arrays = {name: store.group[name] for name in names}
    first_gone: dict[tuple[str, int], str | None] = {}  # (array, chunk row): rows of one chunk share it
    for i in np.flatnonzero(store.status() == DONE):
        for name, array in arrays.items():
            row = int(i) // (array.shards or array.chunks)[0]
            if (name, row) not in first_gone:
                first_gone[name, row] = next((k for k in _row_keys(array, name, int(i)) if k not in objects), None)
            if first_gone[name, row] is not None:
                out[store.ids[i]] = first_gone[name, row]
                break
    return out


def _check_shard(store: PriorStore, shard: int, residual_tol: float, gone: dict[str, str]) -> dict[str, list[str]]:
    """Content checks for one shard; returns id lists per problem kind (``gone``: missing_objects)."""
    s = int(store.manifest["layout"]["shard_size"])
    lo, hi = shard * s, min((shard + 1) * s, len(store))
    out: dict[str, list[str]] = {
        name: []
        for name in (
            "unreadable",
            "missing_data",
            "bad_status",
            "nonfinite",
            "out_of_range",
            "not_ascending",
            "high_residual",
        )
    }
    transport = http_errors(store.fs)
    try:
        status = np.asarray(store.group["status"][lo:hi])
        eigvals = np.asarray(store.group["eigvals"][lo:hi])
        residual = np.asarray(store.group["residual"][lo:hi])
        grid = np.asarray(store.group["grid"][lo:hi])
        sizes = np.asarray(store.group["image_size"][lo:hi])
        eigvecs = np.asarray(store.group["eigvecs"][lo:hi])
    except transport as exc:
        raise TransportError(
            f"cannot read shard {shard} of {store.url} ({transport_text(exc)}); check that the server "
            "is up, then re-run" + TIMEOUT_HINT
        ) from None
    except (KeyError, ValueError, RuntimeError, OSError, TypeError) as exc:
        out["unreadable"].append(f"shard {shard} (images {lo}..{hi - 1}): {type(exc).__name__}: {exc}")
        return out
    for j in np.flatnonzero(~np.isin(status, list(STATUS_NAMES))):
        out["bad_status"].append(f"{store.ids[lo + j]} (status {int(status[j])})")
    (hmax, wmax), (low, high) = store.max_grid, EIGVAL_RANGE
    # An imported store (stores/dsm.py) has no graph to compute residuals from: they are NaN.
    if "imported" in store.manifest:
        residual = np.where(np.isnan(residual), 0.0, residual)
    for j in np.flatnonzero(status == DONE):
        id_ = store.ids[lo + j]
        h, w = (int(x) for x in grid[j])
        if id_ in gone:
            out["missing_data"].append(f"{id_} ({gone[id_]} is missing)")
            continue
        if not (0 < h <= hmax and 0 < w <= wmax):
            out["missing_data"].append(f"{id_} (grid {h}x{w})")
            continue
        if bad_size := image_size_problem(sizes[j], grid[j]):
            out["out_of_range"].append(f"{id_} ({bad_size})")
            continue
        if not eigvecs[j].any():  # a chunk missing inside its shard reads back as zeros
            out["missing_data"].append(f"{id_} (eigvecs are all zero)")
            continue
        if not (np.isfinite(eigvals[j]).all() and np.isfinite(residual[j]).all() and np.isfinite(eigvecs[j]).all()):
            out["nonfinite"].append(id_)
            continue
        if (eigvals[j] < low).any() or (eigvals[j] > high).any() or (residual[j] < 0).any():
            out["out_of_range"].append(
                f"{id_} (eigenvalues {eigvals[j].min():.4g}..{eigvals[j].max():.4g}, "
                f"smallest residual {residual[j].min():.4g})"
            )
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
        digests = hash_all(fs, root, present, progress)
        report.corrupted = [k for k in present if digests[k] != expected[k]]
    elif (when := _mark_or_none(fs, root)) is not None:
        report.missing = [f"{CHECKSUM_FILE} (finalize began on {when}: deleted, or finalize was interrupted)"]
    try:
        store = open_store(url, storage_options=storage_options)
        status = store.status()
    except StoreError as exc:
        report.unreadable.append(str(exc))
        return report
    report.fingerprint = store.fingerprint
    report.bad_ids = ids_problems(store.ids, store.manifest)
    report.pending = [store.ids[i] for i in np.flatnonzero(status == PENDING)]
    report.failed = [store.ids[i] for i in np.flatnonzero(status == FAILED)]
    gone = missing_objects(store, objects)
    tol = store.manifest["solver"].get("residual_tol", 1e-3)
    if type(tol) not in (int, float) or not 0 <= tol < float("inf"):
        report.unreadable.append(
            f"{url}: its manifest's solver.residual_tol = {str(tol)[:40]!r} is not a number >= 0; the manifest "
            "was edited: restore it, or compute the store again"
        )
        return report
    num_shards = -(-len(store) // int(store.manifest["layout"]["shard_size"]))
    tasks = [dask.delayed(_check_shard)(store, s, tol, gone) for s in range(num_shards)]
    results = dask.compute(*tasks, scheduler="threads", num_workers=shard_workers(store))
    for part in results:
        for name, items in part.items():
            getattr(report, name).extend(items)
    return report
