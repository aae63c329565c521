"""`sazs-eval` end to end on the synthetic VOC layout with a tiny checkpoint: run, HSNet lists, predict, demo."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_eval_report import assert_oracle_never_headline

from sazs.datasets.synthetic import make_voc
from sazs.eval import cli
from sazs.pipeline import cli as priors_cli
from sazs.train import cli as train_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic VOC (8 val images: every class appears), its val priors, and a 2-step tiny fold-0 checkpoint."""
    root = tmp_path_factory.mktemp("evalvoc")
    voc = make_voc(root, num_train=4, num_val=8, size=(56, 72), seed=2)
    store = root / "val.zarr"
    assert (
        priors_cli.main(
            [
                "run",
                "--dataset",
                "voc",
                "--data",
                str(voc),
                "--split",
                "val",
                "--extractor",
                "color",
                "--short-side",
                "96",
                "--out",
                str(store),
                "--no-progress",
                "--preview",
                "0",
            ]
        )
        == 0
    )
    run = root / "run"
    assert (
        train_cli.main(
            [
                "run",
                "--dataset",
                "voc",
                "--data",
                str(voc),
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
                "2",
                "--workers",
                "0",
                "--spectral-weight",
                "0",
                "--no-progress",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    return voc, store, run / "checkpoint.pt"


def run_args(voc, store, ckpt, out, *extra):
    return [
        "run",
        "--dataset",
        "voc",
        "--data",
        str(voc),
        "--folds",
        "0",
        "--ckpt",
        str(ckpt),
        "--priors",
        str(store),
        "--episodes",
        "20",
        "--out",
        str(out),
        "--no-progress",
        "--draw",
        "3",
        *map(str, extra),
    ]


def test_run_writes_tables_json_markdown_picture_and_lists(trained, tmp_path, capsys):
    voc, store, ckpt = trained
    out = tmp_path / "report"
    assert cli.main(run_args(voc, store, ckpt, out)) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert_oracle_never_headline(printed, report)
    assert_oracle_never_headline((out / "report.md").read_text(), report)
    assert "PASCAL-5i · zero-shot episodes · 20 episodes per fold" in printed and "generalised setting" in printed
    assert "MEANINGLESS" in printed  # random CLIP towers are called out
    proto = report["protocols"]["pascal-5i"]
    assert set(proto["fusion"]) == {"none", "project", "select", "segments", "oracle_upper_bound"}
    assert proto["episodes"]["fold0"]["episodes"] == 20 and proto["episodes"]["fold0"]["rule"] == "cycle"
    for entry in proto["fusion"].values():
        for k in ("miou", "fb_iou", "boundary_f"):
            assert 0 <= entry["folds"]["fold0"][k] <= 1
    # the oracle chooses between the prediction and the eigen-segments with the truth: never below 'none'
    assert proto["fusion"]["oracle_upper_bound"]["mean"]["miou"] >= proto["fusion"]["none"]["mean"]["miou"] - 1e-9
    gen = report["generalised"]["pascal-5i"]["fusion"]
    assert set(gen) == {"none", "project", "segments"} and gen["none"]["folds"]["fold0"]["seen_miou"] is not None
    assert (out / "episodes-pascal-5i-fold0.png").stat().st_size > 1000
    lst = out / "splits" / "pascal" / "val" / "fold0.txt"
    assert lst.read_text().splitlines()[0].count("__") == 1
    # the generated lists read back through --splits give the very same numbers
    out2 = tmp_path / "again"
    assert cli.main(run_args(voc, store, ckpt, out2, "--splits", out / "splits", "--no-generalised", "--draw", 0)) == 0
    again = json.loads((out2 / "report.json").read_text())
    assert again["protocols"]["pascal-5i"]["fusion"] == proto["fusion"]
    assert again["protocols"]["pascal-5i"]["episodes"]["fold0"]["source"].endswith("fold0.txt")


def test_run_refuses_what_would_not_be_zero_shot_or_lacks_priors(trained, tmp_path, capsys, monkeypatch):
    voc, store, ckpt = trained
    assert cli.main(run_args(voc, store, ckpt, tmp_path / "x", "--folds", "1")) == 2
    assert "trained for pascal-5i fold 0, not pascal-5i fold 1" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    args = ["run", "--dataset", "voc", "--data", str(voc), "--ckpt", str(ckpt), "--episodes", "5", "--no-progress"]
    assert cli.main(args) == 2
    assert "no prior store at priors/voc-val-imgfocus-vits14.zarr" in capsys.readouterr().err
    assert cli.main([*args, "--fusion", "none", "--headline", "none", "--draw", "0", "--no-generalised"]) == 0
    assert "fusion 'none'" in capsys.readouterr().out
    assert cli.main([*args, "--folds", "0,1"]) == 2
    assert "put '{fold}' in --ckpt" in capsys.readouterr().err
    assert cli.main([*args, "--ckpt", str(tmp_path / "fold{fold}.pt"), "--folds", "all"]) == 2
    assert "make train DATASET=voc DATA=... FOLD=3" in capsys.readouterr().err


def test_run_names_a_split_list_it_cannot_read(trained, tmp_path, capsys):
    voc, store, ckpt = trained
    lists = tmp_path / "splits" / "pascal" / "val"
    lists.mkdir(parents=True)
    (lists / "fold0.txt").write_bytes(b"2007_000033__01\n2007_\xff00042__02\n")
    args = run_args(
        voc,
        store,
        ckpt,
        tmp_path / "x",
        "--splits",
        tmp_path / "splits",
        "--fusion",
        "none",
        "--headline",
        "none",
        "--no-generalised",
        "--draw",
        0,
    )
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"sazs-eval: error: {lists / 'fold0.txt'}:2: not UTF-8 text (byte 0xff)" in err and "re-save it" in err


def test_predict_any_image_size_and_class_names(trained, tmp_path, capsys):
    voc, store, ckpt = trained
    val_id = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    odd = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 91, 3), dtype=np.uint8)).save(odd)
    out = tmp_path / "pred"
    images = [voc / "JPEGImages" / f"{val_id}.jpg", odd]
    assert (
        cli.main(["predict", *map(str, images), "--classes", "cat, dog,sofa", "--ckpt", str(ckpt), "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    for path in images:
        labels = np.array(Image.open(out / f"{path.stem}.labels.png"))
        assert labels.shape == np.array(Image.open(path)).shape[:2] and labels.max() <= 3
        assert (out / f"{path.stem}.overlay.png").stat().st_size > 1000
    index = json.loads((out / "predictions.json").read_text())
    assert index["labels"] == {"0": "background", "1": "cat", "2": "dog", "3": "sofa"}
    assert "MEANINGLESS" in printed
    # fusion with a store (looked up by file stem) or with priors computed on the fly
    assert (
        cli.main(
            [
                "predict",
                str(images[0]),
                "--classes",
                "cat",
                "--ckpt",
                str(ckpt),
                "--out",
                str(out),
                "--fusion",
                "project",
                "--store",
                str(store),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "predict",
                str(odd),
                "--classes",
                "cat",
                "--ckpt",
                str(ckpt),
                "--out",
                str(out),
                "--fusion",
                "project",
                "--extractor",
                "color",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["predict", str(odd), "--classes", "cat", "--ckpt", str(ckpt), "--fusion", "project"]) == 2
    assert "needs priors" in capsys.readouterr().err
    assert cli.main(["predict", str(odd), "--classes", "cat,,dog", "--ckpt", str(ckpt)]) == 2
    assert "comma-separated" in capsys.readouterr().err


def test_demo_from_nothing(tmp_path, monkeypatch, capsys):
    """`make eval` in a fresh clone: no data, no priors, no run -> trains the demo, then evaluates it."""
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--steps", "2", "--arch", "sazs-tiny", "--episodes", "12", "--no-progress", "--draw", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "runs/demo-synth-voc-fold0/checkpoint.pt").is_file()
    report = json.loads((tmp_path / "runs/demo-synth-voc-fold0/eval/report.json").read_text())
    assert report["headline"]["fusion"] == "select" and report["protocols"]["pascal-5i"]["folds"] == [0]
    assert (tmp_path / "priors/synth-voc-demo-val-color.zarr").is_dir()
    assert_oracle_never_headline(printed, report)


def test_module_entry_point_lists_modes():
    out = subprocess.run([sys.executable, "-m", "sazs.eval", "list"], capture_output=True, text=True, check=True).stdout
    assert "oracle (upper bound, uses GT)" in out and "fold 3: unseen pottedplant" in out


def test_project_denoises_a_noisy_truth_with_real_priors(trained):
    """Eigenvectors from the store line up with the masks: projecting a noisy ground truth onto them recovers it."""
    import torch

    from sazs.core.metrics import intersection_union
    from sazs.datasets.base import DatasetConfig
    from sazs.datasets.registry import build_dataset
    from sazs.eval.fusion import fuse_binary
    from sazs.segments.refine import upsample_eigvecs
    from sazs.stores.reader import open_store

    voc, store_path, _ = trained
    dataset, store = build_dataset(DatasetConfig(name="voc", root=str(voc), split="val")), open_store(store_path)
    rng = np.random.default_rng(0)
    iou = {"none": [], "project": []}
    for id_ in dataset.ids:
        mask = dataset.load_mask(id_)
        eig = upsample_eigvecs(store.get(id_).eigvecs, mask.shape)
        for c in sorted(set(np.unique(mask).tolist()) - {0, 255}):
            target = torch.from_numpy(np.where(mask == 255, 255, mask == c).astype(np.int64))
            noisy = 0.7 * (mask == c) + 0.15 + rng.normal(0, 0.25, mask.shape)
            p = torch.from_numpy(noisy.clip(0, 1).astype(np.float32))
            for mode in iou:
                fused = fuse_binary(mode, torch.stack([1 - p, p]), eig).mask
                inter, union = intersection_union(fused.long(), target, 2)
                iou[mode].append(float(inter[1] / union[1]))
    assert np.mean(iou["project"]) > np.mean(iou["none"]) + 0.2, {k: np.mean(v) for k, v in iou.items()}


PURE = (
    "sazs.eval.splits",
    "sazs.eval.episodes",
    "sazs.eval.fusion",
    "sazs.eval.evaluate",
    "sazs.eval.report",
    "sazs.segments.refine",
    "sazs.quality.quality",
    "sazs.quality.scoring",
    "sazs.quality.report",
)


def test_dependency_rule():
    """The evaluator's and the quality tool's pure modules never load the trainer or the pipeline."""
    code = (
        "import sys; "
        + "; ".join(f"import {module}" for module in PURE)
        + "; print(sorted(m for m in sys.modules if m.startswith(('sazs.train', 'sazs.pipeline'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_coco20i_end_to_end(tmp_path, capsys):
    from sazs.datasets.synthetic import make_coco

    root = make_coco(tmp_path / "coco", num_train=4, num_val=30, size=(56, 72), seed=0)
    store, run, out = tmp_path / "val.zarr", tmp_path / "run", tmp_path / "rep"
    assert (
        priors_cli.main(
            [
                "run",
                "--dataset",
                "coco",
                "--data",
                str(root),
                "--split",
                "val",
                "--extractor",
                "color",
                "--short-side",
                "96",
                "--out",
                str(store),
                "--no-progress",
                "--preview",
                "0",
            ]
        )
        == 0
    )
    assert (
        train_cli.main(
            [
                "run",
                "--dataset",
                "coco",
                "--data",
                str(root),
                "--fold",
                "1",
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
                "1",
                "--workers",
                "0",
                "--spectral-weight",
                "0",
                "--no-progress",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "run",
                "--dataset",
                "coco",
                "--data",
                str(root),
                "--folds",
                "1",
                "--ckpt",
                str(run / "checkpoint.pt"),
                "--priors",
                str(store),
                "--episodes",
                "30",
                "--out",
                str(out),
                "--no-progress",
                "--draw",
                "2",
                "--generalised-limit",
                "5",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert_oracle_never_headline(printed, report)
    assert "COCO-20i · zero-shot episodes · 30 episodes per fold" in printed
    episodes = report["protocols"]["coco-20i"]["episodes"]["fold1"]
    assert episodes["rule"] == "class-uniform" and episodes["episodes"] == 30
    assert report["generalised"]["coco-20i"]["images"] == {"fold1": 5}
    ids = {line.split("__")[0] for line in (out / "splits/coco/val/fold1.txt").read_text().splitlines()}
    assert ids and all(i.isdigit() for i in ids)  # COCO image ids, as HSNet's lists name them
