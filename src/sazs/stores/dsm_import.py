"""``import_dsm``: a folder of Deep Spectral Methods eigenvector files as a prior store.

What an imported store holds (DSM's generalised vectors v, its sign rule, NaN residuals, a
manifest that invents no settings) and why is in stores/dsm.py. Two passes: the first reads
every file's size, grid and SHA-256 (the fingerprint covers them), the second converts and
writes shard by shard, checking that no file changed in between.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sazs.core.limits import MAX_EIGS, MAX_GRID_SIDE

from .dsm import (
    DSM_LAPLACIAN,
    DSM_PATCH_SIZE,
    DSM_SIGN_CONVENTION,
    FLOAT16_MAX,
    DsmFileError,
    from_generalised,
    id_path,
    load_dsm_bytes,
    read_dsm_file,
)
from .format import StoreError
from .integrity import EIGVAL_RANGE
from .manifest import build_manifest
from .writer import ImageResult, StoreWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportConfig:
    patch_size: int = DSM_PATCH_SIZE  # grid = (H // P, W // P) when a file carries none
    grid: tuple[int, int] | None = None  # one grid for every image (overrides the above)
    num_eigs: int | None = None  # keep the first K (None: K of the files)
    shard_size: int = 64
    overwrite: bool = False
    retry_failed: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"--patch-size must be >= 1, got {self.patch_size}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.grid is not None and not all(1 <= g <= MAX_GRID_SIDE for g in self.grid):
            raise ValueError(f"--grid {self.grid} must be two sides in 1..{MAX_GRID_SIDE}")
        if self.num_eigs is not None and not 2 <= self.num_eigs <= MAX_EIGS:
            raise ValueError(f"--keep-eigs must be in 2..{MAX_EIGS}, got {self.num_eigs}")


@dataclass
class _Scan:
    """What the first pass learnt of one image: its file's digest and grid, or why it fails."""

    image_size: tuple[int, int] = (0, 0)
    grid: tuple[int, int] = (0, 0)
    num_eigs: int = 0
    sha256: str = ""
    error: str | None = None


def _scan_one(path: Path, id_: str, image_size: Callable[[str], tuple[int, int]], cfg: ImportConfig) -> _Scan:
    out = _Scan()
    try:
        out.image_size = tuple(int(x) for x in image_size(id_))
    except (OSError, ValueError) as exc:
        out.error = f"cannot read the image's size: {exc}"
        return out
    if not path.is_file():
        out.error = f"no DSM file {path}"
        return out
    try:
        data, out.sha256 = read_dsm_file(path)
        vals, vecs, file_grid = load_dsm_bytes(data, str(path))
    except (DsmFileError, OSError) as exc:
        out.error = str(exc)
        return out
    h, w = out.image_size
    grid = cfg.grid or file_grid or (h // cfg.patch_size, w // cfg.patch_size)
    how = (
        "--grid" if cfg.grid else "the file's 'grid'" if file_grid else f"image {h}x{w} // patch size {cfg.patch_size}"
    )
    if grid[0] * grid[1] != vecs.shape[1] or min(grid) < 1:
        out.error = (
            f"{path}: {vecs.shape[1]} entries per eigenvector, but the grid is {grid[0]}x{grid[1]} (from "
            f"{how}); pass the patch size DSM used (--patch-size) or --grid HxW"
        )
        return out
    if max(grid) > MAX_GRID_SIDE:
        out.error = f"{path}: grid {grid} exceeds {MAX_GRID_SIDE} patches a side"
        return out
    out.grid, out.num_eigs = grid, vecs.shape[0]
    return out


def _convert(data: bytes, path: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(eigvals (k,), vectors (k, n)) of one file, checked and scaled; DsmFileError otherwise."""
    vals, vecs, _ = load_dsm_bytes(data, str(path))
    if vecs.shape[0] < k:
        raise DsmFileError(f"{path} holds {vecs.shape[0]} eigenvectors, fewer than the K={k} of this import")
    vals, vecs = vals[:k], vecs[:k]
    if not (np.isfinite(vals).all() and np.isfinite(vecs).all()):
        raise DsmFileError(f"{path} holds NaN or infinite values")
    low, high = EIGVAL_RANGE
    if vals.min() < low or vals.max() > high:
        raise DsmFileError(
            f"{path}: eigenvalues {vals.min():.4g}..{vals.max():.4g} are outside [0, 2], so not "
            "those of a normalised Laplacian (DSM's which_matrix='laplacian' with lapnorm=True)"
        )
    if np.any(np.diff(vals) < -1e-6):
        raise DsmFileError(f"{path}: eigenvalues are not ascending")
    vecs = from_generalised(vecs)
    if np.abs(vecs).max() > FLOAT16_MAX:
        raise DsmFileError(f"{path}: eigenvector entries up to {np.abs(vecs).max():.3g} do not fit float16")
    if k > 1 and not np.abs(vecs[1:]).max(axis=1).all():
        raise DsmFileError(f"{path}: an eigenvector is all zeros")
    return vals.astype(np.float32), vecs


def import_dsm(
    eigs_dir: str | Path,
    out: str | Path,
    *,
    ids: Sequence[str],
    image_size: Callable[[str], tuple[int, int]],
    dataset: dict,
    cfg: ImportConfig = ImportConfig(),
) -> dict[str, int]:
    """Write the DSM files ``eigs_dir/{id}.pth`` of ``ids`` as the prior store ``out``; counts by status.

    ``image_size(id)`` gives the image's (H, W) (OSError/ValueError for an unreadable image);
    ``dataset`` is the dataset's description (``Dataset.describe()``) for the manifest. A file
    that is missing, of the wrong shape, not a plain-tensor pickle, or whose values are not
    those of a normalised Laplacian is a failed image with its reason. Resumable: a re-run
    over the same files resumes the store; the store is left unfinalised (``finalize`` it).
    """
    from tqdm.auto import tqdm

    eigs_dir = Path(eigs_dir)
    if not eigs_dir.is_dir():
        raise FileNotFoundError(f"{eigs_dir} is not a directory of DSM eigenvector files")
    ids = list(ids)
    if not ids:
        raise ValueError("the dataset has no images; nothing to import")
    scans: dict[str, _Scan] = {}
    for id_ in tqdm(ids, desc="scan", unit="file", disable=not cfg.progress):
        try:
            path = id_path(eigs_dir, id_, ".pth")
        except ValueError as exc:
            scans[id_] = _Scan(error=str(exc))
            continue
        scans[id_] = _scan_one(path, id_, image_size, cfg)
    good = [s for s in scans.values() if s.error is None]
    if not good:
        examples = "; ".join(f"{i}: {s.error}" for i, s in list(scans.items())[:3])
        raise StoreError(f"none of the {len(ids)} images has a usable DSM file in {eigs_dir} ({examples})")
    k = cfg.num_eigs or int(np.bincount([s.num_eigs for s in good]).argmax())
    for s in good:
        if s.num_eigs < k:
            s.error = f"holds {s.num_eigs} eigenvectors, fewer than the K={k} of the other files"
    good = [s for s in good if s.error is None]
    if not good:
        raise StoreError(f"no DSM file in {eigs_dir} holds K={k} eigenvectors")
    max_grid = [max(s.grid[0] for s in good), max(s.grid[1] for s in good)]
    source = hashlib.sha256("".join(f"{i}\t{s.sha256}\n" for i, s in scans.items()).encode()).hexdigest()
    manifest = imported_manifest(
        dataset,
        eigs_dir,
        num_eigs=k,
        max_grid=max_grid,
        shard_size=cfg.shard_size,
        patch_size=cfg.patch_size,
        grid=cfg.grid,
        source_sha256=source,
        num_files=len(good),
    )
    with StoreWriter.open(out, ids=ids, manifest=manifest, overwrite=cfg.overwrite) as writer:
        todo = writer.todo(retry_failed=cfg.retry_failed)
        bar = tqdm(total=sum(map(len, todo.values())), desc="import", unit="img", disable=not cfg.progress)
        for shard, indices in sorted(todo.items()):
            results = [_import_one(i, ids[i], scans[ids[i]], eigs_dir, k) for i in indices]
            writer.write_shard(shard, results)
            bar.update(len(indices))
        bar.close()
        counts = writer.counts()
    log.info("imported %s -> %s: %d done, %d failed", eigs_dir, out, counts["done"], counts["failed"])
    return counts


def _import_one(index: int, id_: str, scan: _Scan, eigs_dir: Path, k: int) -> ImageResult:
    if scan.error is not None:
        return ImageResult(index=index, image_size=scan.image_size, error=scan.error)
    path = id_path(eigs_dir, id_, ".pth")
    try:
        data, digest = read_dsm_file(path)
        if digest != scan.sha256:
            raise DsmFileError(f"{path} changed during the import; re-run it")
        vals, vecs = _convert(data, path, k)
    except (DsmFileError, OSError) as exc:
        return ImageResult(index=index, image_size=scan.image_size, error=str(exc))
    h, w = scan.grid
    return ImageResult(
        index=index,
        image_size=scan.image_size,
        grid=(h, w),
        eigvals=vals,
        eigvecs=vecs.reshape(k, h, w),
        residuals=np.full(k, np.nan, np.float32),
    )


def imported_manifest(
    dataset: dict,
    eigs_dir: Path,
    *,
    num_eigs: int,
    max_grid: list[int],
    shard_size: int,
    patch_size: int,
    grid: tuple[int, int] | None,
    source_sha256: str,
    num_files: int,
) -> dict:
    """The manifest of an imported store: what is known, nothing invented (see the module docstring)."""
    grid_rule = (
        f"{grid[0]}x{grid[1]} for every image (--grid)"
        if grid
        else f"the file's 'grid', else (H // {patch_size}, W // {patch_size})"
    )
    return build_manifest(
        dataset=dataset,
        extractor={
            "name": "imported",
            "architecture": None,
            "weights": None,
            "weights_sha256": None,
            "facet": None,
            "input_size_policy": {"patch_size": patch_size, "grid": grid_rule},
            "source_sha256": source_sha256,
        },
        graph={"name": "imported"},
        solver={"solver": "imported"},
        num_eigs=num_eigs,
        layout={"shard_size": shard_size, "max_grid": list(max_grid), "eigvecs_dtype": "float16"},
        laplacian=DSM_LAPLACIAN,
        sign_convention=DSM_SIGN_CONVENTION,
        extra={
            "imported": {
                "from": "deep-spectral-methods",
                "source": str(eigs_dir.resolve()),
                "num_files": num_files,
                "files_sha256": source_sha256,
            }
        },
    )
