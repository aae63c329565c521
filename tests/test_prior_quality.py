"""Metrics of priors against masks, each on a case small enough to compute by hand."""

import math

import numpy as np
import pytest
import torch

from sazs.core.linalg import orthonormal_basis
from sazs.quality import quality as pq


def test_iou_and_accuracy_by_hand():
    pred = np.array([[1, 1, 0, 0]], bool)
    truth = np.array([[1, 0, 0, 0]], bool)
    assert pq.iou(pred, truth) == 0.5
    assert pq.accuracy(pred, truth) == 0.75
    valid = np.array([[1, 0, 1, 1]], bool)  # the disagreeing pixel is not evaluated
    assert pq.iou(pred, truth, valid) == 1.0
    assert pq.accuracy(pred, truth, valid) == 1.0
    assert math.isnan(pq.iou(pred, np.zeros_like(truth)))  # no object: undefined, not 0


def test_max_fbeta_by_hand():
    soft = np.array([0.9, 0.8, 0.1, 0.0])
    truth = np.array([1, 0, 1, 0], bool)
    # top 1: P=1, R=1/2 -> 1.3*.5/(.3+.5) = 0.8125; top 2: 0.5; top 3: P=2/3, R=1 -> 0.7222; all: 0.5652
    assert pq.max_fbeta(soft, truth) == pytest.approx(0.8125)
    assert pq.max_fbeta(soft, truth, beta2=1.0) == pytest.approx(0.8)  # F1 of the top 3: 2*(2/3)/(5/3)
    assert pq.max_fbeta(-soft, truth) == pytest.approx(1.3 * 0.5 / (0.3 * 0.5 + 1))  # all four predicted
    assert pq.max_fbeta(soft, truth, np.array([1, 0, 1, 1], bool)) == pytest.approx(1.0)  # 0.8 ignored
    assert math.isnan(pq.max_fbeta(soft, np.zeros(4, bool)))


def test_span_projection_by_hand():
    ones = np.ones((1, 4), np.float32)
    a = np.array([[1, 1, 1, -1]], np.float32)
    vecs = torch.from_numpy(np.stack([ones, a]))  # (2, 1, 4)
    inside = np.array([[[1, 1, 1, 0]]], np.float32)  # in the span: reproduced exactly
    np.testing.assert_allclose(pq.span_projection(vecs, inside), inside, atol=1e-6)
    # e0 on span{1, a}: 1/4 + (0.5/3)(.5, .5, .5, -1.5) = (1/3, 1/3, 1/3, 0)
    outside = np.array([[[1, 0, 0, 0]]], np.float32)
    np.testing.assert_allclose(pq.span_projection(vecs, outside)[0, 0], [1 / 3, 1 / 3, 1 / 3, 0], atol=1e-6)


def test_span_projection_is_the_qr_projector():
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, 9, 11)).astype(np.float32)
    vecs[4] = vecs[0] + vecs[1]  # a dependent direction is dropped, not amplified
    targets = rng.random((2, 9, 11)).astype(np.float32)
    q = orthonormal_basis(torch.from_numpy(vecs).reshape(5, -1).double()).numpy()
    want = (q @ (q.T @ targets.reshape(2, -1).T)).T.reshape(targets.shape)
    np.testing.assert_allclose(pq.span_projection(vecs, targets), want, atol=1e-5)


def _two_by_four():
    v0 = np.ones((2, 4))
    v1 = np.array([[1, 1, -1, -1], [1, 1, -1, -1]], float)  # minority-positive: left half
    v2 = np.array([[1, -1, -1, -1], [-1, -1, -1, -1]], float)
    return np.stack([v0, v1, v2]).astype(np.float32)


def test_score_image_single_object():
    mask = np.array([[255, 255, 0, 0], [255, 255, 0, 0]], np.uint8)  # any non-zero is the object ...
    mask[0, 0] = 1  # ... except 255, which is not evaluated
    vecs = _two_by_four()
    row = pq.score_image(vecs, np.where(mask == 255, 7, mask).astype(np.uint8))
    assert row["fiedler_iou"] == 1.0 and row["fiedler_accuracy"] == 1.0 and row["fiedler_max_fbeta"] == 1.0
    assert row["best_of_n_iou_upper_bound"] == 1.0 and row["best_of_n_index"] == 1
    assert row["span_iou"] == 1.0
    # 255 pixels are ignored: only (0,0) counts as object; v2 > 0 is exactly that pixel
    row = pq.score_image(vecs, mask)
    assert row["fiedler_iou"] == 1.0  # {v1 > 0} & valid = {(0,0)}
    assert row["fiedler_accuracy"] == 1.0
    # a mask on the right half: v1 > 0 misses it entirely (the sign convention, not the mask, picks the side)
    right = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.uint8)
    row = pq.score_image(vecs, right, n_best=2)
    assert row["fiedler_iou"] == 0.0 and row["fiedler_accuracy"] == 0.0
    assert row["best_of_n_iou_upper_bound"] == pytest.approx(0.0)
    assert row["span_iou"] == 1.0  # the span still holds it (1 - left half)


def test_score_image_upsamples_the_grid():
    grid = np.stack([np.ones((2, 2)), np.array([[1, -1], [1, -1]])]).astype(np.float32)
    mask = np.zeros((4, 4), np.uint8)
    mask[:, :2] = 1  # bilinear: columns 1, .5, -.5, -1 -> left half positive
    row = pq.score_image(grid, mask)
    assert row["fiedler_iou"] == 1.0 and row["span_iou"] == 1.0
    with pytest.raises(ValueError, match="needs the image"):
        pq.score_image(grid, mask, refine="guided")
    with pytest.raises(ValueError, match="unknown refinement"):
        pq.score_image(grid, mask, refine="crf")


def test_covering_by_hand():
    segments = np.array([[1, 1, 0, 0]])
    gt = np.array([[0, 0, 0, 1]])
    cover = pq.covering_scores(segments, gt, np.ones_like(gt, bool))
    # class 0 {0,1,2}: best with segment 1 {0,1}: 2/3; class 1 {3}: with segment 0 {2,3}: 1/2
    assert cover == {0: (pytest.approx(2 / 3), 3), 1: (pytest.approx(0.5), 1)}
    vecs = np.stack([np.ones((1, 4)), np.array([[1, 1, -1, -1]])]).astype(np.float32)
    row = pq.score_image(vecs, gt.astype(np.uint8), label_map=True, n_best=1)
    assert row["covering"] == pytest.approx((3 * 2 / 3 + 0.5) / 4)
    assert row["mean_best_iou"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert row["class_best_iou/0"] == pytest.approx(2 / 3) and row["class_best_iou/1"] == pytest.approx(0.5)


def test_boundary_recall_by_hand():
    gt = np.zeros((6, 6), np.uint8)
    gt[:, 3:] = 1  # edge pixels: column 2
    pred = np.zeros((6, 6), np.int64)
    pred[:, 1:] = 1  # edge pixels: column 0, two pixels away
    edges_gt, edges_pred = pq.label_edges(gt), pq.label_edges(pred)
    assert edges_gt[:, 2].all() and edges_gt.sum() == 6
    assert pq.boundary_match(edges_pred, edges_gt, 1.0) == (0.0, 0.0)
    assert pq.boundary_match(edges_pred, edges_gt, 2.0) == (1.0, 1.0)
    both = pred.copy()
    both[:, 3:] = 2  # edges at columns 0 and 2: all gt found, half the predicted edges right
    assert pq.boundary_match(pq.label_edges(both), edges_gt, 1.0) == (1.0, 0.5)
    # ignored pixels: an edge next to an ignored pixel does not count
    ignored = gt.copy()
    ignored[:, 3] = 255
    assert not pq.label_edges(ignored, ignored != 255).any()


def test_score_image_label_map_boundaries_and_span():
    gt = np.zeros((6, 6), np.uint8)
    gt[:, 3:] = 1
    gt[0, 0] = 255
    v1 = np.where(np.arange(6) < 3, 1.0, -1.0)[None].repeat(6, 0)
    vecs = np.stack([np.ones((6, 6)), v1]).astype(np.float32)
    row = pq.score_image(vecs, gt, label_map=True, n_best=1, boundary_tolerance=1)
    assert row["boundary_recall"] == 1.0 and row["boundary_precision"] == 1.0
    assert row["covering"] == 1.0 and row["span_miou"] == 1.0


def test_summarise_skips_missing_and_nan():
    rows = [{"a": 1.0, "best_of_n_index": 3.0}, {"a": 3.0, "b": math.nan}, {"b": 2.0}]
    assert pq.summarise(rows) == {"num_images": 3.0, "a": 2.0, "b": 2.0}


# ----------------------------------------------------------------------------- end to end: sazs-eval priors


def _write_davis(root, size=(48, 64)):
    from PIL import Image

    h, w = size
    for seq, (y, x) in (("box", (8, 12)), ("blob", (20, 30))):
        for frame in ("00000", "00005"):
            image = np.full((h, w, 3), (30, 60, 40), np.uint8)
            mask = np.zeros((h, w), np.uint8)
            mask[y : y + 20, x : x + 24] = 255
            image[mask > 0] = (230, 200, 40)
            (root / "JPEGImages/480p" / seq).mkdir(parents=True, exist_ok=True)
            (root / "Annotations/480p" / seq).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "JPEGImages/480p" / seq / f"{frame}.png")
            Image.fromarray(mask).save(root / "Annotations/480p" / seq / f"{frame}.png")
    (root / "Annotations/480p/blob/00005.png").unlink()  # recorded, not raised


def test_eval_priors_end_to_end_on_a_synthetic_davis(tmp_path):
    import json

    from sazs.eval.cli import main as eval_main
    from sazs.pipeline.cli import main as priors_main

    root = tmp_path / "DAVIS"
    _write_davis(root)
    store = tmp_path / "davis.zarr"
    assert (
        priors_main(
            [
                "run",
                "--dataset",
                "davis",
                "--data",
                str(root),
                "--extractor",
                "color",
                "--short-side",
                "48",
                "--out",
                str(store),
                "--preview",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path / "report"
    assert (
        eval_main(
            [
                "priors",
                str(store),
                str(store),
                "--names",
                "ours,again",
                "--dataset",
                "davis",
                "--data",
                str(root),
                "--out",
                str(out),
                "--refine",
                "guided",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    ours = report["stores"]["ours"]
    assert set(ours["variants"]) == {"bilinear", "guided"}
    mean = ours["variants"]["bilinear"]["mean"]
    assert mean["num_images"] == 3 and mean["span_iou"] > 0.5
    assert mean["best_of_n_iou_upper_bound"] >= mean["fiedler_iou"] - 1e-9
    # the report holds exactly what score_image gives on the store's priors and the dataset's masks
    from sazs.datasets.base import DatasetConfig
    from sazs.datasets.registry import build_dataset
    from sazs.stores.reader import open_store

    ds, priors = build_dataset(DatasetConfig(name="davis", root=str(root))), open_store(store)
    rows = [pq.score_image(priors.get(i).eigvecs, ds.load_mask(i)) for i in ("blob/00000", "box/00000", "box/00005")]
    for key in pq.SINGLE_KEYS:
        assert mean[key] == pytest.approx(np.mean([r[key] for r in rows]))
    image = ds.load_image("box/00000")
    guided = pq.score_image(priors.get("box/00000").eigvecs, ds.load_mask("box/00000"), image=image, refine="guided")
    got = next(r for r in ours["variants"]["guided"]["images"] if r["id"] == "box/00000")
    assert got["fiedler_iou"] == pytest.approx(guided["fiedler_iou"]) and got["group"] == "box"
    assert set(ours["variants"]["bilinear"]["per_group"]) == {"box", "blob"}
    assert list(ours["failures"]) == ["blob/00005"] and "mask not found" in ours["failures"]["blob/00005"]
    assert ours["refine_ms_per_image"] > 0 and ours["ms_per_image"] > 0
    md = (out / "report.md").read_text()
    assert "upper bound" in md and "| ours | guided |" in md and "per sequence" in md
    assert (out / "grid-ours.png").is_file()
    # a dataset the store was not computed for: every image is a recorded failure, exit code 1
    other = tmp_path / "other"
    _write_davis(other, size=(40, 64))
    assert (
        eval_main(
            [
                "priors",
                str(store),
                "--dataset",
                "davis",
                "--data",
                str(other),
                "--out",
                str(tmp_path / "r2"),
                "--no-pictures",
                "--no-progress",
            ]
        )
        == 1
    )


def test_eval_priors_label_maps_on_a_synthetic_camvid(tmp_path):
    import json

    from PIL import Image

    from sazs.eval.cli import main as eval_main
    from sazs.pipeline.cli import main as priors_main

    root = tmp_path / "CamVid"
    for split in ("val", "valannot"):
        (root / split).mkdir(parents=True)
    for i in range(2):
        labels = np.full((48, 64), 0, np.uint8)  # sky on top, road below, a car, unlabelled strip
        labels[24:] = 3
        labels[30:44, 10 + 10 * i : 34 + 10 * i] = 8
        labels[:, :2] = 11
        colours = {0: (120, 160, 230), 3: (90, 90, 90), 8: (200, 30, 30), 11: (0, 0, 0)}
        image = np.zeros((48, 64, 3), np.uint8)
        for v, c in colours.items():
            image[labels == v] = c
        Image.fromarray(image).save(root / "val" / f"f{i}.png")
        Image.fromarray(labels, mode="L").save(root / "valannot" / f"f{i}.png")
    store = tmp_path / "camvid.zarr"
    assert (
        priors_main(
            [
                "run",
                "--dataset",
                "camvid",
                "--data",
                str(root),
                "--extractor",
                "color",
                "--short-side",
                "48",
                "--out",
                str(store),
                "--preview",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path / "report"
    assert (
        eval_main(
            ["priors", str(store), "--dataset", "camvid", "--data", str(root), "--out", str(out), "--no-progress"]
        )
        == 0
    )
    v = json.loads((out / "report.json").read_text())["stores"]["camvid.zarr"]["variants"]["bilinear"]
    assert set(v["per_class"]) == {"sky", "road", "car"}
    assert 0 < v["mean"]["covering"] <= 1 and 0 <= v["mean"]["boundary_recall"] <= 1
    assert "best IoU per class" in (out / "report.md").read_text()


def test_eval_priors_baseline_dsm_is_computed_and_scored_beside(tmp_path):
    import json
    from dataclasses import fields

    from sazs.eval.cli import main as eval_main
    from sazs.pipeline.cli import main as priors_main
    from sazs.pipeline.graph import GraphConfig

    if "kind" not in {f.name for f in fields(GraphConfig)}:
        pytest.skip("this tree has no dense baseline graph yet")
    root = tmp_path / "DAVIS"
    _write_davis(root)
    store = tmp_path / "davis.zarr"
    assert (
        priors_main(
            [
                "run",
                "--dataset",
                "davis",
                "--data",
                str(root),
                "--extractor",
                "color",
                "--short-side",
                "48",
                "--out",
                str(store),
                "--preview",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path / "report"
    argv = [
        "priors",
        str(store),
        "--names",
        "ours",
        "--dataset",
        "davis",
        "--data",
        str(root),
        "--out",
        str(out),
        "--baseline",
        "dsm",
        "--no-progress",
    ]
    assert eval_main(argv) == 0
    assert (out / "grid-dsm-original.png").is_file()  # a file name without spaces
    argv.insert(-1, "--no-pictures")
    report = json.loads((out / "report.json").read_text())
    assert list(report["stores"]) == ["ours", "dsm (original)"]
    base = report["stores"]["dsm (original)"]
    assert base["variants"]["bilinear"]["mean"]["num_images"] == 3 and base["ms_per_image"] > 0
    assert (out / "baseline-dsm.zarr").is_dir()
    assert eval_main(argv) == 0  # a re-run resumes the finished baseline store
