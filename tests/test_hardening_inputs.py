"""Hostile input files end in one line naming the file and the fix, or in a recorded failure.

Torch zip files with deflated tensors (decompression bombs) as checkpoints, DSM files and
ViT weights; values in a checkpoint's config; COCO annotation JSON nested deep or with
huge image sizes; split lists with huge integers; a feature-cache file of the wrong
shape; a manifest with a non-numeric residual_tol. The bombs are built in the test
without ever holding what they unpack to.
"""

import io
import json
import logging
import pickle
import re
import struct
import sys
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from test_checkpoint_safety import entry_points, good_checkpoint, one_error_line, train_argv, trained  # noqa: F401

from sazs.core import limits
from sazs.core.jsonfiles import json_depth
from sazs.core.torchfiles import TorchFileError, load_torch_file
from sazs.datasets import coco as coco_module
from sazs.datasets import synthetic
from sazs.datasets.base import DatasetConfig
from sazs.datasets.images import ImageError
from sazs.datasets.registry import build_dataset
from sazs.datasets.synthetic import make_voc
from sazs.eval import cli as eval_cli
from sazs.eval.splits import read_split_list
from sazs.features.vit_weights import load_official_vit
from sazs.model.cache import FeatureCache
from sazs.model.checkpoint import CheckpointError, load_checkpoint, load_for_inference
from sazs.model.encoders import create_clip
from sazs.model.model import TINY_ARCHS, ModelConfig
from sazs.stores import cli as store_cli
from sazs.stores.dsm import DsmFileError, load_dsm_bytes
from sazs.stores.integrity import verify
from sazs.stores.manifest import build_manifest
from sazs.stores.reader import open_store
from sazs.stores.writer import StoreWriter
from sazs.train import cli as train_cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

_SEED = 123457  # numel of the small tensor saved, then patched in its pickle to the bomb's size


def torch_bomb(nbytes: int, extra: dict | None = None, key: str = "bomb") -> bytes:
    """A torch.save zip holding ``extra`` and a float32 tensor ``key`` of ``nbytes`` deflated zeros
    (about 1 KB per MiB), written 1 MiB at a time."""
    buf = io.BytesIO()
    torch.save({**(extra or {}), key: torch.zeros(_SEED)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    seed_record = next(i.filename for i in src.infolist() if i.file_size == 4 * _SEED)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == seed_record:
                continue
            if info.filename.endswith("data.pkl"):
                assert data.count(b"J" + struct.pack("<i", _SEED)) >= 1
                data = data.replace(b"J" + struct.pack("<i", _SEED), b"J" + struct.pack("<i", nbytes // 4))
            z.writestr(info, data)
        entry = zipfile.ZipInfo(seed_record)
        entry.compress_type = zipfile.ZIP_DEFLATED
        with z.open(entry, "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(nbytes >> 20):
                f.write(block)
    return out.getvalue()


# ----------------------------------------------------------------------------- torch zip files


def test_a_deflated_bomb_is_refused_from_the_zip_directory_before_loading(tmp_path):
    data = torch_bomb(64 << 20)  # 64 MiB of zeros in ~70 KB
    assert len(data) < 200_000
    path = tmp_path / "bomb.pt"
    path.write_bytes(data)
    with pytest.raises(TorchFileError, match=rf"refusing {path}: entry .* decompression bomb"):
        load_torch_file(path)
    with pytest.raises(TorchFileError, match="refusing <bytes>"):
        load_torch_file(data)
    plain = tmp_path / "plain.pt"
    torch.save({"x": torch.arange(5)}, plain)  # what torch.save writes (stored entries) loads
    assert torch.equal(load_torch_file(plain)["x"], torch.arange(5))


def test_torch_files_over_the_bounds_or_in_the_legacy_format_are_refused(tmp_path, monkeypatch):
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(TorchFileError, match="legacy format"):
        load_torch_file(legacy)
    plain = tmp_path / "plain.pt"
    torch.save({"x": torch.ones(1000), "names": ["a"] * 100}, plain)
    with pytest.raises(TorchFileError, match=r"unpacks to \d+ bytes, more than the 1000"):
        load_torch_file(plain, max_unpacked=1000)
    monkeypatch.setattr(limits, "MAX_TORCH_PICKLE_BYTES", 64)
    with pytest.raises(TorchFileError, match=r"its pickle .*data.pkl.*\$SAZS_MAX_TORCH_PICKLE_BYTES"):
        load_torch_file(plain)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(plain.read_bytes()[:300])
    with pytest.raises(TorchFileError, match="truncated or damaged"):
        load_torch_file(truncated)


def test_a_checkpoint_carrying_a_bomb_fails_in_one_line_at_predict(trained, tmp_path, capsys):
    voc, ckpt_path = trained
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(torch_bomb(64 << 20, extra=good_checkpoint(ckpt_path)))
    with pytest.raises(CheckpointError, match="decompression bomb"):
        load_checkpoint(bomb)
    capsys.readouterr()
    assert entry_points(voc, tmp_path)["predict"](bomb) == 2
    assert "decompression bomb" in one_error_line(capsys.readouterr().err, bomb)


def test_a_dsm_bomb_is_a_recorded_failure_of_its_image(tmp_path, capsys):
    bomb = torch_bomb(64 << 20, extra={"eigenvalues": torch.zeros(3)}, key="eigenvectors")
    with pytest.raises(DsmFileError, match="decompression bomb"):
        load_dsm_bytes(bomb, "x.pth")
    imgs, eigs = tmp_path / "imgs", tmp_path / "eigs"
    imgs.mkdir()
    eigs.mkdir()
    for name in ("good", "bomb"):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(imgs / f"{name}.png")
    n = 16
    vecs = np.stack([np.full(n, 0.25), np.linspace(-1, 1, n), np.cos(np.arange(n))]).astype(np.float32)
    vals = torch.tensor([0.0, 0.1, 0.4], dtype=torch.float64)
    torch.save({"eigenvalues": vals, "eigenvectors": torch.from_numpy(vecs)}, eigs / "good.pth")
    (eigs / "bomb.pth").write_bytes(bomb)
    out = tmp_path / "imp.zarr"
    argv = ["import-dsm", str(eigs), "--dataset", "folder", "--data", str(imgs), "--out", str(out), "--no-progress"]
    assert store_cli.main(argv) == 0, capsys.readouterr().err
    store = open_store(out)
    assert store.done_ids() == ["good"]
    assert "decompression bomb" in store.failures()["bomb"]


# ----------------------------------------------------------------------------- a checkpoint's config


@pytest.mark.parametrize(
    ("section", "field", "value", "expected"),
    [
        ("model", "head_dim", 2**40, "model.head_dim = an integer of 41 bits is not an integer in 1..4096"),
        ("model", "head_dim", -3, "model.head_dim = -3"),
        ("model", "upsample", 0, "model.upsample = 0"),
        ("model", "init_temperature", float("nan"), "model.init_temperature = nan"),
        ("model", "arch", "../../x", "model.arch = '../../x' is not an architecture name"),
        ("augment", "crop_size", 10**7, "data.augment.crop_size = 10000000 is not an integer in 1..2048"),
        ("augment", "crop_size", "64", "data.augment.crop_size = '64'"),
        ("train", "seed", 2**70, "train.seed"),
    ],
)
def test_config_values_out_of_range_fail_naming_the_file_and_field(trained, tmp_path, section, field, value, expected):
    _, ckpt_path = trained
    ckpt = good_checkpoint(ckpt_path)
    where = ckpt["config"]["data"]["augment"] if section == "augment" else ckpt["config"][section]
    where[field] = value
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value) and expected in str(err.value)


def test_a_bad_config_value_is_one_line_at_every_entry_point(trained, tmp_path, capsys):
    voc, ckpt_path = trained
    ckpt = good_checkpoint(ckpt_path)
    ckpt["config"]["model"]["head_dim"] = 2**40
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    for name, run in entry_points(voc, tmp_path).items():
        capsys.readouterr()
        assert run(bad) == 2, name
        assert "model.head_dim" in one_error_line(capsys.readouterr().err, bad)


def test_a_checkpoint_never_chooses_a_file_to_open(trained, tmp_path, capsys, monkeypatch):
    voc, ckpt_path = trained
    ckpt = good_checkpoint(ckpt_path)
    secret = tmp_path / "secret.pt"
    secret.write_bytes(b"not for a checkpoint to choose")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    for key, value, flag in (
        ("clip_weights", str(secret), "--clip-weights"),
        ("backbone_weights", str(secret), "--backbone-weights"),
        ("text_encoder", str(tmp_path), "--text-encoder"),
    ):
        edited = {**ckpt, "config": {**ckpt["config"], "model": {**ckpt["config"]["model"], key: value}}}
        bad = tmp_path / f"{key}.pt"
        torch.save(edited, bad)
        with pytest.raises(CheckpointError, match=rf"{bad} was trained with .*pass .* {flag}"):
            load_for_inference(bad, "cpu")
        capsys.readouterr()
        assert entry_points(voc, tmp_path)["predict"](bad) == 2
        assert flag in one_error_line(capsys.readouterr().err, bad)
    assert str(secret) not in opened


# ----------------------------------------------------------------------------- COCO annotations


def _coco_dir(tmp_path, doc_text: str):
    (tmp_path / "val2017").mkdir(exist_ok=True)
    (tmp_path / "annotations").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "val2017" / "000000000007.jpg")
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(doc_text)
    return path


def _coco_doc(height=20, width=20, segmentation=None) -> dict:
    cats = [{"id": i, "name": n, "supercategory": s} for i, n, s in synthetic.COCO_CATEGORIES]
    ann = {"id": 1, "image_id": 7, "category_id": 1, "area": 16.0, "iscrowd": 0}
    ann["segmentation"] = segmentation or [[5, 5, 9, 5, 9, 9, 5, 9]]
    return {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "height": height, "width": width}],
        "annotations": [ann],
        "categories": cats,
    }


def test_coco_json_nested_deep_is_one_line_naming_the_file(tmp_path):
    path = _coco_dir(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=rf"annotation file {path} nests .* too deeply.*re-download"):
        build_dataset(DatasetConfig(name="coco", root=str(tmp_path)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"images": [{"id": 1' + "1" * 5000 + "}]}", "is not usable JSON (Exceeds the limit (4300 digits)"),
        (
            json.dumps({**_coco_doc(), "annotations": [{**_coco_doc()["annotations"][0], "area": "big"}]}),
            "no number 'area'",
        ),
    ],
)
def test_coco_json_values_that_python_refuses_name_the_file(tmp_path, text, expected):
    path = _coco_dir(tmp_path, text)
    with pytest.raises(ValueError, match=rf"annotation file {path}.*{re.escape(expected)}"):
        build_dataset(DatasetConfig(name="coco", root=str(tmp_path)))


def test_coco_json_over_the_size_bound_is_refused_unread(tmp_path, monkeypatch):
    path = _coco_dir(tmp_path, json.dumps(_coco_doc()))
    monkeypatch.setattr(coco_module, "MAX_ANNOTATION_JSON_BYTES", 100)
    with pytest.raises(ValueError, match=rf"annotation file {path} is \d+ bytes, more than the 100"):
        build_dataset(DatasetConfig(name="coco", root=str(tmp_path)))


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (_coco_doc(height=10**6, width=10**6), "size 1000000x1000000, not 1 to 40 megapixels"),
        (_coco_doc(height=-20), "size -20x20"),
        (_coco_doc(segmentation={"size": [10**6, 10**6], "counts": [0, 10]}), "an RLE of size"),
        (_coco_doc(segmentation="polygon"), r"has no segmentation \(polygons or RLE\) but str"),
    ],
)
def test_coco_sizes_out_of_bounds_fail_that_image_before_any_allocation(tmp_path, doc, expected):
    _coco_dir(tmp_path, json.dumps(doc))
    ds = build_dataset(DatasetConfig(name="coco", root=str(tmp_path)))
    with pytest.raises(ImageError, match=expected) as err:
        ds.load_mask("7")
    assert err.value.path and err.value.path.endswith("000000000007.jpg")
    _coco_dir(tmp_path, json.dumps(_coco_doc()))  # the same file with sane sizes paints its mask
    assert build_dataset(DatasetConfig(name="coco", root=str(tmp_path))).load_mask("7")[7, 7] == 1


# ----------------------------------------------------------------------------- errors naming the file


@pytest.mark.parametrize("case", ["pickle key", "pickle name", "pickle protocol 0", "text class"])
def test_split_lists_with_huge_integers_name_the_file(tmp_path, case):
    big = 10**5000 if case != "text class" else None
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        if case == "pickle key":
            path, data = tmp_path / "fold0.pkl", pickle.dumps({big: ["a.jpg"]}, protocol=4)
        elif case == "pickle name":
            path, data = tmp_path / "fold0.pkl", pickle.dumps({0: [big]}, protocol=4)
        elif case == "pickle protocol 0":
            path, data = tmp_path / "fold0.pkl", pickle.dumps({big: ["a.jpg"]}, protocol=0)
        else:
            path, data = tmp_path / "fold0.txt", ("2007_000033__" + "9" * 900 + "\n").encode()
    finally:
        sys.set_int_max_str_digits(old)
    path.write_bytes(data)
    with pytest.raises(ValueError) as err:
        read_split_list(path, "coco-20i" if path.suffix == ".pkl" else "pascal-5i")
    line = str(err.value)
    assert str(path) in line and len(line) < 400 and "set_int_max_str_digits" not in line


def test_a_wrong_shape_cache_file_is_named_and_recomputed(tmp_path, caplog):
    model = SimpleNamespace(
        patch_size=4,
        head=SimpleNamespace(inp=[torch.nn.Conv2d(5, 1, 1)]),
        encode=lambda x: torch.ones(x.shape[0], 5, x.shape[-2] // 4, x.shape[-1] // 4),
    )
    cache = FeatureCache(tmp_path, {"format": 1})
    np.save(cache.path("v0"), np.zeros((7, 2, 2), np.float16))  # another backbone's width
    cache.path("v1").write_bytes(
        b"\x93NUMPY\x01\x00v\x00{'descr': '<f2', 'fortran_order': False, 'shape': (9999999999,), }"
    )
    with caplog.at_level(logging.WARNING):
        tokens = cache.tokens(model, torch.zeros(2, 3, 8, 12), ["v0", "v1"])
    assert tokens.shape == (2, 5, 2, 3) and bool((tokens == 1).all())
    assert str(cache.path("v0")) in caplog.text and "recomputing" in caplog.text
    assert np.load(cache.path("v0")).shape == (5, 2, 3)  # rewritten


def test_a_non_numeric_residual_tol_is_one_line_naming_the_store(tmp_path):
    ids = ["a", "b"]
    manifest = build_manifest(
        dataset={"name": "toy", "split": "val", "root": "/nowhere", "num_images": 2, "ids_sha256": "x"},
        extractor={"name": "color", "weights_sha256": None, "facet": "key", "device": "cpu"},
        graph={"k": 10, "threshold": 0.0},
        solver={"solver": "eigsh", "num_eigs": 4, "residual_tol": "tight"},
        num_eigs=4,
        layout={"shard_size": 2, "max_grid": [6, 7], "eigvecs_dtype": "float16"},
    )
    out = tmp_path / "s.zarr"
    with StoreWriter.open(out, ids=ids, manifest=manifest):
        pass
    report = verify(str(out))
    assert not report.ok
    assert any(str(out) in line and "residual_tol" in line for line in report.unreadable), report.lines()


def test_clip_weights_open_clip_would_load_are_bounded_first(tmp_path):
    bomb = tmp_path / "clip.pt"
    bomb.write_bytes(torch_bomb(64 << 20))
    with pytest.raises(TorchFileError, match=rf"refusing CLIP weights {bomb}: .*decompression bomb"):
        create_clip(ModelConfig(arch="sazs-tiny", clip_weights=str(bomb)))


def test_json_depth_is_linear_and_skips_strings():
    assert json_depth(b'{"a": "[[[\\"{", "b": [[1], {"c": []}], "d\\\\": "]"}') == 4
    assert json_depth(b"[" * 100_000) == 100_000 and json_depth(b"") == 0
    data = b'"\\' * (1 << 20)  # 2 MiB of escaped quotes: a regular expression over strings takes hours
    start = time.perf_counter()
    assert json_depth(data) == 0
    assert time.perf_counter() - start < 20


def test_the_weights_a_checkpoint_was_trained_with_come_from_the_command_line(tmp_path, capsys):
    voc = make_voc(tmp_path / "voc", num_train=4, num_val=2, size=(56, 72), seed=3)
    weights, other = tmp_path / "tiny.pt", tmp_path / "other.pt"
    for seed, path in ((1, weights), (2, other)):
        torch.manual_seed(seed)
        torch.save(open_clip.CLIP(**TINY_ARCHS["sazs-tiny"]).state_dict(), path)
    argv = train_argv(voc, tmp_path / "run")
    argv[argv.index("--steps") + 1] = "1"
    assert train_cli.main([*argv, "--clip-weights", str(weights)]) == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="trained with --clip-weights 'tiny.pt': pass that file again"):
        load_for_inference(ckpt, "cpu")
    with pytest.raises(CheckpointError, match="trained with weights of SHA-256"):
        load_for_inference(ckpt, "cpu", {"clip_weights": str(other)})
    model, _, _ = load_for_inference(ckpt, "cpu", {"clip_weights": str(weights)})
    assert not model.random_weights
    image = next((voc / "JPEGImages").glob("*.jpg"))
    capsys.readouterr()
    predict = ["predict", str(image), "--classes", "cat", "--ckpt", str(ckpt), "--out", str(tmp_path / "pred")]
    assert eval_cli.main([*predict, "--clip-weights", str(weights)]) == 0, capsys.readouterr().err


def test_vit_weights_are_bounded_too(tmp_path):
    bomb = tmp_path / "dino_deitsmall16_pretrain.pth"
    bomb.write_bytes(torch_bomb(64 << 20))
    with pytest.raises(ValueError, match=rf"refusing {bomb}: .*decompression bomb"):
        load_official_vit("dino-vits16", str(bomb))
