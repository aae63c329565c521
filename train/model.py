"""The zero-shot segmentation model: CLIP image encoder + light dense head + text classifier.

- Image encoder: an open_clip ViT by name (``ViT-B-16`` by default). Its patch tokens of the
  last block (after ``ln_post``) are the dense features; the position embeddings are
  interpolated to each input's patch grid, so any crop size works. Frozen by default.
- Dense head: 1x1 conv -> GELU -> bilinear x``upsample`` -> 3x3 conv -> GELU -> 1x1 conv into
  the text space, added to CLIP's own projection of the tokens (``tokens @ proj``). The last
  conv starts at zero, so training starts from CLIP's dense zero-shot prediction.
- Classifier: logits = exp(s) * cos(pixel embedding, text embedding of each class), with s a
  learned log-temperature. Text embeddings come from :class:`TextClassifier` (prompt
  templates averaged, cached per class list) and are an *input* of ``forward``: the model
  never holds class names, so what the loss sees is exactly the list the trainer passes.
- Optional boundary head (edge-alignment baseline): 3x3 conv -> GELU -> 1x1 conv -> 1 logit.

``CLIP_WEIGHTS`` (``ModelConfig.clip_weights``) is an open_clip checkpoint file for the chosen
architecture; without it both towers are random and every result is meaningless, which
:func:`create_clip` says loudly and :attr:`SegmentationModel.random_weights` records.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .splits import prompt_name

log = logging.getLogger(__name__)

# Small open_clip configurations for tests and smoke runs (not CLIP models; random only).
TINY_ARCHS = {
    "sazs-tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}

TEMPLATES = {
    "single": ("a photo of a {}.",),
    # Prompts common in CLIP-based segmentation (object in a scene, varied size and quality).
    "seg": (
        "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of a large {}.",
        "a cropped photo of a {}.", "a close-up photo of a {}.", "a bad photo of a {}.",
        "there is a {} in the scene.",
    ),  # fmt: skip
}

RANDOM_WEIGHTS_WARNING = ("NO CLIP WEIGHTS: the image and text encoders are RANDOMLY INITIALISED; "
                          "every number this run reports is MEANINGLESS (pass CLIP_WEIGHTS=path / "
                          "--clip-weights path for a real run)")  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "ViT-B-16"
    clip_weights: str | None = None  # open_clip checkpoint file; None = random (meaningless)
    head_dim: int = 256
    upsample: int = 2  # output stride = patch size / upsample
    finetune_backbone: bool = False
    templates: str = "seg"
    init_temperature: float = 1 / 0.07  # initial exp(s), as CLIP
    boundary_head: bool = False


def list_archs() -> list[str]:
    import open_clip

    return sorted(TINY_ARCHS) + open_clip.list_models()


def output_stride(cfg: ModelConfig) -> int:
    """Stride (px) of the model's output for ``cfg``, known without building the model."""
    import open_clip

    if cfg.arch in TINY_ARCHS:
        patch = TINY_ARCHS[cfg.arch]["vision_cfg"]["patch_size"]
    else:
        model_cfg = open_clip.get_model_config(cfg.arch)
        if model_cfg is None:
            raise ValueError(f"unknown architecture {cfg.arch!r}; choose an open_clip model name "
                             f"(e.g. ViT-B-16, ViT-L-14, ViT-B-16-quickgelu) or one of {sorted(TINY_ARCHS)}")
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


def create_clip(cfg: ModelConfig) -> tuple[nn.Module, dict]:
    """(open_clip CLIP model, provenance) for ``cfg.arch``, with ``cfg.clip_weights`` if given."""
    import open_clip

    if cfg.arch in TINY_ARCHS:
        model = open_clip.CLIP(**TINY_ARCHS[cfg.arch])
    elif cfg.arch in open_clip.list_models():
        model = open_clip.create_model(cfg.arch, pretrained=None)
    else:
        raise ValueError(f"unknown architecture {cfg.arch!r}; choose an open_clip model name "
                         f"(e.g. ViT-B-16, ViT-L-14, ViT-B-16-quickgelu) or one of {sorted(TINY_ARCHS)}")
    info = {"arch": cfg.arch, "clip_weights": cfg.clip_weights, "weights_sha256": None, "random_weights": True}
    if cfg.clip_weights:
        path = Path(cfg.clip_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP weights {path} not found (an open_clip checkpoint file for {cfg.arch})")
        from sazs.pipeline.extractors import file_sha256

        try:
            open_clip.load_checkpoint(model, str(path))
        except (RuntimeError, AssertionError, KeyError) as exc:  # key / shape mismatch (open_clip asserts some)
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"CLIP weights {path} do not fit architecture {cfg.arch} ({first}); "
                             "pass the matching --arch") from None
        info.update(weights_sha256=file_sha256(path), random_weights=False)
        log.info("loaded CLIP weights %s into %s", path, cfg.arch)
    else:
        log.warning("!" * 100)
        log.warning(RANDOM_WEIGHTS_WARNING)
        log.warning("!" * 100)
    return model, info


# ----------------------------------------------------------------------------- text


class TextClassifier:
    """Text embeddings (C, D), L2-normalised, of class names averaged over prompt templates.

    Owns CLIP's text tower (kept on the CPU between uses). Results are cached per class
    list; :attr:`encoded_names` lists every name ever encoded (what reached the text tower).
    """

    def __init__(self, clip: nn.Module, arch: str, templates: str = "seg", device: torch.device | str = "cpu"):
        import open_clip

        if templates not in TEMPLATES:
            raise ValueError(f"unknown templates {templates!r}; choose from {sorted(TEMPLATES)}")
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch if arch not in TINY_ARCHS else "ViT-B-16")
        self.templates = TEMPLATES[templates]
        self.device = torch.device(device)
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.encoded_names: list[str] = []

    @torch.no_grad()
    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        key = tuple(names)
        if key not in self._cache:
            prompts = [t.format(prompt_name(n)) for n in key for t in self.templates]
            self.clip.to(self.device)
            try:
                chunks = [self.clip.encode_text(self.tokenizer(prompts[i:i + 256]).to(self.device), normalize=True)
                          for i in range(0, len(prompts), 256)]  # fmt: skip
            finally:
                self.clip.to("cpu")
            emb = torch.cat(chunks).float().reshape(len(key), len(self.templates), -1).mean(1)
            self._cache[key] = F.normalize(emb, dim=-1).cpu()
            self.encoded_names.extend(key)
        return self._cache[key]


# ----------------------------------------------------------------------------- image side


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class DenseHead(nn.Module):
    def __init__(self, width: int, embed_dim: int, hidden: int, upsample: int):
        super().__init__()
        self.upsample = upsample
        self.inp = nn.Sequential(nn.Conv2d(width, hidden, 1), nn.GroupNorm(_groups(hidden), hidden), nn.GELU())
        self.refine = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(_groups(hidden), hidden),
                                    nn.GELU())  # fmt: skip
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
    """Pixel embeddings in CLIP's text space from an open_clip ViT image tower."""

    def __init__(self, visual: nn.Module, cfg: ModelConfig, info: dict | None = None):
        super().__init__()
        if not hasattr(visual, "conv1") or getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"{cfg.arch}: only plain ViT image towers (open_clip VisionTransformer) are "
                             f"supported, got {type(visual).__name__}")
        self.cfg = cfg
        self.info = dict(info or {})
        self.visual = visual
        self.patch_size = int(visual.patch_size[0])
        if self.patch_size % cfg.upsample:
            raise ValueError(f"upsample {cfg.upsample} must divide the patch size {self.patch_size}")
        width = visual.conv1.out_channels
        embed_dim = visual.output_dim
        self.head = DenseHead(width, embed_dim, cfg.head_dim, cfg.upsample)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))
        self.boundary = None
        if cfg.boundary_head:
            self.boundary = nn.Sequential(nn.Conv2d(cfg.head_dim, cfg.head_dim // 2, 3, padding=1), nn.GELU(),
                                          nn.Conv2d(cfg.head_dim // 2, 1, 1))  # fmt: skip
        self.visual.requires_grad_(cfg.finetune_backbone)
        self.backbone_digest = _digest(visual)

    @property
    def random_weights(self) -> bool:
        return bool(self.info.get("random_weights", True))

    @property
    def output_stride(self) -> int:
        return self.patch_size // self.cfg.upsample

    def train(self, mode: bool = True) -> "SegmentationModel":
        super().train(mode)
        if not self.cfg.finetune_backbone:
            self.visual.eval()  # a frozen backbone stays in inference mode (patch dropout etc.)
        return self

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        pos = self.visual.positional_embedding
        gh, gw = self.visual.grid_size
        if (h, w) == (gh, gw):
            return pos
        grid = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])

    def backbone(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, width, h, w) after ln_post, CLIP projection (B, D, h, w))."""
        v = self.visual
        x = v.conv1(images)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, c)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(h, w).to(x.dtype)
        x = v.transformer(v.ln_pre(x))
        tokens = v.ln_post(x[:, 1:])
        projected = tokens @ v.proj if v.proj is not None else tokens
        to_map = lambda t: t.transpose(1, 2).reshape(b, -1, h, w)  # noqa: E731
        return to_map(tokens), to_map(projected)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) CLIP-normalised, H and W multiples of the patch size; text (C, D)."""
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(f"input {tuple(images.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        if self.cfg.finetune_backbone:
            tokens, projected = self.backbone(images)
        else:
            with torch.no_grad():
                tokens, projected = self.backbone(images)
        emb, hidden = self.head(tokens, projected)
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
            no_decay = p.ndim <= 1 or name.endswith("positional_embedding") or name.endswith("class_embedding")
            groups.setdefault((is_backbone, no_decay), []).append(p)
        out = []
        for (is_backbone, no_decay), params in sorted(groups.items()):
            mult = backbone_lr_mult if is_backbone else 1.0
            out.append({"params": params, "lr": lr * mult, "lr_mult": mult,
                        "weight_decay": 0.0 if no_decay else weight_decay,
                        "name": ("backbone" if is_backbone else "head") + ("_no_decay" if no_decay else "")})
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
            raise ValueError("the frozen backbone differs from the one the checkpoint was trained with "
                             "(other CLIP weights or architecture); pass the same --arch / --clip-weights")
        if has_backbone:
            self.backbone_digest = _digest(self.visual)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[SegmentationModel, TextClassifier]:
    """The segmentation model (on ``device``) and the text classifier of its CLIP text tower."""
    clip, info = create_clip(cfg)
    visual = clip.visual
    clip.visual = nn.Identity()  # the text classifier owns the rest and may move it freely
    model = SegmentationModel(visual, cfg, info).to(device)
    return model, TextClassifier(clip, cfg.arch, cfg.templates, device)
