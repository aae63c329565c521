"""The report and its pictures never present the oracle as the headline (tables, Markdown, JSON, picture titles)."""

import json

import numpy as np
import pytest

from sazs.eval.evaluate import EvalConfig
from sazs.eval.pictures import draw_episode_grid, grid_titles
from sazs.eval.report import build_report, format_markdown, format_text, headline_line, write_report

MODES = {"none": 0.30, "project": 0.25, "select": 0.35, "oracle": 0.60}  # the oracle is by far the best


def fold_result(fold: int, offset: float) -> dict:
    modes = {}
    for mode, miou in MODES.items():
        modes[mode] = {
            "miou": miou + offset,
            "fb_iou": 0.5 + offset,
            "boundary_f": 0.2,
            "iou": {"cat": miou},
            "boundary_f_per_class": {"cat": 0.2},
            "fallbacks": 0,
            "segment_rate": 0.5 if mode in ("select", "oracle") else None,
        }
    protocol = {
        "fold": fold,
        "source": "generated (rule)",
        "rule": "cycle",
        "list_entries": 3,
        "episodes": 10,
        "distinct_episodes": 3,
        "images": 2,
        "episodes_per_class": {"cat": 10},
    }
    return {"fold": fold, "protocol": protocol, "modes": modes, "seconds": 1.0, "samples": []}


def generalised_result(fold: int) -> dict:
    mode = {
        "seen_miou": 0.5,
        "unseen_miou": float("nan"),
        "harmonic_miou": float("nan"),
        "fb_iou": 0.6,
        "boundary_f_unseen": 0.1,
        "iou": {"background": 0.9},
    }
    return {"fold": fold, "images": 5, "modes": {"none": mode, "project": mode}, "fallbacks": 0, "seconds": 0.1}


@pytest.fixture
def report():
    return build_report(
        {"pascal-5i": [fold_result(0, 0.0), fold_result(1, 0.1)]},
        headline="select",
        generalised={"pascal-5i": [generalised_result(0), generalised_result(1)]},
        meta={"warnings": ["demo"], "checkpoints": {"0": "a.pt", "1": "b.pt"}},
    )


def _walk_keys(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield f"{path}.{k}", k, v
            yield from _walk_keys(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _walk_keys(v, f"{path}[{i}]")


def assert_oracle_never_headline(text: str, report: dict) -> None:
    """What the test suite guards: wherever the oracle is printed it says 'upper bound'; the headline never is it."""
    h = report["headline"]
    assert h["fusion"] != "oracle" and h["ground_truth_free"] is True
    oracle = report["protocols"][h["protocol"]]["fusion"]["oracle_upper_bound"]
    assert h["miou"] != oracle["mean"]["miou"]
    for path, key, value in _walk_keys(report):
        if isinstance(value, list) and "oracle" in value:
            raise AssertionError(f"{path}: a bare 'oracle' in a saved list (use its key oracle_upper_bound)")
        if "oracle" in key:
            assert "upper_bound" in key, path  # JSON key of the oracle says what it is
        if isinstance(value, dict) and "oracle" in str(value.get("label", "")):
            assert value["upper_bound"] is True and "upper bound" in value["label"], path
    for line in text.splitlines():
        if line.lstrip("*").startswith("headline"):
            assert "oracle" not in line, line
        for cell in line.split("|"):
            if "oracle" in cell and "The oracle row is an upper bound" not in cell:
                assert "upper bound" in cell, cell
            if "[headline]" in cell:
                assert "oracle" not in cell, cell


def test_headline_is_ground_truth_free_everywhere(report, tmp_path):
    assert report["headline"]["fusion"] == "select"
    assert report["headline"]["miou"] == pytest.approx((0.35 + 0.45) / 2)  # the select row's mean, not the oracle's
    assert set(report["protocols"]["pascal-5i"]["fusion"]) == {"none", "project", "select", "oracle_upper_bound"}
    text, md = format_text(report), format_markdown(report)
    assert_oracle_never_headline(text, report)
    assert_oracle_never_headline(md, report)
    assert "oracle (upper bound, uses GT)" in text and "select [headline]" in text
    assert "| **select [headline]** |" in md
    assert "headline  PASCAL-5i mean mIoU 40.0 (fusion 'select', ground-truth-free; folds 0,1)" in text
    paths = write_report(report, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved == report and "NaN" not in paths["json"].read_text()
    assert_oracle_never_headline(paths["markdown"].read_text(), saved)
    # a report tampered into an oracle headline cannot be printed
    bad = json.loads(json.dumps(report))
    bad["headline"]["fusion"] = "oracle"
    with pytest.raises(ValueError, match="upper bound"):
        headline_line(bad)


def test_tables_have_folds_and_mean(report):
    text = format_text(report)
    rows = [line for line in text.splitlines() if line.startswith(("0 ", "1 ", "mean"))]
    cells = [c.split() for c in rows[0].split("|")[1:]]
    assert [c[0] for c in cells] == ["30.0", "25.0", "35.0", "60.0"]  # mIoU of none, project, select, oracle
    assert all(c[1:] == ["50.0", "20.0"] for c in cells)
    assert all(line == line.rstrip() for line in text.splitlines())
    assert len(rows) == 6  # two folds + mean, in the episode table and in the generalised table
    assert "mean (2 folds)" in text and "—" in text  # NaN prints as a dash
    assert "| fusion | fold 0 | fold 1 | mean (2 folds) |" in format_markdown(report)


def test_the_oracle_can_never_be_chosen_as_headline():
    with pytest.raises(ValueError, match="upper bound"):
        build_report({"pascal-5i": [fold_result(0, 0.0)]}, headline="oracle")
    with pytest.raises(ValueError, match="upper bound"):
        EvalConfig(headline="oracle")
    with pytest.raises(ValueError, match="not among the evaluated"):
        EvalConfig(fusions=("none", "oracle"), headline="select")
    from sazs.eval import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--headline", "oracle"])
    assert exc.value.code == 2


def test_picture_titles_and_drawing(tmp_path):
    titles = grid_titles(["none", "project", "select", "oracle"], "select")
    assert titles[0] == "image" and titles[-1].startswith("eigen-segments")
    assert "fused: select [headline]" in titles
    assert [t for t in titles if "oracle" in t] == ["oracle (upper bound, uses GT)"]
    with pytest.raises(ValueError, match="upper bound"):
        grid_titles(["oracle"], "oracle")
    rng = np.random.default_rng(0)
    target = np.zeros((20, 30), np.uint8)
    target[5:15, 5:20] = 1
    target[4, 5:20] = 255
    sample = {
        "image_id": "x",
        "class": "cat",
        "image": rng.integers(0, 255, (20, 30, 3), dtype=np.uint8),
        "target": target,
        "masks": {m: target == 1 for m in MODES},
        "iou": {m: 0.5 for m in MODES},
        "eigvecs": rng.normal(size=(4, 5, 6)).astype(np.float32),
    }
    png = draw_episode_grid(
        [sample, {**sample, "eigvecs": None}], tmp_path / "g.png", fusions=list(MODES), headline="select", title="t"
    )
    assert png.is_file() and png.stat().st_size > 1000
    assert draw_episode_grid([], tmp_path / "none.png", fusions=list(MODES), headline="select", title="t") is None
