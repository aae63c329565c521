"""Reading a prior store: ids, manifest, and per-image priors cropped to their grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .manifest import FORMAT_NAME, FORMAT_VERSION, REQUIRED_KEYS
from .writer import DONE, FAILED, StoreError


@dataclass
class Prior:
    """The priors of one image: eigenvectors (K, h, w) on its patch grid."""

    id: str
    eigvals: np.ndarray  # (K,) float32 ascending
    eigvecs: np.ndarray  # (K, h, w) float32
    residuals: np.ndarray  # (K,) float32
    grid: tuple[int, int]
    image_size: tuple[int, int]


class PriorStore:
    """Read-only view of a prior store."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if not (Path(path) / "zarr.json").is_file():
            raise StoreError(f"{path} is not a prior store (no zarr.json); run `sazs-priors run` to create one")
        self.group = zarr.open_group(self.path, mode="r")
        manifest = self.group.attrs.get("manifest")
        if not isinstance(manifest, dict):
            raise StoreError(f"{path} is a Zarr group but has no sazs manifest in its attributes")
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if manifest.get("format") != FORMAT_NAME or missing:
            raise StoreError(f"{path}: manifest is not a {FORMAT_NAME} manifest (missing {missing})")
        major = str(manifest["format_version"]).split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise StoreError(
                f"{path} is format version {manifest['format_version']}, this sazs reads "
                f"{FORMAT_VERSION.split('.')[0]}.x; upgrade sazs to read it"
            )
        self.manifest = dict(manifest)
        self.ids: list[str] = [str(x) for x in self.group["ids"][:]]
        self._index = {id_: i for i, id_ in enumerate(self.ids)}

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return len(self.ids)

    def status(self) -> np.ndarray:
        return np.asarray(self.group["status"][:])

    def done_ids(self) -> list[str]:
        return [self.ids[i] for i in np.flatnonzero(self.status() == DONE)]

    def failures(self) -> dict[str, str]:
        failed = np.flatnonzero(self.status() == FAILED)
        errors = self.group["errors"]
        return {self.ids[i]: str(errors[int(i)]) for i in failed}

    def index(self, id_: str) -> int:
        try:
            return self._index[id_]
        except KeyError:
            raise KeyError(f"image id {id_!r} is not in store {self.path}") from None

    def get(self, id_: str) -> Prior:
        i = self.index(id_)
        status = int(self.group["status"][i])
        if status != DONE:
            reason = str(self.group["errors"][i]) if status == FAILED else "not computed yet"
            raise StoreError(f"no priors for {id_!r} in {self.path}: {reason}")
        h, w = (int(x) for x in self.group["grid"][i])
        return Prior(
            id=id_,
            eigvals=np.asarray(self.group["eigvals"][i]),
            eigvecs=np.asarray(self.group["eigvecs"][i, :, :h, :w], dtype=np.float32),
            residuals=np.asarray(self.group["residual"][i]),
            grid=(h, w),
            image_size=tuple(int(x) for x in self.group["image_size"][i]),
        )


def open_store(path: str | Path) -> PriorStore:
    return PriorStore(path)
