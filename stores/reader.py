"""Reading a prior store from a local path or an object-storage URL.

``open_store(url)`` validates the store before any chunk is decoded: the manifest
(format, major version, required fields) and, for every array, the raw ``zarr.json``
(data type, shape, codecs). Only a fixed list of codecs is accepted, so a store from
somewhere else can never make the reader run code it names (no pickle, no plugins).

Per-image metadata (ids, status, grid, eigenvalues, residuals) is small and read once,
on first use; ``get(id)`` then costs one byte-range read of the image's eigenvector chunk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from .manifest import FORMAT_NAME, FORMAT_VERSION, REQUIRED_KEYS
from .writer import DONE, FAILED, PENDING, StoreError

log = logging.getLogger(__name__)

# Codecs a v1 store may use. Anything else is refused before Zarr sees it.
ALLOWED_CODECS = frozenset({
    "bytes", "zstd", "blosc", "gzip", "crc32c", "transpose", "sharding_indexed", "vlen-utf8",
    "numcodecs.zstd", "numcodecs.blosc", "numcodecs.gzip", "numcodecs.zlib", "numcodecs.crc32c",
})


def array_spec(num_images: int, num_eigs: int, max_grid: tuple[int, int]) -> dict[str, tuple[tuple, str]]:
    """Expected (shape, data type) of every array of a format-v1 store."""
    n, k = num_images, num_eigs
    return {
        "ids": ((n,), "string"),
        "image_size": ((n, 2), "int32"),
        "grid": ((n, 2), "int16"),
        "eigvals": ((n, k), "float32"),
        "eigvecs": ((n, k, *max_grid), "float16"),
        "residual": ((n, k), "float32"),
        "status": ((n,), "uint8"),
        "errors": ((n,), "string"),
    }


@dataclass
class Prior:
    """The priors of one image: eigenvectors (K, h, w) on its patch grid."""

    id: str
    eigvals: np.ndarray  # (K,) float32 ascending
    eigvecs: np.ndarray  # (K, h, w) float32
    residuals: np.ndarray  # (K,) float32
    grid: tuple[int, int]
    image_size: tuple[int, int]


def split_url(url: str | Path, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) for a local path or a URL such as s3://b/x.zarr."""
    import fsspec

    return fsspec.core.url_to_fs(str(url), **(storage_options or {}))


def _codec_names(codecs: list) -> list[str]:
    names = []
    for codec in codecs or []:
        name = codec.get("name") if isinstance(codec, dict) else str(codec)
        names.append(name)
        if name == "sharding_indexed":
            conf = codec.get("configuration", {})
            names += _codec_names(conf.get("codecs", [])) + _codec_names(conf.get("index_codecs", []))
    return names


class PriorStore:
    """Read-only view of a prior store (local path or fsspec URL)."""

    def __init__(self, url: str | Path, *, storage_options: dict | None = None):
        self.url = str(url)
        self.storage_options = storage_options or {}
        self.fs, self.root = split_url(url, self.storage_options)
        self.manifest = self._read_manifest()
        layout = self.manifest["layout"]
        self.num_eigs = int(self.manifest["num_eigs"])
        self.max_grid = tuple(int(x) for x in layout["max_grid"])
        self._check_arrays()
        try:
            self.group = zarr.open_group(self._zarr_store(), mode="r", zarr_format=3)
            # Parse every array's metadata now (not at first use) and keep the handles:
            # re-opening an array per read would double the cost of a random-access get().
            self._arrays = {name: self.group[name] for name in array_spec(0, 1, (1, 1))}
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"cannot open {self.url}: damaged metadata ({type(exc).__name__}: {exc}); "
                             "run `sazs-store verify` and pull or re-create the store") from None
        self.ids: list[str] = [str(x) for x in self._read("ids")]
        self._index = {id_: i for i, id_ in enumerate(self.ids)}

    # -- validation ----------------------------------------------------------------------

    def _read_json(self, key: str) -> dict:
        path = f"{self.root.rstrip('/')}/{key}"
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            raise StoreError(f"{self.url}/{key} is missing") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.url}/{key} is not valid JSON ({exc}); the object is damaged: "
                             "run `sazs-store verify` and pull or re-create the store") from None

    def _read_manifest(self) -> dict:
        if not self.fs.exists(f"{self.root.rstrip('/')}/zarr.json"):
            kind = "does not exist" if not self.fs.exists(self.root) else "has no zarr.json"
            raise StoreError(f"{self.url} is not a prior store ({kind}); create one with `sazs-priors run`")
        meta = self._read_json("zarr.json")
        if meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
            raise StoreError(f"{self.url} is not a Zarr v3 group (prior stores are Zarr v3 groups)")
        manifest = meta.get("attributes", {}).get("manifest")
        if not isinstance(manifest, dict):
            raise StoreError(f"{self.url} is a Zarr group but has no sazs manifest in its attributes")
        if manifest.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.url}: manifest format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
        major = str(manifest.get("format_version", "?")).split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise StoreError(
                f"{self.url} is format version {manifest.get('format_version')}, this sazs reads "
                f"{FORMAT_VERSION.split('.')[0]}.x; upgrade sazs to read it"
            )
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        missing += [f"layout.{k}" for k in ("shard_size", "max_grid") if k not in manifest.get("layout", {})]
        if missing:
            raise StoreError(f"{self.url}: manifest is missing the field(s) {missing}; "
                             "the store was not written by sazs or was edited")
        return manifest

    def _check_arrays(self) -> None:
        num_images = None
        for name, (shape, dtype) in array_spec(0, self.num_eigs, self.max_grid).items():
            meta = self._read_json(f"{name}/zarr.json")
            bad = [c for c in _codec_names(meta.get("codecs", [])) if c not in ALLOWED_CODECS]
            if bad:
                raise StoreError(f"{self.url}/{name} uses codec(s) {bad} that a prior store never uses; "
                                 "refusing to read it (allowed: " + ", ".join(sorted(ALLOWED_CODECS)) + ")")
            if meta.get("data_type") != dtype:
                raise StoreError(f"{self.url}/{name} has data type {meta.get('data_type')!r}, expected {dtype!r}")
            got = tuple(meta.get("shape", ()))
            num_images = got[0] if num_images is None and got else num_images
            want = (num_images, *shape[1:])
            if got != want:
                raise StoreError(f"{self.url}/{name} has shape {got}, expected {want} "
                                 f"(K={self.num_eigs}, max grid {self.max_grid} from the manifest)")

    def _zarr_store(self):
        from zarr.storage import FsspecStore, LocalStore

        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if "file" in protocols:
            return LocalStore(self.root, read_only=True)
        if not getattr(self.fs, "async_impl", False):
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            return FsspecStore(AsyncFileSystemWrapper(self.fs, asynchronous=True), path=self.root, read_only=True)
        # Zarr runs its own event loop; self.fs (sync, e.g. s3fs) is bound to fsspec's loop,
        # where its HTTP session lives ("attached to a different loop"), so Zarr gets its own
        # asynchronous instance.
        return FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=True)

    # -- metadata --------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"PriorStore({self.url!r}, images={len(self)}, K={self.num_eigs}, fingerprint={self.fingerprint[:12]})"

    @cached_property
    def _meta(self) -> dict[str, np.ndarray]:
        return {name: self._read(name) for name in ("status", "grid", "image_size", "eigvals", "residual")}

    def _read(self, name: str, selection=slice(None)) -> np.ndarray:
        try:
            return np.asarray(self._arrays[name][selection])
        except (KeyError, ValueError, RuntimeError, OSError, TypeError) as exc:
            raise StoreError(f"cannot decode {self.url}/{name} ({type(exc).__name__}: {exc}); the object is "
                             "truncated or damaged: run `sazs-store verify` and pull or re-create the store") from None

    def status(self) -> np.ndarray:
        return self._meta["status"]

    def done_ids(self) -> list[str]:
        return [self.ids[i] for i in np.flatnonzero(self.status() == DONE)]

    def pending_ids(self) -> list[str]:
        return [self.ids[i] for i in np.flatnonzero(self.status() == PENDING)]

    def failures(self) -> dict[str, str]:
        failed = np.flatnonzero(self.status() == FAILED)
        if not len(failed):
            return {}
        errors = self._read("errors")
        return {self.ids[i]: str(errors[i]) for i in failed}

    def counts(self) -> dict[str, int]:
        status = self.status()
        return {"done": int((status == DONE).sum()), "failed": int((status == FAILED).sum()),
                "pending": int((status == PENDING).sum())}

    def index(self, id_: str) -> int:
        try:
            return self._index[id_]
        except KeyError:
            raise KeyError(f"image id {id_!r} is not in store {self.url}") from None

    # -- priors ----------------------------------------------------------------------------

    def get(self, id_: str) -> Prior:
        """Eigenvectors of one image cropped to its grid (K, h, w), with eigenvalues and residuals."""
        i = self.index(id_)
        meta = self._meta
        status = int(meta["status"][i])
        if status != DONE:
            reason = str(self._read("errors", i)) if status == FAILED else "not computed yet"
            raise StoreError(f"no priors for {id_!r} in {self.url}: {reason}")
        h, w = (int(x) for x in meta["grid"][i])
        return Prior(
            id=id_,
            eigvals=meta["eigvals"][i].copy(),
            eigvecs=self._read("eigvecs", (i, slice(None), slice(0, h), slice(0, w))).astype(np.float32),
            residuals=meta["residual"][i].copy(),
            grid=(h, w),
            image_size=(int(meta["image_size"][i][0]), int(meta["image_size"][i][1])),
        )

    def get_many(self, ids: list[str]) -> list[Prior]:
        return [self.get(id_) for id_ in ids]

    # -- dataset-wide views ------------------------------------------------------------------

    def to_dask(self) -> dict:
        """Every array as a lazy dask array, chunked as stored (eigvecs: one image per chunk)."""
        import dask.array as da

        return {name: da.from_zarr(array) for name, array in self._arrays.items()}


def open_store(url: str | Path, *, storage_options: dict | None = None) -> PriorStore:
    """Open a prior store read-only: a local path, or s3://, gs://, memory://... through fsspec."""
    return PriorStore(url, storage_options=storage_options)
