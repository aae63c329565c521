"""The trainer end to end through `sazs-train`: checkpoints, exact resume, NaN stop, zero-shot hygiene, overfit."""

import json

import pytest
import torch
import torch.nn.functional as F

from sazs.core.metrics import SegMeter
from sazs.datasets.synthetic import make_voc
from sazs.datasets.zeroshot import zero_shot_split
from sazs.model.checkpoint import load_for_inference
from sazs.model.encoders import RANDOM_WEIGHTS_WARNING
from sazs.model.model import ModelConfig, build_model
from sazs.model.text import TextClassifier
from sazs.pipeline import cli as priors_cli
from sazs.stores.manifest import code_version
from sazs.train import cli, loop
from sazs.train.data import AugmentConfig, DataConfig, PriorSegDataset
from sazs.train.losses import LossConfig, compute_losses


@pytest.fixture(scope="module")
def synth_voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    voc = make_voc(root, num_train=8, num_val=3, size=(64, 80))
    store = root / "train.zarr"
    rc = priors_cli.main(
        [
            "run",
            "--dataset",
            "voc",
            "--data",
            str(voc),
            "--split",
            "train",
            "--extractor",
            "color",
            "--short-side",
            "48",
            "--out",
            str(store),
            "--no-progress",
            "--preview",
            "0",
        ]
    )
    assert rc == 0
    return voc, store


def tiny_args(voc, store, out, *extra):
    return [
        "run",
        "--dataset",
        "voc",
        "--data",
        str(voc),
        "--priors",
        str(store),
        "--fold",
        "0",
        "--arch",
        "sazs-tiny",
        "--head-dim",
        "32",
        "--templates",
        "single",
        "--crop-size",
        "64",
        "--batch-size",
        "2",
        "--steps",
        "4",
        "--log-every",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--out",
        str(out),
        *map(str, extra),
    ]


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_run(synth_voc, tmp_path, capsys):
    voc, store = synth_voc
    out = tmp_path / "run"
    rc = cli.main(
        tiny_args(
            voc, store, out, "--val-split", "val", "--checkpoint-every", "2", "--tensorboard", "--segment-weight", "0.1"
        )
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"checkpoint  {out / 'checkpoint.pt'}" in printed and f"metrics     {out / 'metrics.jsonl'}" in printed
    assert "seen mIoU" in printed and "MEANINGLESS" in printed
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["code_version"] == code_version()
    assert ckpt["random_weights"] is True and ckpt["warning"] == RANDOM_WEIGHTS_WARNING
    assert ckpt["config"]["model"]["arch"] == "sazs-tiny" and ckpt["config"]["loss"]["spectral_weight"] == 1.0
    assert ckpt["config"]["data"]["prior_stride"] == 4  # set from the model's output stride
    assert {"model", "optimizer", "scheduler", "rng", "backbone_digest", "store_fingerprint"} <= set(ckpt)
    assert not any(k.startswith("visual.") for k in ckpt["model"])  # frozen backbone not stored by default
    split = zero_shot_split("voc", 0)
    assert ckpt["train_names"] == list(split.train_names()) and ckpt["text_embeddings"].shape == (16, 64)
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["event"] == "start" and records[0]["warning"] == RANDOM_WEIGHTS_WARNING
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("ce", "spectral", "segment", "lr", "iter_time", "data_time", "images_per_s", "peak_mem_mb", "eta_s"):
        assert key in steps[0], key
    val = [r for r in records if "val" in r][-1]["val"]
    assert val["images"] == 3 and 0 <= val["seen_miou"] <= 1 and set(val["iou"]) >= {"background", "aeroplane"}
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert json.loads((out / "config.json").read_text())["split"]["unseen_names"][0] == "aeroplane"
    # the same command again refuses to clobber the run
    assert cli.main(tiny_args(voc, store, out)) == 2
    assert "already holds a training run" in capsys.readouterr().err
    # a checkpoint rebuilds the model for inference (the evaluator's entry point)
    model, text, _ = load_for_inference(out / "checkpoint.pt", "cpu")
    assert model(torch.zeros(1, 3, 64, 64), ckpt["text_embeddings"])["logits"].shape == (1, 16, 16, 16)


def test_resume_continues_exactly(synth_voc, tmp_path, capsys):
    voc, store = synth_voc
    common = ("--steps", 6, "--accum-steps", 2, "--optimizer", "adamw", "--lr", "3e-3", "--checkpoint-every", 100)
    assert cli.main(tiny_args(voc, store, tmp_path / "a", *common)) == 0
    assert cli.main(tiny_args(voc, store, tmp_path / "b", *common, "--stop-at", 3)) == 0
    assert "stopped early" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 3
    # a resumed run may change where / how fast it runs (workers), not what it computes
    assert cli.main(tiny_args(voc, store, tmp_path / "b", *common, "--lr", "1e-3", "--resume")) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "train.lr: 0.003 -> 0.001" in err
    assert cli.main(tiny_args(voc, store, tmp_path / "b", *common, "--resume", "--workers", 1)) == 0
    a = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    key = lambda r: (r["loss"], r["ce"], r["spectral"], r["lr"])  # noqa: E731
    assert [key(r) for r in a] == [key(r) for r in b]  # bit-identical, not approximately equal
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


def test_non_finite_loss_stops_with_a_clear_message(synth_voc, tmp_path, monkeypatch, capsys):
    voc, store = synth_voc
    calls = {"n": 0}
    real = loop.compute_losses

    def poisoned(outputs, batch, cfg):
        calls["n"] += 1
        terms = real(outputs, batch, cfg)
        if calls["n"] == 3:
            terms["spectral"] = terms["spectral"] * float("nan")
            terms["loss"] = terms["ce"] + terms["spectral"]
        return terms

    monkeypatch.setattr(loop, "compute_losses", poisoned)
    out = tmp_path / "nan"
    assert cli.main(tiny_args(voc, store, out, "--checkpoint-every", 1)) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 3" in err and "spectral=nan" in err and "lower --lr" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # the last good checkpoint
    assert read_metrics(out / "metrics.jsonl")[-1]["event"] == "non_finite_loss"


@pytest.mark.parametrize("unseen", ["ignore", "others"])
def test_unseen_class_names_never_reach_the_training_loss(synth_voc, tmp_path, monkeypatch, unseen):
    voc, store = synth_voc
    seen_lists, logit_channels = [], []
    real_call, real_losses = TextClassifier.__call__, loop.compute_losses

    def spy_call(self, names):
        seen_lists.append(tuple(names))
        return real_call(self, names)

    def spy_losses(outputs, batch, cfg):
        logit_channels.append(outputs["logits"].shape[1])
        assert int(batch["mask"][batch["mask"] != 255].max()) < outputs["logits"].shape[1]
        return real_losses(outputs, batch, cfg)

    monkeypatch.setattr(TextClassifier, "__call__", spy_call)
    monkeypatch.setattr(loop, "compute_losses", spy_losses)
    assert cli.main(tiny_args(voc, store, tmp_path / unseen, "--steps", 2, "--unseen", unseen)) == 0
    split = zero_shot_split("voc", 0, unseen=unseen)
    assert seen_lists == [split.train_names()]  # the only class list the text encoder saw
    assert not set(seen_lists[0]) & {"aeroplane", "bicycle", "bird", "boat", "bottle"}
    assert logit_channels == [16, 16]


def test_priors_are_required_only_by_the_spectral_loss(synth_voc, tmp_path, capsys):
    voc, _ = synth_voc
    args = [
        "run",
        "--dataset",
        "voc",
        "--data",
        str(voc),
        "--arch",
        "sazs-tiny",
        "--crop-size",
        "64",
        "--templates",
        "single",
        "--head-dim",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--workers",
        "0",
        "--no-progress",
        "--extractor",
        "nosuch",
    ]
    assert cli.main([*args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no prior store at priors/voc-train-nosuch.zarr" in err and "make priors DATASET=voc" in err
    # the edge-alignment baseline trains without priors
    out = tmp_path / "edge"
    edge = ["--spectral-weight", "0", "--edge-weight", "0.3", "--log-every", "1"]
    assert cli.main([*args, "--out", str(out), *edge]) == 0
    rec = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][-1]
    assert "edge" in rec and "spectral" not in rec


def test_overfit_a_fixed_batch(synth_voc, request):
    """Seen-class mIoU on one fixed synthetic batch rises far above chance (random frozen tiny backbone)."""
    voc, store = synth_voc
    # Tiny tensors: one thread is as fast, and robust to a CPU shared with other jobs (spinning
    # OpenMP threads that lose their core make a 2-thread step of small ops many times slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.manual_seed(0)
    cfg = DataConfig(
        dataset="voc",
        root=str(voc),
        fold=0,
        priors=str(store),
        prior_stride=4,
        augment=AugmentConfig(crop_size=64, rotate=0, scale_min=1, scale_max=1, hflip=False),
    )
    ds = PriorSegDataset(cfg)
    batch = torch.utils.data.default_collate([ds[(0, i)] for i in range(4)])
    model, text = build_model(ModelConfig(arch="sazs-tiny", head_dim=64, templates="single"))
    names = ds.split.train_names()
    emb = text(names)
    opt = torch.optim.AdamW(model.param_groups(3e-3, 0.1, 0.0), lr=3e-3)
    present = [c for c in batch["mask"].unique().tolist() if c != 255]
    assert len(present) >= 3

    def miou():
        with torch.no_grad():
            logits = model.eval()(batch["image"], emb)["logits"]
        model.train()
        m = SegMeter(len(names))
        m.update(F.interpolate(logits, size=(64, 64), mode="bilinear").argmax(1), batch["mask"])
        return m.miou(present)

    start = miou()
    for _ in range(300):
        terms = compute_losses(model(batch["image"], emb), batch, LossConfig(spectral_weight=1.0))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    end = miou()
    chance = 1 / len(names)
    print(f"overfit: seen-class mIoU {start:.3f} -> {end:.3f} (chance ~{chance:.3f})")
    assert start < 0.2 and end > 0.7 and end > 5 * chance, (start, end)


def test_demo_runs_end_to_end_and_reruns(tmp_path, capsys):
    argv = [
        "demo",
        "--data",
        str(tmp_path / "data"),
        "--priors",
        str(tmp_path / "p.zarr"),
        "--out",
        str(tmp_path / "run"),
        "--arch",
        "sazs-tiny",
        "--steps",
        "3",
        "--crop-size",
        "64",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "store      " in printed and "checkpoint  " in printed and "validation  seen mIoU" in printed
    assert (tmp_path / "data" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").is_file()
    assert cli.main(argv) == 0  # a second `make train` resumes the finished run: nothing to redo
    printed = capsys.readouterr().out
    assert "0 computed now" in printed and "steps       3/3" in printed
    # other demo settings (e.g. `make train STEPS=4`) start the demo run over instead of refusing
    assert cli.main([*argv, "--steps", "4"]) == 0
    assert "steps       4/4" in capsys.readouterr().out
