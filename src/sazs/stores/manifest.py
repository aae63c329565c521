"""The prior-store manifest: provenance, and the fingerprint that decides compatibility.

The manifest lives in the root attributes of the Zarr group (key ``"manifest"``), so a
store describes itself without side files. The *fingerprint* is a SHA-256 over the
settings that determine the numbers in the store; two stores with equal fingerprints
hold interchangeable results (they can be resumed into, merged, compared). Settings
that only change *where* or *how fast* the numbers are produced (output path, shard
size, device, batch size, weights *path*) are recorded but left out of it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from sazs.core.host import user_name

FORMAT_NAME = "sazs-prior-store"
FORMAT_VERSION = "1.0"
SIGN_CONVENTION = "each eigenvector is flipped so that its positive part is the minority of patches"
LAPLACIAN = {
    "type": "symmetric-normalized",
    "formula": "L = I - D^-1/2 W D^-1/2",
    "vectors": "u: orthonormal eigenvectors of L (generalised form v = D^-1/2 u)",
}

# Keys of each manifest section that do not change the numbers and so stay out of the
# fingerprint.
_NOT_FINGERPRINTED = {
    "dataset": {"root", "num_images"},
    "extractor": {"weights", "device", "batch_size", "cache_dir"},
    "graph": {"device", "backend"},
    "solver": {"device"},
}
_FINGERPRINTED_SECTIONS = ("dataset", "extractor", "graph", "laplacian", "solver", "num_eigs", "sign_convention")
REQUIRED_KEYS = ("format", "format_version", "fingerprint", *_FINGERPRINTED_SECTIONS, "layout")


def code_version() -> str:
    """Package version plus the git commit of the checkout when there is one."""
    try:
        version = metadata.version("sazs")
    except metadata.PackageNotFoundError:
        version = "unknown"
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+g{sha}" if sha else version


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(manifest: dict) -> str:
    """SHA-256 (hex) of the number-determining part of a manifest."""
    major = str(manifest.get("format_version", FORMAT_VERSION)).split(".")[0]
    payload: dict[str, Any] = {"format_major": major}
    for section in _FINGERPRINTED_SECTIONS:
        value = copy.deepcopy(manifest.get(section))
        if isinstance(value, dict):
            for key in _NOT_FINGERPRINTED.get(section, ()):
                value.pop(key, None)
        payload[section] = value
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def build_manifest(
    *,
    dataset: dict,
    extractor: dict,
    graph: dict,
    solver: dict,
    num_eigs: int,
    layout: dict,
    laplacian: dict = LAPLACIAN,
    sign_convention: str = SIGN_CONVENTION,
    extra: dict | None = None,
) -> dict:
    """Assemble a manifest and stamp it with its fingerprint.

    ``laplacian`` and ``sign_convention`` differ from the defaults only for stores imported
    from another tool's files (stores/dsm.py), whose vectors are not this project's u.
    """
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "extractor": extractor,
        "graph": graph,
        "laplacian": laplacian,
        "solver": solver,
        "num_eigs": int(num_eigs),
        "sign_convention": sign_convention,
        "layout": layout,
        "code_version": code_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "created_by": f"{user_name()}@{platform.node()}",
        **(extra or {}),
    }
    # Round-trip through JSON so the manifest holds only JSON types (what Zarr stores)
    # and the fingerprint of a written manifest equals the one of the built one.
    manifest = json.loads(_canonical(manifest))
    manifest["fingerprint"] = fingerprint(manifest)
    return manifest


def fingerprint_diff(a: dict, b: dict) -> list[str]:
    """Human-readable list of the fingerprinted settings that differ between two manifests."""
    diffs = []
    for section in _FINGERPRINTED_SECTIONS:
        va, vb = a.get(section), b.get(section)
        if isinstance(va, dict) and isinstance(vb, dict):
            skip = _NOT_FINGERPRINTED.get(section, set())
            for key in sorted(set(va) | set(vb)):
                if key not in skip and va.get(key) != vb.get(key):
                    diffs.append(f"{section}.{key}: {va.get(key)!r} != {vb.get(key)!r}")
        elif va != vb:
            diffs.append(f"{section}: {va!r} != {vb!r}")
    return diffs
