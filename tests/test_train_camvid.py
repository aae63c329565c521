"""CamVid-11 zero-shot folds, the frozen-backbone feature cache, and a CamVid run end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sazs.datasets.zeroshot import CAMVID_CLASSES, num_folds, parse_folds, zero_shot_split
from sazs.eval import cli as eval_cli
from sazs.model.cache import FeatureCache, backbone_key
from sazs.model.checkpoint import load_checkpoint
from sazs.model.model import ModelConfig, build_model
from sazs.train import cli as train_cli

pytest.importorskip("sentence_transformers")
from test_train_encoders import make_sentence_model

# Each unseen class of a fold and the seen neighbour the README promises for it.
NEIGHBOURS = [
    {"bicyclist": "pedestrian", "pavement": "road", "fence": "pole"},
    {"pedestrian": "bicyclist", "road": "pavement", "sign symbol": "pole"},
    {"car": "bicyclist", "building": "fence", "pole": "sign symbol"},
]


def test_camvid_folds_hold_out_classes_with_seen_neighbours():
    assert num_folds("camvid") == 3 and parse_folds("all", 3) == (0, 1, 2)
    held = []
    for fold, neighbours in enumerate(NEIGHBOURS):
        split = zero_shot_split("camvid", fold)
        assert not split.background and split.benchmark == "camvid-11"
        assert set(split.unseen_names()) == set(neighbours) and 3 <= len(split.unseen) <= 4
        assert all(n in split.train_names() for n in neighbours.values())
        assert not set(split.train_names()) & set(split.unseen_names()) and "background" not in split.train_names()
        assert len(split.train_names()) == 11 - len(split.unseen) and split.seen_scored() == split.seen
        lut = split.label_map()  # labels 0..10 are classes: seen -> 0..S-1, unseen -> ignore
        assert [int(lut[c]) for c in split.seen] == list(range(len(split.seen)))
        assert all(lut[c] == 255 for c in split.unseen) and lut[255] == 255
        held += split.unseen
        others = zero_shot_split("camvid", fold, unseen="others")
        assert others.train_names()[0] == "others" and all(others.label_map()[c] == 0 for c in others.unseen)
    assert len(set(held)) == len(held)  # folds are disjoint
    with pytest.raises(ValueError, match="fold must be one of 0..2"):
        zero_shot_split("camvid", 3)


def test_feature_cache_is_keyed_by_backbone_and_view(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="sazs-tiny", head_dim=16, templates="single")
    model, _ = build_model(cfg)
    cache = FeatureCache(tmp_path, backbone_key(model))
    x = torch.randn(2, 3, 32, 32)
    views = ["img-a|view0", "img-b|view0"]
    first = cache.tokens(model, x, views)
    assert (cache.hits, cache.misses) == (0, 2) and first.shape == (2, 64, 4, 4)
    torch.testing.assert_close(first, model.encode(x).detach(), atol=2e-2, rtol=2e-2)  # stored as float16
    again = cache.tokens(model, torch.zeros_like(x), views)  # read back, not recomputed
    assert (cache.hits, cache.misses) == (2, 2) and torch.equal(again, first)
    cache.tokens(model, x, ["img-a|view1", "img-b|view0"])  # another view of a is a miss
    assert (cache.hits, cache.misses) == (3, 3)
    # other weights, or another input handling of the same weights: another folder, nothing stale
    torch.manual_seed(1)
    other, _ = build_model(cfg)
    assert FeatureCache(tmp_path, backbone_key(other)).dir != cache.dir
    assert FeatureCache(tmp_path, {**backbone_key(model), "patch_size": 16}).dir != cache.dir
    # a damaged file is recomputed; files load without pickle
    path = cache.path(views[0])
    path.write_bytes(b"not numpy")
    cache.tokens(model, x, views[:1])
    assert cache.misses == 4 and np.load(path, allow_pickle=False).dtype == np.float16


def write_camvid(root, n_train=6, n_val=4, size=(48, 64), seed=0):
    """A tiny SegNet-layout CamVid: road below, sky above, a car / pedestrian box, unlabelled stripes."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 255, (11, 3))
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            lab = np.full(size, 0, np.uint8)  # sky
            lab[size[0] // 2 :] = 3  # road
            lab[size[0] // 2 :, : size[1] // 4] = 4  # pavement
            y, x = rng.integers(8, size[0] - 16), rng.integers(16, size[1] - 16)
            lab[y : y + 12, x : x + 12] = rng.choice([8, 9, 10])  # car, pedestrian or bicyclist
            lab[:, -2:] = 11  # unlabelled
            img = colours[lab.clip(0, 10)] + rng.integers(0, 20, size + (3,))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / f"f{i:03d}.png")
            Image.fromarray(lab).save(root / f"{split}annot" / f"f{i:03d}.png")
    (root / "classes.json").write_text(json.dumps({"classes": list(CAMVID_CLASSES), "ignore_index": 11}))
    return root


def test_camvid_train_eval_predict_with_a_vit_and_a_sentence_encoder(tmp_path, capsys):
    data = write_camvid(tmp_path / "camvid")
    st = make_sentence_model(tmp_path / "st")
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = [
        "run",
        "--dataset",
        "camvid",
        "--data",
        str(data),
        "--fold",
        "0",
        "--arch",
        "sazs-tiny-vit",
        "--text-encoder",
        str(st),
        "--head-dim",
        "16",
        "--templates",
        "single",
        "--crop-size",
        "32",
        "--batch-size",
        "3",
        "--steps",
        "4",
        "--workers",
        "0",
        "--spectral-weight",
        "0",
        "--no-progress",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-2",
        "--cache-features",
        str(cache),
        "--views",
        "2",
        "--out",
    ]
    assert train_cli.main([*args, str(run)]) == 0
    ckpt = load_checkpoint(run / "checkpoint.pt")
    info = ckpt["clip"]
    assert info["arch"] == "sazs-tiny-vit" and info["random_weights"] is True
    assert info["text_encoder"]["folder"] == str(st) and len(info["text_encoder"]["weights_sha256"]) == 64
    assert ckpt["config"]["model"]["text_encoder"] == str(st) and ckpt["config"]["data"]["views"] == 2
    assert ckpt["train_names"] == list(zero_shot_split("camvid", 0).train_names())
    assert ckpt["text_embeddings"].shape == (8, 16)
    files = list(cache.rglob("*.npy"))
    assert len(files) == 12  # 6 images x 2 views: computed once in 12 samples (4 steps x 3)
    # a second run (another learning rate; the same backbone) reads every view back
    assert train_cli.main([*args, str(tmp_path / "run2"), "--lr", "5e-3"]) == 0
    assert len(list(cache.rglob("*.npy"))) == 12
    # another seed draws another random tiny ViT: another backbone, another cache folder
    assert train_cli.main([*args, str(tmp_path / "run3"), "--seed", "1"]) == 0
    assert len({p.parent for p in cache.rglob("*.npy")}) == 2
    capsys.readouterr()
    rep = tmp_path / "rep"
    assert (
        eval_cli.main(
            [
                "run",
                "--dataset",
                "camvid",
                "--data",
                str(data),
                "--folds",
                "0",
                "--ckpt",
                str(run / "checkpoint.pt"),
                "--fusion",
                "none",
                "--headline",
                "none",
                "--out",
                str(rep),
                "--no-progress",
                "--draw",
                "0",
                "--text-encoder",  # a checkpoint never opens the folder it names: it is passed again
                str(st),
            ]
        )
        == 0
    )
    report = json.loads((rep / "report.json").read_text())
    gen = report["generalised"]["camvid-11"]["fusion"]["none"]["mean"]
    assert set(gen) >= {"seen_miou", "unseen_miou", "harmonic_miou", "boundary_f_unseen"}
    assert report["protocols"] == {}
    out = tmp_path / "pred"
    assert (
        eval_cli.main(
            [
                "predict",
                str(data / "val" / "f000.png"),
                "--classes",
                ",".join(CAMVID_CLASSES),
                "--ckpt",
                str(run / "checkpoint.pt"),
                "--out",
                str(out),
                "--text-encoder",
                str(st),
            ]
        )
        == 0
    )
    index = json.loads((out / "predictions.json").read_text())
    assert index["labels"]["0"] == "sky" and len(index["labels"]) == 11  # no background word for CamVid
    assert (out / "f000.overlay.png").is_file()


def test_eval_reads_a_frozen_backbones_tokens_back_across_checkpoints(tmp_path):
    from sazs.eval.predict import Predictor

    data = write_camvid(tmp_path / "camvid", n_train=3, n_val=2)
    cache = tmp_path / "cache"
    args = [
        "run",
        "--dataset",
        "camvid",
        "--data",
        str(data),
        "--fold",
        "0",
        "--arch",
        "sazs-tiny",
        "--head-dim",
        "16",
        "--templates",
        "single",
        "--crop-size",
        "32",
        "--batch-size",
        "3",
        "--steps",
        "2",
        "--workers",
        "0",
        "--spectral-weight",
        "0",
        "--no-progress",
        "--optimizer",
        "adamw",
        "--out",
    ]
    for name, lr in (("a", "1e-2"), ("b", "3e-2")):  # two heads on one frozen (seed 0) backbone
        assert train_cli.main([*args, str(tmp_path / name), "--lr", lr]) == 0
    assert (
        eval_cli.main(
            [
                "run",
                "--dataset",
                "camvid",
                "--data",
                str(data),
                "--folds",
                "0",
                "--ckpt",
                str(tmp_path / "a" / "checkpoint.pt"),
                "--fusion",
                "none",
                "--headline",
                "none",
                "--out",
                str(tmp_path / "rep"),
                "--no-progress",
                "--draw",
                "0",
                "--cache-features",
                str(cache),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert len(list(cache.rglob("*.npy"))) == 2  # one per val image
    image = np.array(Image.open(data / "val" / "f001.png").convert("RGB"))
    names = list(CAMVID_CLASSES)
    cached = Predictor(tmp_path / "b" / "checkpoint.pt", device="cpu", feature_cache=str(cache))
    got = cached.logits(image, names)
    assert (cached.cache.hits, cached.cache.misses) == (1, 0)  # checkpoint b reads a's tokens back
    live = Predictor(tmp_path / "b" / "checkpoint.pt", device="cpu").logits(image, names)
    torch.testing.assert_close(got, live, atol=5e-2, rtol=5e-2)  # tokens stored as float16
    assert live.argmax(0).eq(got.argmax(0)).float().mean() > 0.95
    changed = image.copy()
    changed[0, 0] ^= 1  # other pixels: another key
    cached.logits(changed, names)
    assert cached.cache.misses == 1


def test_calibration_takes_cosine_similarity_from_the_training_classes_only(tmp_path):
    from sazs.eval.predict import Predictor

    data = write_camvid(tmp_path / "camvid", n_train=3, n_val=1)
    assert (
        train_cli.main(
            [
                "run",
                "--dataset",
                "camvid",
                "--data",
                str(data),
                "--fold",
                "0",
                "--arch",
                "sazs-tiny",
                "--head-dim",
                "16",
                "--templates",
                "single",
                "--crop-size",
                "32",
                "--batch-size",
                "3",
                "--steps",
                "1",
                "--workers",
                "0",
                "--spectral-weight",
                "0",
                "--no-progress",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    ckpt = tmp_path / "run" / "checkpoint.pt"
    image = np.array(Image.open(data / "val" / "f000.png").convert("RGB"))
    names = list(CAMVID_CLASSES)
    plain = Predictor(ckpt, device="cpu").logits(image, names)
    calibrated = Predictor(ckpt, device="cpu", calibration=0.2)
    got = calibrated.logits(image, names)
    scale = calibrated.model.logit_scale.exp().item()
    unseen = set(zero_shot_split("camvid", 0).unseen_names())
    for i, name in enumerate(names):  # logits are linear in the scores, so the shift survives the upsampling
        shift = 0.0 if name in unseen else 0.2 * scale
        torch.testing.assert_close(got[i], plain[i] - shift, atol=1e-4, rtol=1e-4)
    assert calibrated.describe()["calibration"] == 0.2
