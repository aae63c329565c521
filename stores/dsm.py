"""Deep Spectral Methods eigenvector files, both ways: export a store to them, import them as a store.

Deep Spectral Methods (DSM; Melas-Kyriazi et al., CVPR 2022, ``extract.py extract_eigs``)
saves one ``{id}.pth`` per image, ``torch.save({'eigenvalues': (K,), 'eigenvectors': (K, h*w)})``:
the K smallest solutions of the generalised problem (D - W) v = λ D v (scipy ``eigsh`` with
``M = D``, their default ``lapnorm=True``), i.e. v = D^-1/2 u with u the vectors of the
normalised Laplacian this project stores: the same eigenvalues, D-orthonormal vectors, the
trivial one constant. The vectors are row-major on the patch grid (H // P, W // P) of the
full-resolution image cropped to a multiple of the patch size P (no resizing). Their sign
rule: a vector whose positive entries are more than half, but not all, of the patches is
negated.

**Store → DSM** (:func:`to_generalised`). The store holds u and not the degrees, but its
trivial vector is u0 = D^1/2 1 / ||D^1/2 1||, so d ∝ u0². With the scale fixed by a mean
degree of 1 (d = N u0², N = h·w), v_k = u_k / (sqrt(N) |u0|): D-orthonormal for those
degrees, and v0 = 1/sqrt(N) is the constant DSM's trivial vector is (DSM's own scale
depends on the volume of its graph, which only rescales each image's vectors). Then DSM's
sign rule. An image whose u0 is not of one sign (a graph in several pieces) has no such
degrees and is a failure, named.

**DSM → store** (:func:`import_dsm`). The files do not hold D, so u cannot be recovered:
an imported store keeps v, each image's vectors scaled by 1 / ||v0|| (the mean-degree-1
scale above, so that an exported store re-imports to the vectors it exported), with DSM's
signs. Its manifest says so: ``laplacian`` is :data:`DSM_LAPLACIAN`, ``sign_convention``
is DSM's rule, and ``imported`` names the source directory; extractor, graph and solver
hold only what is known (the patch size, and the marker ``imported``), never invented
settings. The fingerprint covers the dataset, K and the SHA-256 of the files' contents,
so two imports of the same files are interchangeable and imports of different files are
not. Residuals cannot be computed without the graph: they are NaN, and ``verify`` does not
count that as damage for an imported store (``stores/integrity.py``).

Files are read with ``torch.load(weights_only=True)``: a pickle naming anything but plain
tensors and containers is refused by torch before it runs, and the image is recorded as a
failure with the reason, like a file of the wrong shape. Nothing from a file is executed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import StoreError
from .manifest import build_manifest
from .schema import MAX_CHUNK_BYTES, MAX_EIGS, MAX_GRID_SIDE
from .writer import ImageResult, StoreWriter

log = logging.getLogger(__name__)

DSM_LAPLACIAN = {
    "type": "random-walk (generalised)",
    "formula": "(D - W) v = lambda D v",
    "vectors": "v = D^-1/2 u: generalised eigenvectors as Deep Spectral Methods saves them, each image's "
    "scaled by 1/||v0|| (mean degree 1); not orthonormal",
}
DSM_SIGN_CONVENTION = (
    "Deep Spectral Methods: a vector with more than half, but not all, of its entries positive is negated"
)
DSM_PATCH_SIZE = 16  # DSM's default model, dino_vits16
MAX_FILE_BYTES = 2 * MAX_CHUNK_BYTES  # float32 on disk: twice the largest image a store holds
EIGVAL_RANGE = (-1e-3, 2 + 1e-3)  # eigenvalues of the normalised Laplacian (what verify accepts)
FLOAT16_MAX = 65504.0


class DsmFileError(ValueError):
    """A DSM file that cannot be used; ``str(err)`` is the one-line reason."""


def holds_generalised(manifest: dict) -> bool:
    """True when the store holds DSM's generalised vectors v (an imported store), False for u."""
    laplacian = manifest.get("laplacian")
    return isinstance(laplacian, dict) and laplacian.get("type") == DSM_LAPLACIAN["type"]


# -- the conversions ----------------------------------------------------------------------------


def dsm_signs(vecs: np.ndarray) -> np.ndarray:
    """DSM's sign rule on (K, n) vectors: negate those with more than half, but not all, entries > 0."""
    positive = (vecs > 0).mean(axis=1)
    flip = (positive > 0.5) & (positive < 1.0)
    return np.where(flip[:, None], -vecs, vecs)


def to_generalised(eigvecs: np.ndarray) -> np.ndarray:
    """(K, h*w) float32 DSM vectors v from the store's u (K, h, w), scaled for a mean degree of 1.

    DsmFileError when u0 is not of one sign (no degrees can be read from it).
    """
    k = eigvecs.shape[0]
    u = eigvecs.reshape(k, -1).astype(np.float64)
    u0 = np.abs(u[0])
    if u0.min() <= 1e-4 * u0.max() or not (np.all(u[0] >= 0) or np.all(u[0] <= 0)):
        raise DsmFileError(
            "its trivial eigenvector is not of one sign (the patch graph is in several pieces), "
            "so the degrees that turn u into DSM's v are unknown; export it as npz instead"
        )
    v = u / (np.sqrt(u.shape[1]) * u0)
    return dsm_signs(v).astype(np.float32)


def from_generalised(eigvecs: np.ndarray) -> np.ndarray:
    """DSM vectors (K, n) scaled so that the trivial one has unit norm (the mean-degree-1 scale)."""
    v = eigvecs.astype(np.float64)
    norm = np.linalg.norm(v[0])
    if not np.isfinite(norm) or norm == 0:
        raise DsmFileError("its first (trivial) eigenvector is zero or not finite")
    return (v / norm).astype(np.float32)


# -- one file -----------------------------------------------------------------------------------


def dsm_record(eigvals: np.ndarray, vectors: np.ndarray, grid: tuple[int, int]) -> dict:
    """The dict a DSM ``.pth`` holds, as plain CPU tensors (``grid`` (2,) int64 added: see README)."""
    import torch

    return {
        "eigenvalues": torch.from_numpy(np.ascontiguousarray(eigvals, dtype=np.float32)),
        "eigenvectors": torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)),
        "grid": torch.tensor([int(grid[0]), int(grid[1])], dtype=torch.int64),
    }


def load_dsm_bytes(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
    """(eigenvalues (K,), eigenvectors (K, n), grid or None) of a DSM file's bytes; DsmFileError otherwise.

    ``torch.load(weights_only=True)``: only tensors, numbers, strings and containers are
    unpickled; a file naming any other global is refused before anything of it runs.
    """
    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    # A malformed or hostile pickle can fail in any way inside the unpickler; each is a
    # recorded failure of that one file, never a crash of the import.
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DsmFileError(
            f"{name} is not a plain-tensor torch file (weights_only load refused it: {reason[:300]})"
        ) from None
    if not isinstance(obj, dict) or not {"eigenvalues", "eigenvectors"} <= set(obj):
        kind = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise DsmFileError(f"{name} holds {kind}, not DSM's {{'eigenvalues', 'eigenvectors'}}")
    vals, vecs = obj["eigenvalues"], obj["eigenvectors"]
    if not (isinstance(vals, torch.Tensor) and isinstance(vecs, torch.Tensor)):
        raise DsmFileError(
            f"{name}: 'eigenvalues' and 'eigenvectors' must be tensors, got "
            f"{type(vals).__name__} and {type(vecs).__name__}"
        )
    if not (vals.is_floating_point() and vecs.is_floating_point()):
        raise DsmFileError(f"{name}: eigenvalues/eigenvectors have dtypes {vals.dtype}/{vecs.dtype}, not floats")
    if vecs.ndim != 2 or vals.ndim != 1 or vals.shape[0] != vecs.shape[0]:
        raise DsmFileError(
            f"{name}: eigenvectors have shape {tuple(vecs.shape)} and eigenvalues "
            f"{tuple(vals.shape)}; DSM's layout is (K, h*w) and (K,)"
        )
    grid = None
    if "grid" in obj:
        g = obj["grid"]
        if not (isinstance(g, torch.Tensor) and g.shape == (2,) and not g.is_floating_point()):
            raise DsmFileError(f"{name}: 'grid' is not two integers")
        grid = (int(g[0]), int(g[1]))
    return vals.double().numpy().astype(np.float64), vecs.float().numpy(), grid


def read_dsm_file(path: Path) -> tuple[bytes, str]:
    """(bytes, SHA-256) of a DSM file, refusing one larger than any image a store can hold."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DsmFileError(f"{path} is {size} bytes, more than the eigenvectors of any image a store holds")
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def id_path(root: Path, id_: str, suffix: str) -> Path:
    """``root/{id}{suffix}``; an id with '/' is a subfolder. ValueError for an id that would leave ``root``."""
    parts = id_.split("/")
    if not id_ or "\\" in id_ or "\0" in id_ or any(p in ("", ".", "..") for p in parts) or os.path.isabs(id_):
        raise ValueError(f"image id {id_!r} is not a safe relative file name")
    return root.joinpath(*parts[:-1], parts[-1] + suffix)


# -- import ---------------------------------------------------------------------------------------


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
        if self.grid is not None and not all(1 <= g <= MAX_GRID_SIDE for g in self.grid):
            raise ValueError(f"--grid {self.grid} must be two sides in 1..{MAX_GRID_SIDE}")
        if self.num_eigs is not None and not 2 <= self.num_eigs <= MAX_EIGS:
            raise ValueError(f"--num-eigs must be in 2..{MAX_EIGS}, got {self.num_eigs}")


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
