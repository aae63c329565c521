"""Gain and cost of each mask refiner (sazs.segments.refine.REFINERS): the table of docs/BENCHMARKS.md.

Every image of a single-object store (davis, masks) gets a ground-truth-free coarse mask from
its eigenvectors (k-means, k = 4, on the rows of [v1..v4] on the patch grid; the cluster whose
cells make up the least of the grid's border is the object), upsampled bilinearly to the
image; each refiner then refines it with the image. Printed: mean IoU with the human mask
before and after, and the refiner's CPU milliseconds per image (median of the process's CPU
time, so that a loaded machine does not inflate it; run with OMP_NUM_THREADS=1 for one core).

    OMP_NUM_THREADS=1 python bench/refiners.py /tmp/stores/davis.zarr --dataset davis \\
        --data ../shared/data/davis2016-dev
    OMP_NUM_THREADS=1 python bench/refiners.py /tmp/stores/duts.zarr --dataset masks \\
        --data ../shared/data/duts-te-dev --step 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from sazs.datasets.base import DatasetConfig
from sazs.datasets.registry import build_dataset
from sazs.quality.quality import iou
from sazs.segments.maps import kmeans
from sazs.segments.refine import list_refiners, refine_mask, upsample_eigvecs
from sazs.stores.reader import open_store


def coarse_mask(eigvecs: np.ndarray, k: int = 4, num_vectors: int = 4) -> np.ndarray:
    """(K, h, w) -> bool (h, w): the k-means cluster of the rows of [v1..vn] least on the border."""
    _, h, w = eigvecs.shape
    x = eigvecs[1 : 1 + num_vectors].reshape(-1, h * w).T.astype(np.float64)
    labels = kmeans(x, k, seed=0).reshape(h, w)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    share = [np.mean(border == c) if (labels == c).any() else np.inf for c in range(k)]
    return labels == int(np.argmin(share))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--dataset", required=True, choices=["davis", "masks"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default=None)
    ap.add_argument("--step", type=int, default=1, help="every STEP-th image")
    ap.add_argument("--refiners", default=",".join(list_refiners()), help="comma-separated (default: all)")
    ap.add_argument("--json", default=None, help="also write the per-image numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    store = open_store(args.store)
    dataset = build_dataset(DatasetConfig(name=args.dataset, root=args.data, split=args.split))
    names = [n for n in args.refiners.split(",") if n]
    scores: dict[str, list[float]] = {n: [] for n in ["none", *names]}
    ms: dict[str, list[float]] = {n: [] for n in names}
    sizes = []
    for id_ in store.done_ids()[:: args.step]:
        prior = store.get(id_)
        image, mask = dataset.load_image(id_), dataset.load_mask(id_)
        truth = (mask != 0) & (mask != 255)
        coarse = coarse_mask(prior.eigvecs)
        soft = upsample_eigvecs(coarse[None].astype(np.float32), image.shape[:2]).numpy()[0]
        scores["none"].append(iou(soft > 0.5, truth))
        sizes.append(image.shape[:2])
        for name in names:
            t0 = time.process_time()
            refined = refine_mask(soft, image, name, grid=prior.grid)
            ms[name].append(1000 * (time.process_time() - t0))
            scores[name].append(iou(refined, truth))
    hw = np.median(np.array(sizes), 0).astype(int)
    print(f"{args.store}: {len(sizes)} images, median size {hw[0]}x{hw[1]}, coarse mask: k-means k=4 on v1..v4")
    print("| refiner | mean IoU | gain | ms/img (median) |\n|---|---|---|---|")
    base = float(np.nanmean(scores["none"]))
    print(f"| none | {base:.3f} | – | – |")
    for name in names:
        m = float(np.nanmean(scores[name]))
        print(f"| {name} | {m:.3f} | {m - base:+.3f} | {statistics.median(ms[name]):.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"iou": scores, "ms": ms}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
