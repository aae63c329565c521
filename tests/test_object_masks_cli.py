"""The object masks through the CLIs: sazs-store export --format object-masks, and sazs-eval priors
with the object keys and the TokenCut baseline row."""

import json

import numpy as np
from PIL import Image
from test_prior_quality import _write_davis
from test_segments_objects import H, W, _background, _spectrum
from test_store_export import write_store

from sazs.stores import cli as store_cli


def test_export_object_masks_writes_binary_pngs_at_the_image_size(tmp_path, capsys):
    labels = _background()
    labels[4:12, 18:28] = 2  # object off centre, on the right
    vecs, vals = _spectrum(labels)
    store = write_store(
        tmp_path / "s.zarr",
        {"seq/frame0": ((H * 4, W * 4), vals, vecs), "b": ((50, 70), vals, vecs)},
        k=8,
        max_grid=(H, W),
        failed=("c",),
    )
    out = tmp_path / "out"
    assert store_cli.main(["export", str(store), str(out), "--format", "object-masks", "--no-progress"]) == 0
    a = Image.open(out / "seq" / "frame0.png")
    b = Image.open(out / "b.png")
    assert not (out / "c.png").exists()
    assert a.mode == "L" and a.size == (W * 4, H * 4)
    assert b.mode == "L" and b.size == (70, 50)
    pixels = np.asarray(a)
    assert set(np.unique(pixels)) == {0, 255}
    truth = np.kron(labels == 2, np.ones((4, 4), bool))
    got = pixels == 255
    assert (got & truth).sum() / (got | truth).sum() > 0.9
    # resumable; another refinement into the same folder is refused
    assert store_cli.main(["export", str(store), str(out), "--format", "object-masks", "--no-progress"]) == 0
    images = tmp_path / "images"
    (images / "seq").mkdir(parents=True)
    picture = np.where(truth[..., None], np.uint8(200), np.uint8(30)).repeat(3, 2)
    Image.fromarray(picture).save(images / "seq" / "frame0.png")
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(images / "b.png")
    argv = ["export", str(store), str(out), "--format", "object-masks", "--refine", "guided", "--images", str(images)]
    assert store_cli.main([*argv, "--no-progress"]) != 0
    assert "another store or setting" in capsys.readouterr().err
    refined = tmp_path / "refined"
    argv[2] = str(refined)
    assert store_cli.main([*argv, "--no-progress"]) == 0
    got = np.asarray(Image.open(refined / "seq" / "frame0.png")) == 255
    assert (got & truth).sum() / (got | truth).sum() > 0.9
    assert store_cli.main(["export", str(store), str(tmp_path / "x"), "--format", "npz", "--refine", "guided"]) != 0
    assert "--refine is for --format object-masks" in capsys.readouterr().err


def test_eval_priors_object_keys_and_the_tokencut_baseline(tmp_path, capsys):
    from sazs.eval.cli import main as eval_main
    from sazs.pipeline.cli import main as priors_main

    root = tmp_path / "DAVIS"
    _write_davis(root)
    store = tmp_path / "davis.zarr"
    run = ["run", "--dataset", "davis", "--data", str(root), "--extractor", "color", "--short-side", "48"]
    assert priors_main([*run, "--out", str(store), "--preview", "0", "--no-progress"]) == 0
    out = tmp_path / "report"
    argv = ["priors", str(store), "--names", "ours", "--dataset", "davis", "--data", str(root), "--out", str(out)]
    argv += ["--baseline", "tokencut", "--refine", "guided", "--no-progress"]
    assert eval_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["stores"]) == ["ours", "tokencut (tau 0.2)"]
    for name in report["stores"]:
        for variant in ("bilinear", "guided"):
            mean = report["stores"][name]["variants"][variant]["mean"]
            assert mean["num_images"] == 3
            for key in ("object_iou", "object_accuracy", "object_max_fbeta"):
                assert 0 <= mean[key] <= 1
    # the synthetic frames hold one flat box on a flat background, on a coarse 6 x 8 grid: both
    # find it, and the refinement brings it to the pixels
    ours, tokencut = report["stores"]["ours"]["variants"], report["stores"]["tokencut (tau 0.2)"]["variants"]
    assert ours["bilinear"]["mean"]["object_iou"] > 0.6 and tokencut["bilinear"]["mean"]["object_iou"] > 0.6
    assert ours["guided"]["mean"]["object_iou"] > 0.9 and tokencut["guided"]["mean"]["object_iou"] > 0.9
    assert "fiedler_iou" not in report["stores"]["tokencut (tau 0.2)"]["variants"]["bilinear"]["mean"]
    assert report["stores"]["ours"]["object_ms_per_image"]["bilinear"] > 0
    md = (out / "report.md").read_text()
    assert "object IoU" in md and "| tokencut (tau 0.2) | bilinear |" in md
    assert (out / "objects-ours.png").is_file() and (out / "objects-tokencut.png").is_file()
    assert (out / "baseline-tokencut-tau0.2.npz").is_file()
    assert eval_main([*argv, "--no-pictures"]) == 0  # a re-run reads the baseline's masks back
    assert eval_main([*argv[:-5], "--no-progress", "--baseline", "dsm,nope"]) != 0
    assert "unknown baseline 'nope'" in capsys.readouterr().err
