"""Quality of the priors on human masks, per graph design: the table of docs/BENCHMARKS.md.

Features (ViT-S/14 keys by default) are computed once per image and cached outside the
project (--cache, default ~/.cache/sazs/priors-quality); every design then builds its
graph and spectrum from the cached features, timed (graph + solve, ms per image, one
process, the designs interleaved image by image so that they share the machine's load),
and its eigenvectors are scored by `eval.prior_quality.score_image`: on single-object
masks (davis, masks) the Deep Spectral Methods single-object protocol, best-of-4 upper
bound and span-K capture; on label maps (camvid, voc) covering, mean best-overlap IoU,
boundary recall / precision of the eigen-segments' edges and span-K mIoU.

    make bench-quality DATA=../shared/data/davis2016-dev
    python bench/priors_quality.py --data ../shared/data/davis2016-dev --step 3 --out /tmp/q.json
    python bench/priors_quality.py --data ... --designs default,dsm,"knn k=10 g=0"
    python bench/priors_quality.py --data ../shared/data/camvid --dataset camvid --split val
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 make bench-quality DATA=...   # one thread per image

A design is "dsm" (the original formulation: `--preset dsm`), "default" (this
project's defaults) or "knn k=<K> g=<global weight> r=<global rank> kernel=<affine|cosine>
color=<colour/position term weight>" (any subset).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from sazs.datasets.base import DatasetConfig
from sazs.datasets.registry import build_dataset
from sazs.features.extractors import ExtractorConfig, build_extractor
from sazs.pipeline.graph import GraphConfig, build_graph, patch_colors
from sazs.pipeline.spectral import SpectralConfig, laplacian_eigs
from sazs.quality.cli import BINARY_DATASETS
from sazs.quality.quality import score_image, summarise

DEFAULT_DESIGNS = (
    "knn k=10 g=0",  # the kNN graph alone, before the global term
    "knn k=10 g=1 kernel=affine",  # the previous default
    "default",  # kNN k = 10 + cosine global term, g = 0.3
    "dsm",  # the original formulation
)
METRICS = {
    False: ("fiedler_iou", "fiedler_accuracy", "fiedler_max_fbeta", "best_of_n_iou_upper_bound", "span_iou"),
    True: ("covering", "mean_best_iou", "boundary_recall", "boundary_precision", "span_miou"),
}
HEADERS = {
    False: ("Fiedler IoU", "Fiedler acc", "Fiedler max F-beta", "best of 4 (upper bound)", "span-K IoU"),
    True: ("covering", "mean best IoU", "boundary recall", "boundary precision", "span-K mIoU"),
}


def design_configs(name: str, num_eigs: int) -> tuple[GraphConfig, SpectralConfig]:
    if name == "dsm":
        return GraphConfig(kind="dense"), SpectralConfig(num_eigs=num_eigs, solver="generalized")
    if name == "default":
        return GraphConfig(), SpectralConfig(num_eigs=num_eigs)
    kind, *pairs = name.split()
    if kind != "knn":
        raise ValueError(f"design {name!r}: use 'dsm', 'default' or 'knn k=.. g=.. r=.. kernel=.. color=..'")
    keys = {
        "k": ("k", int),
        "g": ("global_weight", float),
        "r": ("global_rank", int),
        "kernel": ("global_kernel", str),
        "color": ("color_weight", float),
    }
    fields = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in keys:
            raise ValueError(f"design {name!r}: unknown setting {key!r}; choose from {sorted(keys)}")
        fields[keys[key][0]] = keys[key][1](value)
    return GraphConfig(**fields), SpectralConfig(num_eigs=num_eigs)


def cached_features(dataset, indices, extractor_cfg: ExtractorConfig, cache: Path) -> dict:
    """{index: (feats, grid)}, extracted once and kept in `cache` (outside the project)."""
    tag = hashlib.sha256(
        json.dumps(
            [extractor_cfg.name, extractor_cfg.facet, extractor_cfg.short_side, extractor_cfg.max_long_side],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    folder = cache / f"{dataset.name}-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    extractor, out = None, {}
    for i in indices:
        path = folder / (hashlib.sha256(dataset.ids[i].encode()).hexdigest()[:16] + ".npz")
        if not path.exists():
            extractor = extractor or build_extractor(extractor_cfg)
            f = extractor.extract([dataset.load_image(dataset.ids[i])])[0]
            np.savez(path, feats=f.feats, grid=np.asarray(f.grid))
        z = np.load(path)
        out[i] = (z["feats"], tuple(int(v) for v in z["grid"]))
    return out


def run(args) -> dict:
    dataset = build_dataset(DatasetConfig(name=args.dataset, root=args.data, split=args.split))
    indices = list(range(0, len(dataset), args.step))[: args.limit]
    ex_cfg = ExtractorConfig(name=args.extractor, facet=args.facet, device="cpu")
    feats = cached_features(dataset, indices, ex_cfg, Path(args.cache).expanduser())
    masks = {i: dataset.load_mask(dataset.ids[i]) for i in indices}
    label_map = args.dataset not in BINARY_DATASETS
    metrics = METRICS[label_map]
    names = [name.strip() for name in args.designs.split(",")]
    configs = {name: design_configs(name, args.num_eigs) for name in names}
    rows, ms, cpu_ms = ({name: [] for name in names} for _ in range(3))
    # Images outer, designs inner: every design meets the same machine load (a shared
    # machine's load drifts over a run; one design after another would time it, not them).
    needs_colors = any(graph_cfg.color_weight > 0 for graph_cfg, _ in configs.values())
    for i in indices:
        x, grid = feats[i]
        colors = patch_colors(dataset.load_image(dataset.ids[i]), grid) if needs_colors else None
        for name in names:
            graph_cfg, spectral_cfg = configs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            spectrum = laplacian_eigs(build_graph(x, graph_cfg, grid=grid, colors=colors), spectral_cfg)
            ms[name].append(1000 * (time.perf_counter() - t0))
            cpu_ms[name].append(1000 * (time.process_time() - c0))  # all threads; less sensitive to others' load
            rows[name].append(
                score_image(spectrum.eigvecs.T.reshape(-1, *grid), masks[i], n_best=4, label_map=label_map)
            )
    table = {}
    for name in names:
        graph_cfg, spectral_cfg = configs[name]
        summary = summarise(rows[name])
        table[name] = {
            **{m: summary[m] for m in metrics},
            "ms_per_image": statistics.median(ms[name]),
            "cpu_ms_per_image": statistics.median(cpu_ms[name]),
            "graph": graph_cfg.describe(),
            "solver": spectral_cfg.solver,
        }
        print(
            f"{name}: "
            + ", ".join(f"{m} {summary[m]:.3f}" for m in metrics)
            + f", {statistics.median(ms[name]):.0f} ms ({statistics.median(cpu_ms[name]):.0f} ms CPU)",
            file=sys.stderr,
            flush=True,
        )
    return {
        "data": str(args.data),
        "dataset": args.dataset,
        "images": len(indices),
        "step": args.step,
        "extractor": args.extractor,
        "facet": args.facet,
        "num_eigs": args.num_eigs,
        "label_map": label_map,
        "cpu_threads": os.cpu_count(),
        "designs": table,
    }


def markdown(result: dict) -> str:
    label_map = result["label_map"]
    lines = [
        "| design | " + " | ".join(HEADERS[label_map]) + " | graph + solve ms/img | CPU ms/img |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["designs"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r[m]:.3f}" for m in METRICS[label_map])
            + f" | {r['ms_per_image']:.0f} | {r['cpu_ms_per_image']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (e.g. ../shared/data/davis2016-dev)")
    p.add_argument("--dataset", default="davis", help="dataset reader (default davis)")
    p.add_argument("--split", default=None)
    p.add_argument("--step", type=int, default=1, help="every step-th image (3 for a quick look)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images")
    p.add_argument("--extractor", default="imgfocus-vits14")
    p.add_argument("--facet", default="key", choices=["key", "token"])
    p.add_argument("--num-eigs", type=int, default=8)
    p.add_argument("--designs", default=",".join(DEFAULT_DESIGNS), help="comma-separated designs (see above)")
    p.add_argument(
        "--cache",
        default=os.environ.get("SAZS_CACHE", "~/.cache/sazs") + "/priors-quality",
        help="feature cache folder (outside the project)",
    )
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
