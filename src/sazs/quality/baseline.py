"""Baseline prior stores for `sazs-eval priors --baseline`: the original formulation on the same data.

:func:`compute_baseline` computes (or resumes) ``OUT/baseline-<kind>.zarr`` of a dataset with
the extractor and K of a given store, through the pipeline's own run function, so that the
baseline is scored beside the stores under test.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

from sazs.features.extractors import FACETS, ExtractorConfig, build_extractor
from sazs.pipeline.graph import GraphConfig
from sazs.pipeline.job import JobConfig, run_local
from sazs.pipeline.spectral import SpectralConfig, list_solvers

log = logging.getLogger(__name__)

BASELINES = {
    "dsm": "the original Deep Spectral Methods formulation: dense affinity max(f·fᵀ, 0), generalised "
    "shift-invert eigsh(D − W, M = D)"
}


def compute_baseline(kind: str, like, dataset, out_dir: str | Path, *, progress: bool) -> Path:
    """Compute (or resume) the baseline store ``out_dir/baseline-<kind>.zarr`` of ``dataset`` with the
    extractor and K of the store ``like``, through the pipeline's own run function."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose from {sorted(BASELINES)}")
    if "kind" not in {f.name for f in fields(GraphConfig)} or "generalized" not in list_solvers():
        raise ValueError(
            "--baseline dsm needs the pipeline's dense graph and generalized solver, which this sazs "
            "lacks; compute the baseline store with sazs-priors and pass it as another STORE"
        )
    ex = like.manifest.get("extractor", {})
    policy = ex.get("input_size_policy", {})
    weights = ex.get("weights")
    extractor = ExtractorConfig(
        name=ex.get("name", "imgfocus-vits14"),
        weights=weights if weights and Path(weights).is_file() else None,
        facet=ex["facet"] if ex.get("facet") in FACETS else "key",  # color: no facet
        short_side=policy.get("short_side"),
        max_long_side=policy.get("max_long_side"),
    )
    path = Path(out_dir) / f"baseline-{kind}.zarr"
    log.info("baseline %s: %s, extractor %s, K=%d -> %s", kind, BASELINES[kind], extractor.name, like.num_eigs, path)
    summary = run_local(
        dataset,
        build_extractor(extractor),
        GraphConfig(kind="dense"),
        SpectralConfig(num_eigs=like.num_eigs, solver="generalized"),
        JobConfig(out=str(path), progress=progress, preview=0),
    )
    log.info("baseline %s: %d done, %d failed", kind, summary.done, summary.failed)
    return path
