"""Encoders beyond open_clip: pipeline ViTs as dense backbones, sentence-transformers text encoders."""

import sys

import numpy as np
import pytest
import torch

from sazs.features.extractors import IMAGENET_MEAN, IMAGENET_STD, ExtractorConfig, ViTExtractor
from sazs.model import encoders
from sazs.model.model import ModelConfig, build_model, normalize, output_stride
from sazs.model.text import TextClassifier

pytest.importorskip("sentence_transformers")


def make_sentence_model(root):
    """A tiny sentence-transformers folder (1-layer BERT, 16-d, own vocab) written with no network."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    hf = root / "hf"
    hf.mkdir(parents=True)
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "photo",
        "of",
        "the",
        ".",
        "road",
        "car",
        "sky",
        "pavement",
        "there",
        "is",
        "in",
        "scene",
    ]
    (hf / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(hf / "vocab.txt")).save_pretrained(hf)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(words),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    ).save_pretrained(hf)
    st = SentenceTransformer(modules=[Transformer(str(hf), max_seq_length=32), Pooling(16, "mean")], device="cpu")
    st.save(str(root / "st"))
    return root / "st"


@pytest.fixture(scope="module")
def sentence_folder(tmp_path_factory):
    return make_sentence_model(tmp_path_factory.mktemp("sentence"))


def test_sentence_encoder_from_a_folder(sentence_folder):
    model, info = encoders.load_sentence_encoder(str(sentence_folder))
    assert info["dim"] == 16 and len(info["weights_sha256"]) == 64 and info["random_weights"] is False
    text = TextClassifier(templates="single", sentence=model)
    emb = text(["car", "road"])
    ref = encoders.encode_sentences(model, ["a photo of a car."])[0]
    assert emb.shape == (2, 16) and text.dim == 16
    torch.testing.assert_close(emb[0], ref / ref.norm(), atol=1e-5, rtol=1e-5)
    assert text(["car", "road"]) is emb and text.encoded_names == ["car", "road"]


def test_sentence_encoder_from_an_installed_package(sentence_folder, tmp_path, monkeypatch):
    import shutil

    pkg = tmp_path / "site" / "fake_st_pkg"
    shutil.copytree(sentence_folder, pkg / "model")
    (pkg / "__init__.py").write_text("raise RuntimeError('the package is never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert encoders.sentence_model_folder("fake-st-pkg") == pkg / "model"
    with pytest.raises(FileNotFoundError, match="neither 'clip', a sentence-transformers model folder"):
        encoders.sentence_model_folder("no-such-package-xyz")
    with pytest.raises(FileNotFoundError, match="no modules.json"):
        encoders.sentence_model_folder(str(tmp_path))
    assert "fake_st_pkg" not in sys.modules


def test_pipeline_vit_backbone_is_the_extractors_model(sentence_folder):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="sazs-tiny-vit", head_dim=16, templates="single", text_encoder=str(sentence_folder))
    assert output_stride(cfg) == 4
    model, text = build_model(cfg)
    assert model.random_weights and model.info["text_encoder"]["dim"] == 16 and model.text_proj is not None
    # the same tokens as the pipeline's extractor computes (one home for the ViT forward)
    ext = ViTExtractor("sazs-tiny-vit", ExtractorConfig(name="x", facet="token", device="cpu"), model.visual, "t", None)
    rgb = torch.rand(2, 3, 48, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    ref = ext.forward_features((rgb - mean) / std)  # (B, h*w, d)
    with torch.no_grad():
        tokens = model.encode(normalize(rgb))
    torch.testing.assert_close(tokens.flatten(2).transpose(1, 2), ref, atol=1e-4, rtol=1e-4)
    out = model(normalize(rgb), text(["car", "road", "sky"]))
    assert out["logits"].shape == (2, 3, 12, 16)
    model.train()
    out["logits"].sum().backward()
    assert all(p.grad is None for p in model.visual.parameters())
    assert model.text_proj.weight.grad is not None
    assert not any(k.startswith("visual.") for k in model.checkpoint_state())


def test_finetuned_pipeline_vit_gets_gradients(sentence_folder):
    cfg = ModelConfig(
        arch="sazs-tiny-vit", head_dim=16, templates="single", text_encoder=str(sentence_folder), finetune_backbone=True
    )
    model, text = build_model(cfg)
    model.train()
    model(torch.randn(1, 3, 32, 32), text(["car"]))["logits"].sum().backward()
    assert model.visual.patch_embed.proj.weight.grad is not None
    groups = {g["name"] for g in model.param_groups(1e-3, 0.1, 1e-4)}
    assert {"backbone", "backbone_no_decay", "head"} <= groups
    with pytest.raises(ValueError, match="must run live"):
        model(None, text(["car"]), tokens=torch.zeros(1, 32, 4, 4))


def test_clip_image_tower_with_a_sentence_text_space(sentence_folder):
    model, text = build_model(
        ModelConfig(arch="sazs-tiny", head_dim=16, templates="single", text_encoder=str(sentence_folder))
    )
    assert model.text_proj is not None and text.clip is None
    assert model(torch.randn(1, 3, 32, 32), text(["car", "sky"]))["logits"].shape == (1, 2, 8, 8)


def test_encoder_combinations_that_cannot_work():
    with pytest.raises(ValueError, match="has no CLIP text tower"):
        build_model(ModelConfig(arch="sazs-tiny-vit"))
    with pytest.raises(ValueError, match="--backbone-weights"):
        build_model(ModelConfig(arch="sazs-tiny-vit", clip_weights="x.pt", text_encoder="x"))
    with pytest.raises(ValueError, match="--clip-weights"):
        build_model(ModelConfig(arch="sazs-tiny", backbone_weights="x.pth"))
    with pytest.raises(ValueError, match="needs the official checkpoint"):
        encoders.create_pipeline_vit("dinov2-vits14", None)
    assert encoders.is_pipeline_vit("imgfocus-vits14") and encoders.pipeline_vit_patch("dino-vits8") == 8
    assert not encoders.is_pipeline_vit("ViT-B-16") and not encoders.is_pipeline_vit("color")
    assert np.isclose(output_stride(ModelConfig(arch="imgfocus-vits14")), 7)
