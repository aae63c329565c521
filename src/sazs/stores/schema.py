"""The checks of a prior store's raw metadata, made before Zarr decodes any of it.

Everything a store says about itself (``zarr.json`` files, the manifest, side files) is
untrusted input: this module bounds its size and nesting depth before any JSON is
decoded, checks the manifest (fields, limits on N, K and the grid, the fingerprint
recomputed from the settings) and every array's metadata (codecs first, against an
allow-list, then data type, shape and chunking) before Zarr parses any of it. The
reader, the writer (when it resumes) and ``verify`` all go through :func:`validate_store`,
so they accept exactly the same stores.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from sazs.core.jsonfiles import json_depth
from sazs.core.limits import (
    MAX_CHUNK_BYTES,
    MAX_EIGS,
    MAX_GRID_SIDE,
    MAX_IMAGES,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_SHARD_BYTES,
    MAX_TABLE_BYTES,
)

from .format import CHECKSUM_FILE, StoreError, array_spec, is_local
from .manifest import FORMAT_NAME, FORMAT_VERSION, REQUIRED_KEYS, fingerprint

# Codecs a v1 store may use. Anything else is refused before Zarr sees it. The compressors
# among them (zstd, blosc, gzip) decode through stores/codecs.py, bounded by the metadata.
ALLOWED_CODECS = frozenset(
    {"bytes", "zstd", "blosc", "gzip", "crc32c", "transpose", "sharding_indexed", "vlen-utf8", "numcodecs.crc32c"}
)

FILL_VALUES = {
    "ids": "",
    "errors": "",
    "image_size": 0,
    "grid": 0,
    "eigvals": "NaN",
    "residual": "NaN",
    "eigvecs": 0.0,
    "status": 0,
}
_ITEMSIZE = {"string": 8, "int32": 4, "int16": 2, "float32": 4, "float16": 2, "uint8": 1}


# -- bounded JSON ----------------------------------------------------------------------------


def parse_json(data: bytes, where: str, hint: str = "") -> Any:
    """``json.loads(data)`` once its size and depth are within bounds; StoreError naming ``where``."""
    if len(data) > MAX_JSON_BYTES:
        raise StoreError(
            f"{where} is larger than {MAX_JSON_BYTES >> 20} MiB ({len(data)} bytes), far more than "
            f"sazs ever writes; refusing to parse it{hint}"
        )
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise StoreError(f"{where} nests {depth} levels deep (sazs writes at most a few); refusing to parse it{hint}")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{where} is not valid JSON ({exc}){hint}") from None


def parse_json_object(data: bytes, where: str, hint: str = "") -> dict:
    """``data`` parsed as a JSON object (size and depth bounded first); StoreError naming ``where`` otherwise."""
    out = parse_json(data, where, hint)
    if not isinstance(out, dict):
        raise StoreError(f"{where} is not a JSON object{hint}")
    return out


def read_small(fs, path: str, where: str, hint: str = "") -> bytes:
    """At most MAX_JSON_BYTES + 1 bytes of the regular file ``path`` of ``fs``; StoreError naming
    ``where`` for anything else (a directory, a FIFO, which would block a read forever, a device)."""
    if is_local(fs):
        kind = fs.info(path).get("type")  # FileNotFoundError passes
        if kind != "file":
            kind = "FIFO, socket or device" if kind == "other" else kind
            raise StoreError(f"{where} is not a regular file (it is a {kind}){hint}")
    with fs.open(path, "rb") as f:
        return f.read(MAX_JSON_BYTES + 1)


def read_json_object(fs, path: str, where: str, hint: str = "") -> dict:
    """The JSON object stored at ``path`` of ``fs``, reading at most MAX_JSON_BYTES + 1 bytes."""
    return parse_json_object(read_small(fs, path, where, hint), where, hint)


def read_checksums(fs, root: str) -> dict[str, str] | None:
    """{key: sha256} of a finalised store's checksum file (at most MAX_JSON_BYTES), None if it has none.

    A checksum file is written whole or not at all (finalize writes it atomically), so a
    malformed one was damaged or edited afterwards: the store's integrity is unknown.
    """
    path = f"{root.rstrip('/')}/{CHECKSUM_FILE}"
    if not fs.exists(path):
        return None
    data = read_small(fs, path, f"{root}/{CHECKSUM_FILE}")
    if len(data) > MAX_JSON_BYTES:
        raise StoreError(f"{root}/{CHECKSUM_FILE} is larger than {MAX_JSON_BYTES >> 20} MiB; refusing to read it")
    out = {}
    for n, line in enumerate(data.decode(errors="replace").splitlines(), 1):
        digest, sep, key = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise StoreError(
                f"{root}/{CHECKSUM_FILE} line {n} is malformed: {line[:80]!r}; the checksum file was "
                "damaged or edited after finalize, so nothing of the store can be trusted: pull a good "
                "copy, or re-create the store (sazs-priors run with --overwrite)"
            )
        out[key] = digest
    return out


# -- the manifest ----------------------------------------------------------------------------


def _int_in(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_layout(num_eigs, max_grid, shard_size, where: str) -> None:
    """K, (Hmax, Wmax) and S within the limits above; StoreError naming ``where`` otherwise."""
    if not _int_in(num_eigs, 1, MAX_EIGS):
        raise StoreError(f"{where}: num_eigs = {num_eigs!r} is not an integer in 1..{MAX_EIGS}")
    if not (
        isinstance(max_grid, list | tuple)
        and len(max_grid) == 2
        and all(_int_in(x, 1, MAX_GRID_SIDE) for x in max_grid)
    ):
        raise StoreError(f"{where}: layout.max_grid = {max_grid!r} is not two integers in 1..{MAX_GRID_SIDE}")
    if num_eigs * max_grid[0] * max_grid[1] * 2 > MAX_CHUNK_BYTES:
        raise StoreError(
            f"{where}: K = {num_eigs} eigenvectors on a {max_grid[0]}x{max_grid[1]} grid need more "
            f"than {MAX_CHUNK_BYTES >> 20} MiB per image; refusing it"
        )
    if not _int_in(shard_size, 1, MAX_IMAGES):
        raise StoreError(f"{where}: layout.shard_size = {shard_size!r} is not an integer in 1..{MAX_IMAGES}")
    if shard_size * num_eigs * max_grid[0] * max_grid[1] * 2 > MAX_SHARD_BYTES:
        raise StoreError(
            f"{where}: a shard of {shard_size} images of {num_eigs}x{max_grid[0]}x{max_grid[1]} "
            f"eigenvectors exceeds {MAX_SHARD_BYTES >> 30} GiB; use a smaller shard size"
        )


def check_manifest(manifest: Any, where: str) -> dict:
    """The manifest if it is a complete, consistent format-v1 manifest; StoreError otherwise.

    Consistent: its ``fingerprint`` is the one :func:`manifest.fingerprint` computes from its
    settings, so a manifest edited by hand (``k`` changed, old fingerprint kept) is refused.
    """
    if not isinstance(manifest, dict):
        raise StoreError(f"{where} is a Zarr group but has no sazs manifest in its attributes")
    if manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{where}: manifest format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    major = str(manifest.get("format_version", "?")).split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise StoreError(
            f"{where} is format version {manifest.get('format_version')}, this sazs reads "
            f"{FORMAT_VERSION.split('.')[0]}.x; upgrade sazs to read it"
        )
    layout = manifest.get("layout") if isinstance(manifest.get("layout"), dict) else {}
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    missing += [f"layout.{k}" for k in ("shard_size", "max_grid") if k not in layout]
    if missing:
        raise StoreError(
            f"{where}: manifest is missing the field(s) {missing}; the store was not written by sazs or was edited"
        )
    check_layout(manifest["num_eigs"], layout["max_grid"], layout["shard_size"], where)
    num_images = manifest["dataset"].get("num_images") if isinstance(manifest["dataset"], dict) else None
    if num_images is not None and not _int_in(num_images, 0, MAX_IMAGES):
        raise StoreError(f"{where}: dataset.num_images = {num_images!r} is not an integer in 0..{MAX_IMAGES}")
    if fingerprint(manifest) != manifest["fingerprint"]:
        raise StoreError(
            f"{where}: the manifest's settings do not match its fingerprint (the manifest was edited "
            "after the store was written); its numbers cannot be trusted: re-create the store "
            "(`sazs-priors run --overwrite`) or pull a good copy"
        )
    return manifest


# -- array metadata --------------------------------------------------------------------------


def codec_names(codecs: Any) -> list[str]:
    """Names of the codecs of an array's metadata, those nested in ``sharding_indexed`` included."""
    names = []
    for codec in codecs if isinstance(codecs, list) else [codecs]:
        name = codec.get("name") if isinstance(codec, dict) else str(codec)
        names.append(name)
        if name == "sharding_indexed":
            conf = codec.get("configuration") or {}
            names += codec_names(conf.get("codecs", [])) + codec_names(conf.get("index_codecs", []))
    return names


def _chunk_shape(spec: Any) -> tuple | None:
    if isinstance(spec, dict) and spec.get("name") == "regular":
        shape = (spec.get("configuration") or {}).get("chunk_shape")
        if isinstance(shape, list) and all(_int_in(c, 1, MAX_IMAGES * MAX_GRID_SIDE) for c in shape):
            return tuple(shape)
    return None


def check_array(name: str, meta: dict, want: tuple, dtype: str, where: str, *, grid: str = "") -> None:
    """One array's ``zarr.json``: codecs (first), data type, shape, chunking; StoreError otherwise."""
    codecs = meta.get("codecs", [])
    bad = [c for c in codec_names(codecs) if c not in ALLOWED_CODECS]
    if bad:
        raise StoreError(
            f"{where} uses codec(s) {bad} that a prior store never uses; "
            "refusing to read it (allowed: " + ", ".join(sorted(ALLOWED_CODECS)) + ")"
        )
    if meta.get("data_type") != dtype:
        raise StoreError(f"{where} has data type {meta.get('data_type')!r}, expected {dtype!r}")
    # A chunk that was never written reads as the fill value; the reader and verify tell missing
    # data by it (zeros, NaN, grid 0), so a store with another one is damaged.
    if name in FILL_VALUES and meta.get("fill_value") != FILL_VALUES[name]:
        raise StoreError(
            f"{where} has the fill value {meta.get('fill_value')!r}, sazs writes {FILL_VALUES[name]!r}; "
            "the metadata was edited"
        )
    got = meta.get("shape", ())
    got = tuple(got) if isinstance(got, list) else got
    if got != want:
        raise StoreError(f"{where} has shape {got}, expected {want}{grid}")
    chunks = _chunk_shape(meta.get("chunk_grid"))
    if chunks is None or len(chunks) != len(want) or any(c > max(s, 1) for c, s in zip(chunks, want)):
        raise StoreError(
            f"{where} has the chunk grid {meta.get('chunk_grid')!r}, not a regular grid of chunks "
            f"within its shape {want}; the metadata is damaged"
        )
    if int(np.prod(chunks, dtype=np.float64)) * _ITEMSIZE[dtype] > MAX_SHARD_BYTES:
        raise StoreError(f"{where} has chunks of {chunks}, over {MAX_SHARD_BYTES >> 30} GiB each; refusing it")
    for codec in codecs if isinstance(codecs, list) else []:
        if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
            inner = (codec.get("configuration") or {}).get("chunk_shape")
            if not (
                isinstance(inner, list)
                and len(inner) == len(chunks)
                and all(_int_in(c, 1, s) for c, s in zip(inner, chunks))
            ):
                raise StoreError(
                    f"{where} has inner chunks {inner!r} that do not fit its shards {chunks}; the metadata is damaged"
                )


def validate_store(fs, root: str, url: str) -> tuple[dict, int]:
    """(manifest, number of images) of the store at ``root`` of ``fs``, every check above passed.

    Reads only ``zarr.json`` files, each bounded; nothing is decoded by Zarr before this
    returns. StoreError names the object and the fix.
    """
    base = root.rstrip("/")
    if not fs.exists(f"{base}/zarr.json"):
        kind = "does not exist" if not fs.exists(root) else "has no zarr.json"
        raise StoreError(f"{url} is not a prior store ({kind}); create one with `sazs-priors run`")
    damaged = "; the object is damaged: run `sazs-store verify` and pull or re-create the store"
    meta = read_json_object(fs, f"{base}/zarr.json", f"{url}/zarr.json", damaged)
    if meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
        raise StoreError(f"{url} is not a Zarr v3 group (prior stores are Zarr v3 groups)")
    attributes = meta.get("attributes") if isinstance(meta.get("attributes"), dict) else {}
    manifest = check_manifest(attributes.get("manifest"), url)
    num_eigs, max_grid = manifest["num_eigs"], tuple(manifest["layout"]["max_grid"])
    num_images = None
    for name, (shape, dtype) in array_spec(0, num_eigs, max_grid).items():
        where = f"{url}/{name}"
        try:
            meta = read_json_object(fs, f"{base}/{name}/zarr.json", f"{where}/zarr.json", damaged)
        except FileNotFoundError:
            raise StoreError(f"{where}/zarr.json is missing{damaged}") from None
        got = meta.get("shape")
        if num_images is None and isinstance(got, list) and got:
            num_images = got[0]
            if not _int_in(num_images, 1, MAX_IMAGES):
                raise StoreError(f"{where} claims {num_images!r} images; a store holds 1..{MAX_IMAGES}{damaged}")
            # The reader holds eigenvalues and residuals of every image (N x K float32 each).
            if num_images * num_eigs * 4 > MAX_TABLE_BYTES:
                raise StoreError(
                    f"{url}: {num_images} images x K = {num_eigs} eigenvalues exceed {MAX_TABLE_BYTES >> 20} MiB "
                    f"per table (raise it with $SAZS_MAX_TABLE_BYTES){damaged}"
                )
        check_array(
            name,
            meta,
            (num_images, *shape[1:]),
            dtype,
            where,
            grid=f" (K={num_eigs}, max grid {max_grid} from the manifest)",
        )
    return manifest, num_images
