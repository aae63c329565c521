"""Running the priors pipeline over a dataset and writing a prior store.

The stages (extract → kNN graph → eigenvectors) are pure functions in their own
modules; this module is the edge where datasets are read, devices used and the store
written. Work is done shard by shard (a shard is the unit a writer owns), so an
interrupted job loses at most the shard in flight and a re-run resumes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sazs.stores.faults import fault_point
from sazs.stores.manifest import build_manifest
from sazs.stores.preview import draw_priors
from sazs.stores.reader import open_store
from sazs.stores.writer import ImageResult, StoreWriter

from .datasets import Dataset, ImageError
from .extractors import Extractor
from .graph import GraphConfig, build_knn_graph, patch_colors
from .spectral import SolverError, SpectralConfig, laplacian_eigs

log = logging.getLogger(__name__)

# Per-image failures that are recorded in the store instead of stopping the job: bad
# images, and numerical trouble in the graph or the solver for one image.
RECORDED_ERRORS = (ImageError, SolverError, ValueError, FloatingPointError, np.linalg.LinAlgError)


@dataclass(frozen=True)
class JobConfig:
    out: str
    shard_size: int = 64
    overwrite: bool = False
    retry_failed: bool = False
    progress: bool = True
    preview: int = 4  # images drawn in the preview PNG (0 = no preview)
    take_over_lock: bool = False  # remove another writer's (stale) lock instead of refusing
    # (i, n): compute only part i of n contiguous ranges of shards, so that several machines
    # or teams can each fill their own store and `sazs-store merge` combines them.
    part: tuple[int, int] | None = None


def parse_part(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4); parts are numbered from 0."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part must look like I/N (e.g. 0/2), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--part {text}: need 0 <= I < N")
    return i, n


def shards_of_part(num_shards: int, part: tuple[int, int] | None) -> range:
    """Contiguous range of shard indices of part (i, n)."""
    if part is None:
        return range(num_shards)
    i, n = part
    return range(i * num_shards // n, (i + 1) * num_shards // n)


@dataclass
class JobSummary:
    store: str
    total: int
    done: int = 0
    failed: int = 0
    pending: int = 0
    computed: int = 0
    skipped: int = 0
    not_converged: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    preview: str | None = None

    def lines(self) -> list[str]:
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"store      {self.store}",
            f"images     {self.total} total: {self.done} done, {self.failed} failed"
            + (f", {self.pending} pending" if self.pending else "")
            + f" ({self.computed} computed now at {rate:.2f} img/s, {self.skipped} already finished)",
        ]
        if self.not_converged:
            out.append(f"warning    {self.not_converged} image(s) have residuals above the solver's residual_tol")
        for id_, reason in list(self.failures.items())[:20]:
            out.append(f"failed     {id_}: {reason}")
        if len(self.failures) > 20:
            out.append(f"failed     ... and {len(self.failures) - 20} more (see the summary JSON)")
        if self.preview:
            out.append(f"preview    {self.preview}")
        return out


def side_paths(out: str | Path) -> tuple[Path, Path]:
    """Preview PNG and summary JSON live next to the store: x.zarr → x.preview.png, x.summary.json."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".zarr" else out
    return stem.with_name(stem.name + ".preview.png"), stem.with_name(stem.name + ".summary.json")


def compute_priors(
    images: list[np.ndarray],
    extractor: Extractor,
    graph_cfg: GraphConfig,
    spectral_cfg: SpectralConfig,
) -> list[tuple[tuple[int, int], object] | Exception]:
    """Priors for a batch of decoded images: per image (grid, Spectrum), or the recorded error."""
    features = extractor.extract(images)
    out: list = []
    for image, feats in zip(images, features):
        try:
            colors = patch_colors(image, feats.grid) if graph_cfg.color_weight > 0 else None
            graph = build_knn_graph(feats.feats, graph_cfg, grid=feats.grid, colors=colors)
            out.append((feats.grid, laplacian_eigs(graph, spectral_cfg)))
        except RECORDED_ERRORS as exc:
            out.append(exc)
    return out


def _manifest(dataset: Dataset, extractor: Extractor, graph_cfg: GraphConfig, spectral_cfg: SpectralConfig,
              shard_size: int) -> dict:
    return build_manifest(
        dataset=dataset.describe(),
        extractor=extractor.provenance(),
        graph=asdict(graph_cfg),
        solver=asdict(spectral_cfg),
        num_eigs=spectral_cfg.num_eigs,
        layout={"shard_size": shard_size, "max_grid": list(extractor.max_grid), "eigvecs_dtype": "float16"},
    )


def run_local(
    dataset: Dataset,
    extractor: Extractor,
    graph_cfg: GraphConfig,
    spectral_cfg: SpectralConfig,
    job: JobConfig,
) -> JobSummary:
    """Compute priors for every image of ``dataset`` in this process, resuming ``job.out``."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    manifest = _manifest(dataset, extractor, graph_cfg, spectral_cfg, job.shard_size)
    # The writer holds the store's lock until the block is left: on success, on an error
    # and on Ctrl-C alike (only a killed process leaves a stale lock behind).
    with StoreWriter.open(job.out, ids=list(dataset.ids), manifest=manifest, overwrite=job.overwrite,
                          take_over_lock=job.take_over_lock) as writer:
        mine = shards_of_part(writer.num_shards, job.part)
        todo = {s: v for s, v in writer.todo(retry_failed=job.retry_failed).items() if s in mine}
        num_todo = sum(len(v) for v in todo.values())
        in_part = sum(len(writer.shard_range(s)) for s in mine)
        summary = JobSummary(store=str(job.out), total=writer.num_images, skipped=in_part - num_todo)
        log.info("%d of %d images to compute (%d shards)", num_todo, writer.num_images, len(todo))
        bar = tqdm(total=num_todo, unit="img", disable=not job.progress, desc="priors", dynamic_ncols=True)
        batch = max(1, getattr(extractor.config, "batch_size", 8))
        try:
            for shard, indices in sorted(todo.items()):
                results: list[ImageResult] = []
                for lo in range(0, len(indices), batch):
                    results.extend(_compute_batch(dataset, extractor, graph_cfg, spectral_cfg,
                                                  indices[lo:lo + batch]))
                    bar.update(min(batch, len(indices) - lo))
                    bar.set_postfix(failed=sum(not r.ok for r in results) + summary.failed)
                writer.write_shard(shard, results)
                summary.computed += len(results)
                summary.failed += sum(not r.ok for r in results)
                summary.not_converged += sum(
                    r.ok and bool(np.nanmax(r.residuals) > spectral_cfg.residual_tol) for r in results
                )
                fault_point("job.after_shard")
        except KeyboardInterrupt:
            log.warning("interrupted: finished shards are saved in %s; re-run the same command to resume", job.out)
            raise
        finally:
            bar.close()
        status_counts = writer.counts()
    summary.seconds = time.perf_counter() - started
    store = open_store(job.out)
    summary.done, summary.failed, summary.pending = (status_counts[k] for k in ("done", "failed", "pending"))
    summary.failures = store.failures()
    preview_png, summary_json = side_paths(job.out)
    if job.preview > 0 and summary.done:
        summary.preview = str(write_preview(store, dataset, preview_png, count=job.preview))
    summary_json.write_text(json.dumps(asdict(summary), indent=2))
    return summary


def _compute_batch(dataset, extractor, graph_cfg, spectral_cfg, indices: list[int]) -> list[ImageResult]:
    results: dict[int, ImageResult] = {}
    images, loaded = [], []
    for i in indices:
        try:
            image = dataset.load_image(dataset.ids[i])
        except ImageError as exc:
            results[i] = ImageResult(index=i, error=str(exc))
            continue
        images.append(image)
        loaded.append(i)
    if images:
        for i, image, out in zip(loaded, images, compute_priors(images, extractor, graph_cfg, spectral_cfg)):
            size = tuple(image.shape[:2])
            if isinstance(out, Exception):
                results[i] = ImageResult(index=i, image_size=size, error=f"{type(out).__name__}: {out}")
                continue
            grid, spec = out
            h, w = grid
            vecs = np.ascontiguousarray(spec.eigvecs.T).reshape(-1, h, w)
            results[i] = ImageResult(index=i, image_size=size, grid=grid, eigvals=spec.eigvals,
                                     eigvecs=vecs, residuals=spec.residuals)
    return [results[i] for i in indices]


def write_preview(store, dataset: Dataset | None, out_png: str | Path, *, ids: list[str] | None = None,
                  count: int = 4) -> Path:
    """Draw the priors of ``ids`` (default: the first ``count`` done images) with their images."""
    ids = ids or store.done_ids()[:count]
    rows = []
    for id_ in ids:
        prior = store.get(id_)
        image = None
        if dataset is not None:
            try:
                image = dataset.load_image(id_)
            except (ImageError, KeyError) as exc:
                log.warning("preview: cannot load image %s: %s", id_, exc)
        rows.append((prior, image))
    ds = store.manifest["dataset"]
    title = f"{ds.get('name')}/{ds.get('split')} · {store.manifest['extractor'].get('name')} · K={store.manifest['num_eigs']}"
    return draw_priors(rows, out_png, title=title)
