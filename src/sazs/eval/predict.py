"""Inference with a training checkpoint: class probabilities for any image and class names.

An edge of eval: it rebuilds the model from a checkpoint through
:func:`sazs.model.checkpoint.load_for_inference` (which runs nothing a checkpoint holds) and
computes priors for a new image through the pipeline's stage functions; eval's pure modules
(splits, episodes, fusion, evaluate, report) import neither the trainer nor the pipeline.

:class:`Predictor` resizes an image (any size) so its short side is ``short_side`` (default:
the checkpoint's training crop), both sides multiples of the patch size and the long side at
most ``max_long_side``, runs the model with the text embeddings of the given names, and
returns logits upsampled (bilinear) to the original size. The classifier is a cosine
classifier, so the logit of a class depends on that class alone.

:func:`predict_image` writes, per image, ``<stem>.overlay.png`` (the image with the label
map blended in and a legend) and ``<stem>.labels.png`` (the raw label map: palette PNG of
indices, 0 = background, i = the i-th class given).

Priors for ``--fusion project``: from a prior store holding the image (``--store``, looked
up by file stem, then by path), or computed for the image on the fly (``--extractor``) with
the same stage functions as ``sazs-priors`` (default graph and solver settings).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sazs.core.devices import resolve_precision
from sazs.datasets.images import read_image
from sazs.features.extractors import ExtractorConfig, build_extractor
from sazs.model.cache import FeatureCache, backbone_key, content_view
from sazs.model.checkpoint import load_for_inference
from sazs.model.model import normalize
from sazs.pipeline.compute import compute_priors
from sazs.pipeline.graph import GraphConfig
from sazs.pipeline.spectral import SpectralConfig
from sazs.segments.refine import upsample_eigvecs

from .fusion import FusionConfig, fuse_semantic
from .pictures import palette

log = logging.getLogger(__name__)


class Predictor:
    """A checkpoint ready for inference (model, text classifier, preprocessing)."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        device: str = "auto",
        short_side: int | None = None,
        max_long_side: int | None = None,
        precision: str = "auto",
        feature_cache: str | None = None,
        calibration: float = 0.0,
        files: dict[str, str | None] | None = None,
    ):
        path = Path(checkpoint)
        # files: the encoders' weight files from the command line (load_for_inference)
        self.model, self.text, self.ckpt = load_for_inference(path, device, files)
        self.path = str(path)
        self.device = next(self.model.parameters()).device
        cfg = self.ckpt["config"]
        self.short_side = int(short_side or cfg["data"]["augment"]["crop_size"])
        self.max_long_side = int(max_long_side or 2 * self.short_side)
        self.patch = int(self.model.patch_size)
        precision = resolve_precision(precision, self.device)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.precision = precision
        self.split = self.ckpt.get("split", {})
        # The training classifier's class 0 word (background / others); None for a benchmark
        # without background (CamVid), whose classifiers hold the classes only.
        has_slot = self.split.get("background", True) or self.split.get("unseen_mode") == "others"
        self.background = str(self.ckpt.get("train_names", ["background"])[0]) if has_slot else None
        self.dataset = cfg["data"]["dataset"]
        self.random_weights = bool(self.ckpt.get("random_weights", self.model.random_weights))
        # A frozen backbone's tokens of an image (fp32 runs): cached by pixels and input size
        # ("auto": ~/.cache/sazs/features), shared by every checkpoint on that backbone.
        # Calibrated stacking (SPNet-C): the classes the checkpoint was trained on lose
        # ``calibration`` of cosine similarity (x the learned logit scale), so that unseen
        # classes, never pushed up by the training loss, can win a pixel at all.
        self.calibration = float(calibration)
        self.trained_names = set(self.ckpt.get("train_names", []))
        self.cache = None
        if feature_cache and not cfg["model"].get("finetune_backbone") and precision == "fp32":
            self.cache = FeatureCache(None if feature_cache == "auto" else feature_cache, backbone_key(self.model))

    def describe(self) -> dict:
        return {
            "checkpoint": self.path,
            "step": self.ckpt.get("step"),
            "code_version": self.ckpt.get("code_version"),
            "clip": self.ckpt.get("clip"),
            "random_weights": self.random_weights,
            "split": self.split,
            "short_side": self.short_side,
            "max_long_side": self.max_long_side,
            "device": str(self.device),
            "precision": self.precision,
            "calibration": self.calibration,
        }

    def label_names(self, classes: Sequence[str]) -> list[str]:
        """Names of the label indices of a prediction for ``classes``: the background word first, if any."""
        return [*([self.background] if self.background else []), *classes]

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """Model input size: short side ~ short_side, long side <= max_long_side, multiples of the patch."""
        scale = min(self.short_side / min(h, w), self.max_long_side / max(h, w))
        return tuple(max(self.patch, round(n * scale / self.patch) * self.patch) for n in (h, w))

    def embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """(C, D) text embeddings; each name is encoded once and cached."""
        return torch.cat([self.text((n,)) for n in names]).to(self.device)

    @torch.no_grad()
    def logits(self, image: np.ndarray, names: Sequence[str]) -> torch.Tensor:
        """(C, H, W) float32 logits at the image's size (on the model's device)."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        if not names:
            raise ValueError("no class names given")
        h, w = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255)
        x = F.interpolate(x, size=self.input_size(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = normalize(x.clamp_(0, 1)).to(self.device)
        emb = self.embeddings(names)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = self.model(x, emb)["logits"]
        elif self.cache is not None:
            tokens = self.cache.tokens(self.model, x, [content_view(image, x.shape[-2:])])
            out = self.model(x, emb, tokens=tokens)["logits"]
        else:
            out = self.model(x, emb)["logits"]
        if self.calibration:
            seen = [i for i, n in enumerate(names) if n in self.trained_names]
            scale = self.model.logit_scale.float().clamp(max=math.log(100.0)).exp()
            out = out.float()
            out[:, seen] -= self.calibration * scale
        return F.interpolate(out.float(), size=(h, w), mode="bilinear", align_corners=False)[0]


# ----------------------------------------------------------------------------- priors of one image


def store_priors_for(store, image_path: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """Eigenvectors (K, h, w) of ``image_path`` from a store: id = file stem, or the path
    relative to the store's dataset root without extension; the image size must match."""
    candidates = [image_path.stem]
    root = store.manifest.get("dataset", {}).get("root")
    if root:
        try:
            candidates.append(image_path.resolve().relative_to(Path(root).resolve()).with_suffix("").as_posix())
        except ValueError:
            pass
    known = set(store.ids)
    id_ = next((c for c in candidates if c in known), None)
    if id_ is None:
        raise KeyError(
            f"image {image_path} is not in store {store.url} (looked for ids {candidates}); "
            "compute its priors with --extractor NAME instead"
        )
    prior = store.get(id_)
    if tuple(prior.image_size) != tuple(image_hw):
        raise ValueError(
            f"store {store.url} has priors of {id_!r} for a {prior.image_size[0]}x{prior.image_size[1]} "
            f"image, but {image_path} is {image_hw[0]}x{image_hw[1]}"
        )
    return prior.eigvecs


class OnTheFlyPriors:
    """Priors of single images with the pipeline's stage functions (extractor -> kNN graph -> eigs)."""

    def __init__(
        self,
        extractor: str,
        *,
        weights: str | None = None,
        short_side: int | None = None,
        device: str = "auto",
        num_eigs: int = SpectralConfig.num_eigs,
    ):
        self.extractor = build_extractor(
            ExtractorConfig(name=extractor, weights=weights, short_side=short_side, device=device)
        )
        self.graph_cfg = GraphConfig()
        self.spectral_cfg = SpectralConfig(num_eigs=num_eigs)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = compute_priors([image], self.extractor, self.graph_cfg, self.spectral_cfg)[0]
        if isinstance(out, Exception):
            raise ValueError(f"computing priors failed: {type(out).__name__}: {out}")
        (h, w), spec = out
        return np.ascontiguousarray(spec.eigvecs.T).reshape(-1, h, w).astype(np.float32)


# ----------------------------------------------------------------------------- outputs


def parse_classes(text: str) -> list[str]:
    """'cat, dog,sofa' -> ['cat', 'dog', 'sofa'] (order kept; duplicates and blanks refused)."""
    names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise ValueError(f"--classes must be a comma-separated list of names, e.g. 'cat,dog,sofa'; got {text!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"class names given twice: {dup}")
    if len(names) > 254:
        raise ValueError(f"{len(names)} classes do not fit an 8-bit label map (at most 254)")
    return names


def write_label_png(labels: np.ndarray, path: Path) -> Path:
    """Palette PNG whose pixel values are the class indices (reads back with np.array(Image.open))."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(palette(256).ravel().tolist())
    img.save(path)
    return path


def draw_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    path: Path,
    *,
    title: str,
    alpha: float = 0.5,
    background: bool = True,
) -> Path:
    """The image with the classes blended in (label 0 left out when it is background), and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = palette(len(names))
    blend = image.astype(np.float32).copy()
    fg = labels > 0 if background else np.ones(labels.shape, bool)
    blend[fg] = (1 - alpha) * blend[fg] + alpha * colours[labels[fg]].astype(np.float32)
    h, w = labels.shape
    inches = 7.0 / max(h, w) * np.array([w, h])
    fig, ax = plt.subplots(figsize=(max(inches[0], 3.0) + 2.4, max(inches[1], 2.5)))
    ax.imshow(blend.clip(0, 255).astype(np.uint8), interpolation="nearest")
    ax.set_axis_off()
    share = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
    handles = [
        Patch(facecolor=colours[i] / 255, edgecolor="k", label=f"{i} {n} ({100 * share[i]:.1f} %)")
        for i, n in enumerate(names)
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def predict_image(
    predictor: Predictor,
    image_path: str | Path,
    classes: Sequence[str],
    out_dir: str | Path,
    *,
    fusion: str = "none",
    priors=None,
    fusion_cfg=None,
    refine: str | None = None,
) -> dict:
    """Label map of one image for ``classes``; writes the overlay and the raw label PNG.

    ``priors``: None, a callable image -> eigvecs (K, h, w), or an open prior store.
    ``refine``: None, or "guided" to refine the upsampled eigenvectors with the image.
    """
    image_path = Path(image_path)
    image = read_image(image_path, min_side=1)
    names = predictor.label_names(classes)
    probs = torch.softmax(predictor.logits(image, names), 0)
    eig = None
    if fusion != "none":
        if priors is None:
            raise ValueError(f"fusion {fusion!r} needs priors: pass --store STORE or --extractor NAME")
        grid = priors(image) if callable(priors) else store_priors_for(priors, image_path, image.shape[:2])
        eig = upsample_eigvecs(grid, image.shape[:2], image=image, refine=refine)
    cfg = fusion_cfg or FusionConfig()
    background = 0 if predictor.background else None
    labels = fuse_semantic(fusion, probs, eig, cfg=cfg, image=image, background=background)
    labels = labels.cpu().numpy().astype(np.uint8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = image_path.stem
    label_png = write_label_png(labels, out / f"{stem}.labels.png")
    note = " · RANDOM WEIGHTS: meaningless" if predictor.random_weights else ""
    overlay = draw_overlay(
        image,
        labels,
        names,
        out / f"{stem}.overlay.png",
        background=bool(predictor.background),
        title=f"{image_path.name} · fusion {fusion}{note}",
    )
    share = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
    return {
        "image": str(image_path),
        "size": list(image.shape[:2]),
        "overlay": str(overlay),
        "labels": str(label_png),
        "classes": names,
        "fusion": fusion,
        "share": {n: round(float(s), 6) for n, s in zip(names, share)},
    }
