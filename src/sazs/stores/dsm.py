"""Deep Spectral Methods eigenvector files: what they hold, reading and writing one, the u <-> v conversions.

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

**DSM → store** (``import_dsm``, stores/dsm_import.py). The files do not hold D, so u cannot be recovered:
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
import os
from pathlib import Path

import numpy as np

from sazs.core.limits import MAX_DSM_FILE_BYTES
from sazs.core.torchfiles import TorchFileError, load_torch_file

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

    The zip's sizes are checked first (at most MAX_DSM_FILE_BYTES unpacked, no decompression
    bomb), then ``torch.load(weights_only=True)``: only tensors, numbers, strings and
    containers are unpickled; a file naming any other global is refused before anything of it runs.
    """
    import torch

    try:
        obj = load_torch_file(data, name, max_unpacked=MAX_DSM_FILE_BYTES)
    except TorchFileError as exc:
        raise DsmFileError(str(exc)) from None
    # A malformed or hostile pickle can fail in any way inside the unpickler; each is a
    # recorded failure of that one file, never a crash of the import.
    except Exception as exc:
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
    if size > MAX_DSM_FILE_BYTES:
        raise DsmFileError(f"{path} is {size} bytes, more than the eigenvectors of any image a store holds")
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def id_path(root: Path, id_: str, suffix: str) -> Path:
    """``root/{id}{suffix}``; an id with '/' is a subfolder. ValueError for an id that would leave ``root``."""
    parts = id_.split("/")
    if not id_ or "\\" in id_ or "\0" in id_ or any(p in ("", ".", "..") for p in parts) or os.path.isabs(id_):
        raise ValueError(f"image id {id_!r} is not a safe relative file name")
    return root.joinpath(*parts[:-1], parts[-1] + suffix)
