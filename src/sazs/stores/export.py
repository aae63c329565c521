"""``sazs-store export``: a store's priors as the files other tools read, one image at a time.

Formats (``OUT/{id}…``; an id with '/' is a subfolder, an id that would leave OUT fails):

* ``sazs-png`` — the eigen-mask PNGs the released SAZS evaluation reads
  (``pascal_vit.py test_sp``: ``{eig_dir}/{name}_k{i}.png`` for i = 0..K-1, pixels equal to
  255 are the mask). ``{id}_k{i}.png`` holds the non-trivial eigenvector i + 1 of the store
  (k0 is the Fiedler vector; the trivial vector 0 is never written), for i = 0..n-1
  (n = ``--num-vectors``, default 5 as SAZS uses). Each is 8-bit grayscale at the image's
  resolution (``image_size`` H x W, rows top to bottom, like the image): the eigenvector is
  upsampled from its patch grid, which covers the whole image, by bilinear interpolation
  with cell centres on pixel centres (``align_corners=False``, as ``sazs-eval`` does), then
  thresholded: 255 where it is > 0 (the minority side by the store's sign convention), else 0.
* ``dsm`` — one ``{id}.pth`` in the Deep Spectral Methods layout (stores/dsm.py): float32
  ``eigenvalues`` (K,) and ``eigenvectors`` (K, h*w) (the generalised v, their sign rule),
  plus ``grid`` (2,) int64; loads with ``torch.load(path, weights_only=True)``.
* ``npz`` — one ``{id}.npz`` (``np.load(path)``, no pickle): ``eigvals`` (K,) float32,
  ``eigvecs`` (K, h, w) float32 as stored, ``residuals`` (K,), ``grid`` (2,), ``image_size``
  (2,), ``vectors`` ("u", or "v" for an imported store), ``id``, ``fingerprint``.
* ``segments`` — one ``{id}.png``: the image's segment map (:func:`sazs.segments.maps.segment_map`,
  spectral clustering of the rows of v1..vn, no ground truth), one label 0..S-1 per segment, at
  the image's original size; mode L, or I;16 above 256 segments. n = ``--num-vectors`` (default
  :class:`sazs.segments.maps.SegmentConfig`'s); with ``refine`` the segments' borders are
  refined with the image, as for object-masks.
* ``object-masks`` — one ``{id}.png``: the image's object mask (:func:`sazs.segments.objects.prior_object_mask`,
  no ground truth), mode L, 0 background / 255 object, at the image's original size; with
  ``refine`` refined with the image (``load_image``). n = ``--num-vectors`` (default ObjectConfig's).

For dsm and npz, ``--num-vectors n`` keeps the trivial vector and the first n non-trivial
ones (n + 1 in all; default: all K). Images without priors (failed, pending) are listed and
skipped. Resumable: each file is written to a temporary name and renamed, so a file that
exists is complete and a re-run skips it; ``OUT/sazs-export.json`` records the store's
fingerprint, the format and n, and a re-run into an OUT made from another store or with
other settings is refused unless ``--overwrite``.
"""

from __future__ import annotations

import errno
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sazs.core.files import write_atomic
from sazs.core.registry import Registry
from sazs.segments.maps import SegmentConfig, encode_png, prior_segments
from sazs.segments.objects import ObjectConfig, encode_mask_png, prior_object_mask

from .dsm import dsm_record, holds_generalised, id_path, to_generalised
from .format import DONE, FAILED, StoreError, TransportError
from .reader import Prior, PriorStore, open_store
from .writer import disk_errors

log = logging.getLogger(__name__)

SAZS_NUM_VECTORS = 5  # the K of the released SAZS eigen masks
MARKER = "sazs-export.json"


@dataclass(frozen=True)
class ExportConfig:
    format: str
    ids: tuple[str, ...] | None = None  # None: every image of the store
    limit: int | None = None  # the first N images with priors (of ids)
    num_vectors: int | None = None  # non-trivial vectors (None: 5 for sazs-png, all for dsm/npz)
    overwrite: bool = False
    progress: bool = True
    refine: str | None = None  # object-masks, segments: a refiner of sazs.segments.refine (needs load_image)

    def __post_init__(self) -> None:
        FORMATS.check(self.format)
        if self.refine is not None and not FORMATS.entry(self.format).meta["refines"]:
            refinable = [name for name in FORMATS if FORMATS.entry(name).meta["refines"]]
            raise ValueError(f"--refine is for --format {' or '.join(refinable)}, not {self.format}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.num_vectors is not None and self.num_vectors < 1:
            raise ValueError(f"--num-vectors must be >= 1, got {self.num_vectors}")


@dataclass
class ExportSummary:
    out: str
    format: str
    num_vectors: int
    written: int = 0
    existing: int = 0  # complete from an earlier run, skipped
    failed: dict[str, str] = field(default_factory=dict)  # export failures: {id: reason}
    no_priors: dict[str, str] = field(default_factory=dict)  # failed or pending in the store

    def line(self) -> str:
        text = (
            f"exported {self.written} image(s) to {self.out} ({self.format}, {self.num_vectors} vector(s)); "
            f"{self.existing} already there"
        )
        if self.no_priors:
            text += f"; {len(self.no_priors)} without priors skipped"
        if self.failed:
            shown = "; ".join(f"{k}: {v}" for k, v in list(self.failed.items())[:3])
            text += f"; {len(self.failed)} FAILED ({shown})"
        return text


# -- per image ------------------------------------------------------------------------------------


def upsample(eigvecs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) on the patch grid -> (K, H, W): bilinear, cell centres on pixel centres."""
    import torch
    import torch.nn.functional as F

    v = torch.from_numpy(np.ascontiguousarray(eigvecs, dtype=np.float32))[None]
    return F.interpolate(v, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[0].numpy()


def eigen_masks(prior: Prior, num_vectors: int) -> list[np.ndarray]:
    """The SAZS masks of one image: (H, W) uint8, 255 where non-trivial vector i + 1 > 0, for i < n."""
    h, w = prior.image_size
    if h < 1 or w < 1:
        raise ValueError(f"its image size {h}x{w} is unknown")
    up = upsample(prior.eigvecs[1 : 1 + num_vectors], (h, w))
    return [np.where(vec > 0, 255, 0).astype(np.uint8) for vec in up]


def _png_bytes(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _dsm_bytes(prior: Prior, k: int, generalised: bool) -> bytes:
    import torch

    vecs = prior.eigvecs[:k]
    v = vecs.reshape(k, -1) if generalised else to_generalised(vecs)
    buf = io.BytesIO()
    torch.save(dsm_record(prior.eigvals[:k], v, prior.grid), buf)
    return buf.getvalue()


def _npz_bytes(prior: Prior, k: int, vectors: str, fingerprint: str) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        eigvals=prior.eigvals[:k].astype(np.float32),
        eigvecs=prior.eigvecs[:k].astype(np.float32),
        residuals=prior.residuals[:k].astype(np.float32),
        grid=np.asarray(prior.grid, np.int32),
        image_size=np.asarray(prior.image_size, np.int32),
        vectors=np.str_(vectors),
        id=np.str_(prior.id),
        fingerprint=np.str_(fingerprint),
    )
    return buf.getvalue()


# -- the run ----------------------------------------------------------------------------------------


def _select(store: PriorStore, cfg: ExportConfig) -> tuple[list[str], dict[str, str]]:
    """(ids to export, {id: why not} of the chosen ids without priors)."""
    chosen = list(dict.fromkeys(cfg.ids)) if cfg.ids else store.ids
    for id_ in chosen:
        store.index(id_)  # KeyError naming the id and the store
    status = store.status()
    failures = store.failures() if (status == FAILED).any() else {}
    done, skipped = [], {}
    for id_ in chosen:
        s = int(status[store.index(id_)])
        if s == DONE:
            done.append(id_)
        else:
            skipped[id_] = f"failed in the store: {failures.get(id_, '')}" if s == FAILED else "pending in the store"
    return done[: cfg.limit], skipped


def _check_marker(out: Path, marker: dict, overwrite: bool) -> None:
    path = out / MARKER
    if not path.exists() or overwrite:
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = {}
    keys = ("fingerprint", "format", "num_vectors", "refine")
    if not isinstance(old, dict) or any(old.get(k) != marker[k] for k in keys):
        got = {k: old.get(k) for k in keys} if isinstance(old, dict) else old
        raise StoreError(
            f"{out} holds an export of another store or setting ({got}, now "
            f"{ {k: marker[k] for k in keys} }); choose another output folder or pass --overwrite"
        )


def export_store(
    url: str, out: str | Path, cfg: ExportConfig, *, storage_options: dict | None = None, load_image=None
) -> ExportSummary:
    """Export the priors of ``url`` to the folder ``out`` in ``cfg.format``; resumable (see module docstring).

    ``load_image(id) -> (H, W, 3) uint8`` (raising ValueError) is needed with ``cfg.refine``."""
    if cfg.refine and load_image is None:
        raise ValueError(f"--refine {cfg.refine} needs the images (load_image)")
    from tqdm.auto import tqdm

    store = open_store(url, storage_options=storage_options)
    k_all = store.num_eigs
    default = FORMATS.entry(cfg.format).meta["num_vectors"] or k_all - 1
    n = cfg.num_vectors or min(default, k_all - 1)
    if not 1 <= n <= k_all - 1:
        raise ValueError(
            f"--num-vectors {n}: {store.url} holds K={k_all} eigenvectors, so at most {k_all - 1} non-trivial ones"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out} is a file; export writes a folder: choose another output path")
    ids, no_priors = _select(store, cfg)
    generalised = holds_generalised(store.manifest)
    marker = {
        "store": store.url,
        "fingerprint": store.fingerprint,
        "format": cfg.format,
        "num_vectors": n,
        "vectors": "v" if generalised else "u",
        "refine": cfg.refine,
    }
    summary = ExportSummary(out=str(out), format=cfg.format, num_vectors=n, no_priors=no_priors)
    with disk_errors(out, f"exporting to {out}"):
        out.mkdir(parents=True, exist_ok=True)
        _check_marker(out, marker, cfg.overwrite)
        write_atomic(out / MARKER, json.dumps(marker, indent=2).encode())
        for id_ in tqdm(ids, desc=f"export {cfg.format}", unit="img", disable=not cfg.progress):
            try:
                paths = _paths(out, id_, cfg.format, n)
                if not cfg.overwrite and all(p.exists() for p in paths):
                    summary.existing += 1
                    continue
                prior = store.get(id_)
                image = load_image(id_) if cfg.refine else None
                encoded = _encode(prior, cfg.format, n, generalised, store.fingerprint, image=image, refine=cfg.refine)
                for path, data in zip(paths, encoded):
                    _check_inside(out, path)
                    write_atomic(path, data)
            except TransportError:
                raise  # the server, not this image: every other read would fail (or wait) the same
            except (ValueError, StoreError) as exc:  # DsmFileError is a ValueError
                summary.failed[id_] = str(exc)
                continue
            except OSError as exc:
                if exc.errno not in _PER_FILE_ERRORS:
                    raise  # a full or read-only disk: disk_errors says so in one line
                summary.failed[id_] = f"cannot write {exc.filename or id_}: {exc.strerror}"
                continue
            summary.written += 1
    if no_priors:
        log.warning(
            "%d image(s) have no priors in %s and were skipped (e.g. %s)",
            len(no_priors),
            store.url,
            list(no_priors)[:3],
        )
    return summary


# Errors of one file's name or place (a 251-character id, a folder where a file goes): that
# image fails, the export goes on.
_PER_FILE_ERRORS = (errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EEXIST)


def _check_inside(out: Path, path: Path) -> None:
    """ValueError if a folder between ``out`` and ``path`` (an id's subfolder) is a symbolic link:
    writing through it would write outside OUT."""
    for parent in reversed(path.relative_to(out).parents[:-1]):
        if (out / parent).is_symlink():
            raise ValueError(f"{out / parent} is a symbolic link; refusing to write through it (outside {out})")


def _paths(out: Path, id_: str, fmt: str, n: int) -> list[Path]:
    return [id_path(out, id_, suffix) for suffix in FORMATS.entry(fmt).meta["suffixes"](n)]


def _encode(prior: Prior, fmt: str, n: int, generalised: bool, fingerprint: str, *, image=None, refine=None):
    return FORMATS[fmt](prior, n, generalised, fingerprint, image, refine)


# name -> encode(prior, n, generalised, fingerprint, image, refine) -> one bytes per path; meta: the
# files' suffixes for n vectors, the default n (None: every non-trivial vector), whether --refine applies.
FORMATS: Registry[Callable[..., list[bytes]]] = Registry("export format")
FORMATS.add(
    "sazs-png",
    lambda prior, n, *_: [_png_bytes(m) for m in eigen_masks(prior, n)],
    help="the released SAZS evaluation's eigen masks, <id>_k<i>.png",
    suffixes=lambda n: [f"_k{i}.png" for i in range(n)],
    num_vectors=SAZS_NUM_VECTORS,
    refines=False,
)
FORMATS.add(
    "dsm",
    lambda prior, n, generalised, *_: [_dsm_bytes(prior, n + 1, generalised)],
    help="Deep Spectral Methods' <id>.pth",
    suffixes=lambda n: [".pth"],
    num_vectors=None,
    refines=False,
)
FORMATS.add(
    "npz",
    lambda prior, n, generalised, fingerprint, *_: [_npz_bytes(prior, n + 1, "v" if generalised else "u", fingerprint)],
    help="<id>.npz, the arrays as stored (np.load, no pickle)",
    suffixes=lambda n: [".npz"],
    num_vectors=None,
    refines=False,
)
FORMATS.add(
    "object-masks",
    lambda prior, n, _g, _f, image, refine: [
        encode_mask_png(prior_object_mask(prior, ObjectConfig(num_vectors=n), image=image, refine=refine))
    ],
    help="GT-free object masks, <id>.png with 0 / 255",
    suffixes=lambda n: [".png"],
    num_vectors=ObjectConfig.num_vectors,
    refines=True,
)
FORMATS.add(
    "segments",
    lambda prior, n, _g, _f, image, refine: [
        encode_png(prior_segments(prior, SegmentConfig(num_vectors=n), image=image, refine=refine))
    ],
    help="GT-free segment maps, <id>.png with one label per segment",
    suffixes=lambda n: [".png"],
    num_vectors=SegmentConfig.num_vectors,
    refines=True,
)
