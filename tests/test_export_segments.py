"""sazs-store export --format segments: one PNG per image, of the image's size, the right labels."""

import numpy as np
from PIL import Image
from test_segments_maps import _same_partition, _spectrum
from test_store_export import write_store

from sazs.segments.maps import encode_png
from sazs.stores import cli as store_cli


def test_export_segments_writes_label_pngs_at_the_image_size(tmp_path):
    truth = np.kron(np.arange(6).reshape(2, 3), np.ones((6, 6), np.int64))  # 12 x 18 grid, six blocks
    vecs, vals = _spectrum(truth)
    store = write_store(
        tmp_path / "s.zarr",
        {"seq/frame0": ((48, 72), vals, vecs), "b": ((25, 37), vals, vecs)},
        k=8,
        max_grid=(12, 18),
        failed=("c",),
    )
    out = tmp_path / "out"
    rc = store_cli.main(["export", str(store), str(out), "--format", "segments", "--num-vectors", "5", "--no-progress"])
    assert rc == 0
    a = Image.open(out / "seq" / "frame0.png")
    b = Image.open(out / "b.png")
    assert not (out / "c.png").exists()
    assert a.mode == "L" and a.size == (72, 48)
    assert b.mode == "L" and b.size == (37, 25)
    labels = np.asarray(a)
    # the six regions of the grid, at 4 x 4 pixels per cell
    assert sorted(np.unique(labels)) == list(range(6))
    assert _same_partition(labels, np.kron(truth, np.ones((4, 4), np.int64)))
    # resumable: a second run finds both files complete
    assert store_cli.main(["export", str(store), str(out), "--format", "segments", "--num-vectors", "5"]) == 0


def test_encode_png_switches_to_16_bit_above_256_segments(tmp_path):
    small = np.arange(12).reshape(3, 4)
    big = np.arange(600).reshape(20, 30)
    for labels, mode in ((small, "L"), (big, "I;16")):
        path = tmp_path / f"{mode.replace(';', '')}.png"
        path.write_bytes(encode_png(labels))
        img = Image.open(path)
        assert img.mode == mode and img.size == labels.shape[::-1]
        np.testing.assert_array_equal(np.asarray(img), labels)


def test_export_segments_refined_with_the_images_follows_their_edges(tmp_path):
    truth = np.kron(np.arange(6).reshape(2, 3), np.ones((6, 6), np.int64))  # 12 x 18 grid, 4 px cells
    vecs, vals = _spectrum(truth)
    store = write_store(tmp_path / "s.zarr", {"a": ((48, 72), vals, vecs)}, k=8, max_grid=(12, 18))
    # the image's blocks are 2 px below and right of the grid's borders (rows 26, columns 26 and 50)
    shifted = np.zeros((48, 72), np.int64)
    shifted[26:] += 3
    shifted[:, 26:] += 1
    shifted[:, 50:] += 1
    palette = np.array([[20, 20, 20], [220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40], [200, 200, 200]])
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(palette[shifted].astype(np.uint8)).save(images / "a.png")
    plain, refined = tmp_path / "plain", tmp_path / "refined"
    common = ["--format", "segments", "--num-vectors", "5", "--no-progress"]
    assert store_cli.main(["export", str(store), str(plain), *common]) == 0
    argv = ["export", str(store), str(refined), *common, "--refine", "guided", "--images", str(images)]
    assert store_cli.main(argv) == 0

    def agreement(path):
        labels = np.asarray(Image.open(path))
        assert labels.shape == (48, 72) and len(np.unique(labels)) == 6
        # each segment's majority image block, then the share of pixels in their block
        hits = sum(np.bincount(shifted[labels == s]).max() for s in np.unique(labels))
        return hits / labels.size

    assert agreement(plain / "a.png") < 0.95
    assert agreement(refined / "a.png") > agreement(plain / "a.png") + 0.03
