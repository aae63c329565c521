"""The model: dense CLIP features, dense head, text classifier, frozen / fine-tuned backbone, weights."""

import logging
import math

import open_clip
import pytest
import torch

from sazs.model.encoders import RANDOM_WEIGHTS_WARNING, TINY_ARCHS, create_clip
from sazs.model.model import ModelConfig, SegmentationModel, build_model
from sazs.model.text import TextClassifier

TINY = ModelConfig(arch="sazs-tiny", head_dim=32, templates="single")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(TINY)


def test_dense_output_any_crop_size(tiny):
    model, text = tiny
    emb = text(["background", "cat", "dog"])
    assert emb.shape == (3, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert model.output_stride == 4
    for h, w in ((64, 64), (96, 64), (40, 72)):  # not the model's native 64x64: position embeddings interpolated
        out = model(torch.randn(2, 3, h, w), emb)
        assert out["logits"].shape == (2, 3, h // 4, w // 4)
        assert torch.allclose(out["embeddings"].norm(dim=1), torch.ones(2, h // 4, w // 4), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.randn(1, 3, 60, 64), emb)


def test_logits_are_temperature_times_cosine(tiny):
    model, text = tiny
    emb = text(["background", "cat"])
    out = model(torch.randn(1, 3, 32, 32), emb)
    cos = torch.einsum("bdhw,cd->bchw", out["embeddings"], emb)
    torch.testing.assert_close(out["logits"], model.logit_scale.exp() * cos)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_head_starts_from_clip_projection(tiny):
    model, _ = tiny
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens, projected = model.backbone(x)
        emb, _ = model.head(tokens, projected)
    up = torch.nn.functional.interpolate(projected, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(emb, up)  # zero-initialised last layer


def test_frozen_backbone_gets_no_gradient_and_no_optimiser_slot(tiny):
    model, text = tiny
    model.train()
    assert not model.visual.training  # a frozen backbone stays in eval mode
    model(torch.randn(2, 3, 32, 32), text(["a", "b"]))["logits"].sum().backward()
    assert all(p.grad is None for p in model.visual.parameters())
    assert model.head.inp[0].weight.grad is not None or model.head.out.weight.grad is not None
    groups = model.param_groups(1e-3, 0.1, 1e-4)
    names = {g["name"] for g in groups}
    assert names == {"head", "head_no_decay"}
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("visual.")
    )
    state = model.checkpoint_state()
    assert state and not any(k.startswith("visual.") for k in state)


def test_finetuned_backbone_has_its_own_lr():
    torch.manual_seed(0)
    model, text = build_model(ModelConfig(arch="sazs-tiny", head_dim=32, templates="single", finetune_backbone=True))
    model.train()
    assert model.visual.training
    groups = {g["name"]: g for g in model.param_groups(1e-3, 0.1, 1e-4)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["backbone_no_decay"]["weight_decay"] == 0
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["head"]["weight_decay"] == 1e-4
    model(torch.randn(1, 3, 32, 32), text(["a", "b"]))["logits"].sum().backward()
    assert model.visual.conv1.weight.grad is not None
    assert any(k.startswith("visual.") for k in model.checkpoint_state())


def test_text_classifier_caches_per_class_list(tiny, monkeypatch):
    _, text = tiny
    calls = []
    orig = text.clip.encode_text
    monkeypatch.setattr(text.clip, "encode_text", lambda *a, **k: calls.append(1) or orig(*a, **k))
    a = text(["background", "pottedplant", "tvmonitor"])
    b = text(["background", "pottedplant", "tvmonitor"])
    assert a is b and len(calls) == 1
    text(["background", "horse", "sheep"])
    assert len(calls) == 2
    # VOC's run-together names are spelled out in the prompt
    tok = text.tokenizer
    ref = text.clip.encode_text(tok(["a photo of a potted plant."]), normalize=True)[0]
    torch.testing.assert_close(a[1], ref / ref.norm(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown templates"):
        TextClassifier(text.clip, "sazs-tiny", "fancy")


def test_random_weights_are_announced(caplog):
    with caplog.at_level(logging.WARNING, logger="sazs.model.encoders"):
        _, info = create_clip(TINY)
    assert info["random_weights"] is True and info["weights_sha256"] is None
    assert RANDOM_WEIGHTS_WARNING in caplog.text and "MEANINGLESS" in RANDOM_WEIGHTS_WARNING


def test_clip_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    ref = open_clip.CLIP(**TINY_ARCHS["sazs-tiny"])
    path = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), path)
    torch.manual_seed(2)
    model, text = build_model(ModelConfig(arch="sazs-tiny", clip_weights=str(path), templates="single"))
    assert not model.random_weights and len(model.info["weights_sha256"]) == 64
    torch.testing.assert_close(model.visual.conv1.weight, ref.visual.conv1.weight)
    torch.testing.assert_close(
        text(["cat"])[0],
        torch.nn.functional.normalize(ref.encode_text(text.tokenizer(["a photo of a cat."])), dim=-1)[0],
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(FileNotFoundError, match="not found"):
        create_clip(ModelConfig(arch="sazs-tiny", clip_weights=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="do not fit architecture ViT-S-32"):
        create_clip(ModelConfig(arch="ViT-S-32", clip_weights=str(path)))


def test_unknown_arch_and_backbone_digest(tiny):
    with pytest.raises(ValueError, match="unknown architecture 'ViT-Q-99'"):
        create_clip(ModelConfig(arch="ViT-Q-99"))
    model, _ = tiny
    state = model.checkpoint_state()
    torch.manual_seed(123)  # another random backbone
    other, _ = build_model(TINY)
    with pytest.raises(ValueError, match="frozen backbone differs"):
        other.load_checkpoint_state(state, model.backbone_digest)
    other.load_checkpoint_state(state, other.backbone_digest)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_checkpoint_state({**state, "extra.weight": torch.zeros(1)})


def test_boundary_head():
    torch.manual_seed(0)
    model, text = build_model(ModelConfig(arch="sazs-tiny", head_dim=32, templates="single", boundary_head=True))
    out = model(torch.randn(1, 3, 32, 32), text(["a", "b"]))
    assert out["edges"].shape == (1, 1, 8, 8)
    assert isinstance(model, SegmentationModel)
