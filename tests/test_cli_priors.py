"""End-to-end: the real `sazs-priors` CLI on sample, folder, VOC and COCO layouts."""

import json

import numpy as np
import pytest
from images import write_bad_images
from PIL import Image
from storecheck import assert_same_arrays

from sazs.datasets.synthetic import make_coco, make_voc
from sazs.features.extractors import ExtractorConfig, build_extractor
from sazs.pipeline import cli, compute
from sazs.pipeline.graph import GraphConfig
from sazs.pipeline.job import side_paths
from sazs.pipeline.spectral import SpectralConfig
from sazs.stores.reader import open_store

FAST = ["--extractor", "color", "--short-side", "64", "--no-progress"]


def run(*argv):
    return cli.main(["run", *map(str, argv)])


def check_store(path, n_done, k=8):
    store = open_store(path)
    status = store.status()
    assert (status == 1).sum() == n_done
    tol = store.manifest["solver"]["residual_tol"]
    for id_ in store.done_ids():
        p = store.get(id_)
        assert p.eigvecs.shape == (k, *p.grid)
        assert np.all(np.diff(p.eigvals) >= -1e-6), "eigenvalues ascending"
        assert abs(p.eigvals[0]) < 1e-3, "first eigenvalue is the trivial 0"
        assert np.all(p.residuals <= tol)
        # sign convention: the positive part of each non-trivial vector is the minority
        for vec in p.eigvecs[1:]:
            assert (vec > 0).sum() <= vec.size / 2 + 1
    return store


def test_sample_color_end_to_end_and_resume(tmp_path):
    out = tmp_path / "sample.zarr"
    assert run(*FAST, "--limit", 3, "--out", out, "--shard-size", 2) == 0
    store = check_store(out, 3)
    assert store.manifest["extractor"]["name"] == "color"
    assert store.manifest["dataset"]["name"] == "sample"
    preview, summary_json = side_paths(out)
    assert Image.open(preview).size[0] > 200
    first = json.loads(summary_json.read_text())
    assert first["computed"] == 3 and first["done"] == 3
    # the same command again computes nothing
    assert run(*FAST, "--limit", 3, "--out", out, "--shard-size", 2) == 0
    assert json.loads(summary_json.read_text())["computed"] == 0


def test_other_setting_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert run(*FAST, "--limit", 1, "--out", out, "--preview", 0) == 0
    assert run(*FAST, "--limit", 1, "--out", out, "--knn", 5, "--preview", 0) == 2
    err = capsys.readouterr().err
    assert "graph.k: 10 != 5" in err and "--overwrite" in err
    assert run(*FAST, "--limit", 1, "--out", out, "--knn", 5, "--preview", 0, "--overwrite") == 0
    assert open_store(out).manifest["graph"]["k"] == 5


def test_bad_images_are_recorded_and_the_job_goes_on(tmp_path, capsys):
    root = tmp_path / "imgs"
    expected = write_bad_images(root)
    out = tmp_path / "folder.zarr"
    assert run(*FAST, "--dataset", "folder", "--data", root, "--out", out, "--shard-size", 3) == 0
    store = open_store(out)
    failures = store.failures()
    bad = {id_ for id_, outcome in expected.items() if outcome != "ok"}
    assert set(failures) == bad
    assert all(reason for reason in failures.values())
    assert set(store.done_ids()) == set(expected) - bad
    printed = capsys.readouterr().out
    for id_ in bad:
        assert f"failed     {id_}:" in printed


def test_voc_and_coco_layouts(tmp_path):
    voc = make_voc(tmp_path / "voc", num_train=2, num_val=3)
    out = tmp_path / "voc.zarr"
    assert run(*FAST, "--dataset", "voc", "--data", voc, "--split", "val", "--out", out) == 0
    store = check_store(out, 3)
    assert store.manifest["dataset"]["split"] == "val"
    coco = make_coco(tmp_path / "coco", num_train=2, num_val=3)
    out = tmp_path / "coco.zarr"
    assert run(*FAST, "--dataset", "coco", "--data", coco, "--split", "val2017", "--out", out) == 0
    store = check_store(out, 3)
    assert all(id_.isdigit() for id_ in store.ids)


def test_interrupt_then_resume_gives_identical_results(tmp_path, monkeypatch):
    ref = tmp_path / "ref.zarr"
    assert run(*FAST, "--limit", 4, "--out", ref, "--shard-size", 2, "--preview", 0) == 0

    out = tmp_path / "int.zarr"
    real = compute.compute_priors
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C while the second shard is being computed
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(compute, "compute_priors", flaky)
    args = [*FAST, "--limit", 4, "--out", out, "--shard-size", 2, "--batch-size", 2, "--preview", 0]
    assert run(*args) == 130
    assert list(open_store(out).status()) == [1, 1, 0, 0]
    monkeypatch.setattr(compute, "compute_priors", real)
    assert run(*args) == 0
    assert_same_arrays(ref, out)


def test_show_and_list(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert run(*FAST, "--limit", 3, "--out", out, "--preview", 0) == 0
    store = open_store(out)
    png = tmp_path / "show.png"
    assert cli.main(["show", str(out), "--ids", store.ids[2], store.ids[0], "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 200
    assert cli.main(["show", str(out), "--ids", "no-such-image", "--out", str(png)]) == 2
    assert "no-such-image" in capsys.readouterr().err
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "imgfocus-vits14" in listed and "eigsh" in listed and "coco" in listed


def test_errors_name_the_bad_input(tmp_path, capsys):
    assert run(*FAST, "--dataset", "nope", "--out", tmp_path / "x.zarr") == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert run("--extractor", "dino-vits8", "--limit", 1, "--out", tmp_path / "x.zarr") == 2
    assert "--weights" in capsys.readouterr().err
    assert run(*FAST, "--dataset", "voc", "--data", tmp_path / "missing", "--out", tmp_path / "x.zarr") == 2


def test_help_has_a_runnable_example(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "sazs-priors run" in capsys.readouterr().out


@pytest.mark.slow
def test_default_extractor_on_sample(tmp_path):
    """What `make priors` runs, on two images at a smaller size to stay quick."""
    out = tmp_path / "vit.zarr"
    assert run("--limit", 2, "--short-side", 224, "--out", out, "--no-progress") == 0
    store = check_store(out, 2)
    assert store.manifest["extractor"]["name"] == "imgfocus-vits14"
    assert len(store.manifest["extractor"]["weights_sha256"]) == 64


def test_parts_merge_into_the_whole(tmp_path):
    """Two machines each compute one part into their own store; merge equals one full run."""
    from sazs.stores.merge import merge

    common = [*FAST, "--limit", 5, "--shard-size", 2, "--preview", 0]
    assert run(*common, "--out", tmp_path / "whole.zarr") == 0
    assert run(*common, "--part", "0/2", "--out", tmp_path / "p0.zarr") == 0
    assert run(*common, "--part", "1/2", "--out", tmp_path / "p1.zarr") == 0
    p0, p1 = open_store(tmp_path / "p0.zarr"), open_store(tmp_path / "p1.zarr")
    assert list(p0.status()) == [1, 1, 0, 0, 0] and list(p1.status()) == [0, 0, 1, 1, 1]
    merge(tmp_path / "merged.zarr", [str(tmp_path / "p0.zarr"), str(tmp_path / "p1.zarr")])
    assert_same_arrays(tmp_path / "whole.zarr", tmp_path / "merged.zarr")
    assert run(*common, "--part", "2/2", "--out", tmp_path / "bad.zarr") == 2


def test_an_image_the_extractor_rejects_fails_alone():
    """A batch whose extraction raises is retried image by image: only the bad one fails."""
    real = build_extractor(ExtractorConfig(name="color", short_side=64))

    class Picky:
        config = real.config

        def extract(self, images, **kw):
            if any(not image.any() for image in images):
                raise ValueError("all-black image")
            return real.extract(images)

    rng = np.random.default_rng(0)
    good = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
    black = np.zeros((80, 96, 3), np.uint8)
    out = compute.compute_priors([good, black, good], Picky(), GraphConfig(), SpectralConfig())
    assert isinstance(out[1], ValueError) and "all-black" in str(out[1])
    assert out[0][0] == out[2][0] and not isinstance(out[0], Exception)
