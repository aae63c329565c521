"""Dense-feature cache of a frozen backbone: its tokens computed once per image and view.

With a frozen image encoder the backbone's output for one augmented view of one image never
changes, and it is most of a training step's cost on a CPU. With a fixed set of views per
image (``DataConfig.views``: view = epoch mod N, drawn from ``view_seed`` only, so every run
of an ablation shares them) each view's tokens are computed once and read back afterwards.

Key: the backbone (SHA-256 of its parameters, architecture, feature facet, input statistics,
patch size) names a folder; the view (image id, image size, the affine map of the crop --
scale, rotation, flip, offset -- and the crop size) names a file in it. Other weights, another
configuration or another view is another key: nothing stale is ever read. Files are NumPy
``.npy`` float16 arrays read with ``allow_pickle=False`` (no code can run from a cache file),
written atomically; an unreadable file is recomputed. The cache lives outside the repository:
``$SAZS_CACHE/features`` (default ``~/.cache/sazs/features``) unless a folder is given.

Evaluation reuses it (``sazs-eval run --cache-features``): a frozen backbone's tokens of one
validation image at one input size are the same for every checkpoint trained on top of it, so
an ablation computes them once. There the view is :func:`content_view`: the image's pixels
(SHA-256) and the model's input size, whatever the file or dataset they came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sazs.core.files import atomic_file
from sazs.features.extractors import default_cache_dir

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what is stored changes


def default_feature_dir() -> Path:
    return default_cache_dir() / "features"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def backbone_key(model) -> dict:
    """What identifies a frozen backbone's tokens: weights, architecture and input handling."""
    cfg = model.cfg
    return {
        "format": CACHE_FORMAT,
        "digest": model.backbone_digest,
        "arch": cfg.arch,
        "is_clip": bool(model.is_clip),
        "patch_size": int(model.patch_size),
        "facet": "ln_post" if model.is_clip else "token",
        "renorm": None
        if model.is_clip
        else [model.renorm_scale.flatten().tolist(), model.renorm_shift.flatten().tolist()],
    }


def content_view(image: np.ndarray, input_hw: Sequence[int]) -> str:
    """The cache key of an (H, W, 3) image resized to ``input_hw`` (the whole image, no crop)."""
    digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
    return json.dumps(["content", digest, list(image.shape), [int(n) for n in input_hw]])


def _token_width(model) -> int:
    """Channels of ``model.encode``'s tokens: what the dense head takes in."""
    return int(model.head.inp[0].in_channels)


class FeatureCache:
    """Tokens (width, h, w) of one backbone, one ``.npy`` file per view."""

    def __init__(self, root: str | os.PathLike | None, backbone: dict):
        self.backbone = backbone
        self.dir = Path(root or default_feature_dir()) / _sha(json.dumps(backbone, sort_keys=True))[:24]
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "backbone.json"
        if not meta.is_file():
            meta.write_text(json.dumps(backbone, indent=1, sort_keys=True) + "\n")
        self.hits = self.misses = 0

    def path(self, view: str) -> Path:
        return self.dir / f"{_sha(view)[:40]}.npy"

    def get(self, view: str, shape: tuple[int, int, int] | None = None) -> np.ndarray | None:
        """The cached tokens of ``view``, or None (missing, unreadable, or not of ``shape``: recomputed).

        The .npy header is checked before any data is read: float16, the expected shape, and
        a file exactly that long, so a damaged or foreign file never allocates more than its size.
        """
        path = self.path(view)
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_2_0 if version == (2, 0) else np.lib.format.read_array_header_1_0
                )
                found, fortran, dtype = read_header(f)
                data_bytes = os.fstat(f.fileno()).st_size - f.tell()
            want = f"float16 {shape}" if shape else "float16 (width, h, w)"
            if (
                dtype != np.float16
                or fortran
                or len(found) != 3
                or (shape is not None and tuple(found) != tuple(shape))
                or data_bytes != 2 * int(np.prod(found, dtype=np.int64))
            ):
                log.warning(
                    "cache file %s holds %s %s in %d bytes, not %s; recomputing it",
                    path,
                    dtype,
                    found,
                    data_bytes,
                    want,
                )
                return None
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # truncated or not an .npy: recompute it
            log.warning("unreadable cache file %s (%s); recomputing", path, exc)
            return None

    def put(self, view: str, tokens: np.ndarray) -> None:
        with atomic_file(self.path(view)) as f:
            np.save(f, np.ascontiguousarray(tokens, dtype=np.float16), allow_pickle=False)

    @torch.no_grad()
    def tokens(self, model, images: torch.Tensor, views: Sequence[str]) -> torch.Tensor:
        """The backbone's tokens (B, width, h, w) of a batch: read back where cached, else computed and stored."""
        patch = int(model.patch_size)
        shape = (_token_width(model), images.shape[-2] // patch, images.shape[-1] // patch)
        found = [self.get(v, shape) for v in views]
        missing = [i for i, t in enumerate(found) if t is None]
        self.hits += len(views) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = model.encode(images[missing]).float().cpu()
            for i, t in zip(missing, fresh):
                arr = t.numpy().astype(np.float16)
                self.put(views[i], arr)
                found[i] = arr
        return torch.from_numpy(np.stack(found)).to(images.device, torch.float32)
