"""What a store records about itself beyond its arrays, and the checks of it that need no chunk data.

* The finalised mark: ``finalize`` writes ``sazs_finalized`` (the time) into the root
  ``zarr.json``'s attributes before it checksums every object, so a store whose checksum
  file was deleted still says it was finalised: ``verify`` reports the checksum file as
  missing, a writer refuses to resume into it, and ``finalize`` refuses to re-bless it once
  the summary (written last) shows that an earlier finalize completed.
* The ids: the manifest's ``dataset.ids_sha256`` (fingerprinted) names the ids the store was
  computed for; the ``ids`` array must hash to it, without duplicates.
* An image's size: at least a pixel a side, at most ``MAX_PIXELS``, and no smaller than its
  patch grid.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

from sazs.core.limits import MAX_PIXELS

from .schema import read_json_object

FINALIZED_ATTR = "sazs_finalized"
_SHA256 = re.compile(r"[0-9a-f]{64}$")


def finalized_mark(fs, root: str) -> str | None:
    """When the store at ``root`` was finalised, as its root zarr.json records it (None if never)."""
    meta = read_json_object(fs, f"{root.rstrip('/')}/zarr.json", f"{root}/zarr.json")
    attributes = meta.get("attributes") if isinstance(meta.get("attributes"), dict) else {}
    value = attributes.get(FINALIZED_ATTR)
    return str(value) if value else None


def set_finalized_mark(fs, root: str, when: str, write) -> None:
    """Record ``when`` as the store's finalisation time in its root zarr.json, through
    ``write(path, data)`` (finalize's whole-or-nothing write of a side file)."""
    path = f"{root.rstrip('/')}/zarr.json"
    meta = read_json_object(fs, path, f"{root}/zarr.json")
    meta.setdefault("attributes", {})[FINALIZED_ATTR] = when
    write(path, json.dumps(meta, indent=2).encode())


def ids_problems(ids: list[str], manifest: dict) -> list[str]:
    """What is wrong with a store's ``ids`` array against its manifest (empty when nothing)."""
    out = []
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        out.append(f"{len(dupes)} id(s) appear more than once (e.g. {dupes[:3]})")
    want = (manifest.get("dataset") or {}).get("ids_sha256")
    # Stores made by hand (tests, tools) may record no digest; a sazs dataset always records one.
    if isinstance(want, str) and _SHA256.match(want):
        got = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        if got != want:
            out.append(
                f"the ids array hashes to {got[:12]}…, the manifest's dataset.ids_sha256 is {want[:12]}… "
                "(ids edited, swapped or duplicated after the store was written)"
            )
    return out


def image_size_problem(size, grid) -> str:
    """Why an image size (H, W) is impossible for a done image on patch ``grid`` (h, w); "" if it is fine."""
    h, w = (int(x) for x in size)
    if h < 1 or w < 1 or h * w > MAX_PIXELS or h < int(grid[0]) or w < int(grid[1]):
        return f"image size {h}x{w}"
    return ""
