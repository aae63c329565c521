"""Baselines for `sazs-eval priors --baseline`, on the same data and features as the stores under test.

* ``dsm`` — :func:`compute_baseline` computes (or resumes) ``OUT/baseline-dsm.zarr`` of a dataset
  with the extractor and K of a given store, through the pipeline's own run function (the
  original Deep Spectral Methods formulation), so that it is scored beside the stores.
* ``tokencut`` — :func:`compute_tokencut` runs TokenCut's object-mask recipe
  (:mod:`sazs.segments.tokencut`) on the features of the store's extractor, image by image, and
  keeps the patch-grid masks in ``OUT/baseline-tokencut-tau<tau>.npz`` (reused by a re-run with
  the same extractor fingerprint and tau). It yields object masks only, no eigenvectors.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sazs.datasets.images import ImageError
from sazs.features.extractors import FACETS, ExtractorConfig, build_extractor
from sazs.pipeline.graph import GraphConfig
from sazs.pipeline.job import JobConfig, run_local
from sazs.pipeline.spectral import SpectralConfig, list_solvers
from sazs.segments.tokencut import TokenCutConfig, tokencut_mask

log = logging.getLogger(__name__)

BASELINES = {
    "dsm": "the original Deep Spectral Methods formulation: dense affinity max(f·fᵀ, 0), generalised "
    "shift-invert eigsh(D − W, M = D)",
    "tokencut": "TokenCut's object masks: dense affinity binarised at tau, second generalised eigenvector "
    "split at its mean, the max-|v| seed's side and connected component",
}


def parse_baselines(text: str | None) -> list[str]:
    """'dsm,tokencut' -> ['dsm', 'tokencut'] (each known, no repeats); None or '' -> []."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)} (comma-separated)")
    return list(dict.fromkeys(names))


def extractor_like(like) -> ExtractorConfig:
    """The extractor settings of the store ``like`` (its manifest), for a baseline on the same features."""
    ex = like.manifest.get("extractor", {})
    policy = ex.get("input_size_policy", {})
    weights = ex.get("weights")
    return ExtractorConfig(
        name=ex.get("name", "imgfocus-vits14"),
        weights=weights if weights and Path(weights).is_file() else None,
        facet=ex["facet"] if ex.get("facet") in FACETS else "key",  # color: no facet
        center=bool(ex.get("center", False)),
        short_side=policy.get("short_side"),
        max_long_side=policy.get("max_long_side"),
    )


def compute_baseline(kind: str, like, dataset, out_dir: str | Path, *, progress: bool) -> Path:
    """Compute (or resume) the baseline store ``out_dir/baseline-<kind>.zarr`` of ``dataset`` with the
    extractor and K of the store ``like``, through the pipeline's own run function."""
    if kind != "dsm":
        raise ValueError(f"baseline {kind!r} is not a store; choose 'dsm' (tokencut: compute_tokencut)")
    if "kind" not in {f.name for f in fields(GraphConfig)} or "generalized" not in list_solvers():
        raise ValueError(
            "--baseline dsm needs the pipeline's dense graph and generalized solver, which this sazs "
            "lacks; compute the baseline store with sazs-priors and pass it as another STORE"
        )
    extractor = extractor_like(like)
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


@dataclass
class TokenCutResult:
    masks: dict[str, np.ndarray]  # id -> (h, w) bool on the patch grid
    failures: dict[str, str]
    mask_ms: float | None  # the recipe per image (graph, eigenvector, mask), features excluded
    path: Path


def compute_tokencut(
    like, dataset, out_dir: str | Path, *, cfg: TokenCutConfig | None = None, progress: bool = False
) -> TokenCutResult:
    """TokenCut's masks of every image of ``dataset`` from the features of the store ``like``'s extractor.

    Cached in ``out_dir/baseline-tokencut-tau<tau>.npz`` with the extractor's settings: a re-run
    with the same ones reads the masks back instead of recomputing them.
    """
    cfg = cfg or TokenCutConfig()
    extractor_cfg = extractor_like(like)
    path = Path(out_dir) / f"baseline-tokencut-tau{cfg.tau:g}.npz"
    key = json.dumps({"extractor": like.manifest.get("extractor"), "tau": cfg.tau, "eps": cfg.eps}, sort_keys=True)
    ids = list(dataset.ids)
    if path.is_file():
        with np.load(path) as z:
            if str(z["key"]) == key and set(ids) <= set(str(i) for i in z["ids"]):
                masks = {str(i): z[f"m{j}"].astype(bool) for j, i in enumerate(z["ids"])}
                log.info("baseline tokencut: %d masks read from %s", len(masks), path)
                return TokenCutResult({i: masks[i] for i in ids}, {}, float(z["mask_ms"]), path)
    extractor = build_extractor(extractor_cfg)
    masks, failures, seconds = {}, {}, 0.0
    log.info("baseline tokencut: %s, tau=%g, extractor %s -> %s", BASELINES["tokencut"], cfg.tau, extractor.name, path)
    for id_ in tqdm(ids, desc="baseline tokencut", unit="img", disable=not progress):
        try:
            feats = extractor.extract([dataset.load_image(id_)])[0]
            t0 = time.perf_counter()
            masks[id_] = tokencut_mask(np.asarray(feats.feats), feats.grid, cfg)
            seconds += time.perf_counter() - t0
        except (ImageError, ValueError) as exc:
            failures[id_] = str(exc)
    mask_ms = 1000 * seconds / len(masks) if masks else None
    if masks and not failures:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"m{j}": m for j, m in enumerate(masks.values())}
        np.savez_compressed(path, ids=np.array(list(masks)), key=np.str_(key), mask_ms=mask_ms, **arrays)
    log.info("baseline tokencut: %d done, %d failed", len(masks), len(failures))
    return TokenCutResult(masks, failures, mask_ms, path)
