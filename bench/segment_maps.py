"""Segment maps against the sign cells on label maps (camvid, voc): the table of docs/BENCHMARKS.md.

For every store, on every image with priors and a mask: the sign cells of v1..v4 (what
``sazs-eval priors`` calls the eigen-segments, :func:`sazs.stores.preview.segment_labels`)
and the segment maps of :mod:`sazs.segments.maps` (default :class:`SegmentConfig`), plain
and refined with the image by each refiner of ``--refine``; covering, mean best IoU,
boundary recall / precision, segments per image and ms per image (the process's CPU time
making the segment map, with its refinement; run with OMP_NUM_THREADS=1 for one core). No
ground truth is used to make any segment.

    OMP_NUM_THREADS=1 python bench/segment_maps.py /tmp/stores/camvid-val.zarr /tmp/camvid-g0.zarr \\
        --names default,g0 --dataset camvid --data ../shared/data/camvid --split val --refine guided,bilateral
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sazs.datasets.base import DatasetConfig
from sazs.datasets.registry import build_dataset
from sazs.quality.quality import score_image
from sazs.quality.segment_scores import score_labels
from sazs.segments.maps import SegmentConfig, segment_pixels
from sazs.stores.preview import segment_labels
from sazs.stores.reader import open_store

KEYS = ("covering", "mean_best_iou", "boundary_recall", "boundary_precision")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--names", default=None, help="comma-separated, one per store")
    ap.add_argument("--dataset", required=True, choices=["camvid", "voc"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default=None)
    ap.add_argument("--refine", default="", help="comma-separated refiners for the segment maps")
    ap.add_argument("--num-segments", type=int, default=SegmentConfig.num_segments)
    ap.add_argument("--num-vectors", type=int, default=SegmentConfig.num_vectors)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = args.names.split(",") if args.names else args.stores
    cfg = SegmentConfig(num_segments=args.num_segments, num_vectors=args.num_vectors)
    dataset = build_dataset(DatasetConfig(name=args.dataset, root=args.data, split=args.split))
    refiners = [r for r in args.refine.split(",") if r]
    print(f"segment maps: {cfg}")
    head = ["store", "segments", *KEYS, "segments/img", "ms/img"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, url in zip(names, args.stores):
        store = open_store(url)
        rows: dict[str, list[list[float]]] = {}
        ms: dict[str, list[float]] = {}
        for id_ in store.done_ids():
            prior, mask = store.get(id_), dataset.load_mask(id_)
            image = dataset.load_image(id_) if refiners else None
            signs = score_image(prior.eigvecs, mask, label_map=True, n_best=4)
            count = len(np.unique(segment_labels(prior.eigvecs, 4)))  # on the grid
            rows.setdefault("sign cells of v1..v4", []).append([signs[k] for k in KEYS] + [count])
            for refine in [None, *refiners]:
                label = f"k-means{' + ' + refine if refine else ''}"
                t0 = time.process_time()
                seg = segment_pixels(prior.eigvecs, prior.eigvals, mask.shape, cfg, image=image, refine=refine)
                ms.setdefault(label, []).append(1000 * (time.process_time() - t0))
                s = score_labels(seg, mask)
                rows.setdefault(label, []).append([s[k] for k in KEYS] + [seg.max() + 1.0])
        for label, values in rows.items():
            m = np.nanmean(np.array(values, float), 0)
            t = f"{np.median(ms[label]):.0f}" if label in ms else "–"
            cells = [f"{name} ({len(values)})", label, *(f"{x:.3f}" for x in m[:4]), f"{m[4]:.1f}", t]
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
