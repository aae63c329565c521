"""Running the priors pipeline over a dataset and writing a prior store.

The stages (extract → kNN graph → eigenvectors) are pure functions in their own
modules, put together per shard in `compute`; this module is the edge where datasets
are read and the store written. Work is done shard by shard (a shard is the unit a
writer owns), so an interrupted job loses at most the shards in flight and a re-run
resumes.

Two executors share everything here but the loop that hands out shards: ``run_local``
(this process) and ``ray_executor.run_ray`` (Ray actors). Both compute a shard with
``compute.priors_of_shard`` in the same batches, so their stores are bitwise identical
(given the same BLAS/OpenMP thread count per process: Ray gives each actor one thread
per CPU it holds); both drive the store through ``JobRun``, which owns the writer (and
its lock), the progress bar, the JSON-lines progress log next to the store and the
final summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sazs.core.faults import fault_point
from sazs.datasets.base import Dataset
from sazs.datasets.images import ImageError
from sazs.features.extractors import Extractor
from sazs.stores.manifest import build_manifest
from sazs.stores.preview import draw_priors
from sazs.stores.reader import open_store
from sazs.stores.writer import ImageResult, StoreWriter

from .compute import load_one, on_gpu, priors_of_shard, resolve_auto
from .graph import GraphConfig
from .spectral import SpectralConfig

log = logging.getLogger(__name__)


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
    # run_local: threads decoding images one shard ahead of the compute (plus a writer thread
    # writing the previous shard); 0 = both inline; None = 4 with a GPU extractor, else 0.
    decode_workers: int | None = None

    def __post_init__(self) -> None:
        # Checked before the store is created, so that a bad value leaves nothing behind.
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.preview < 0 or (self.decode_workers is not None and self.decode_workers < 0):
            raise ValueError(f"preview and decode_workers must be >= 0, got {self.preview} and {self.decode_workers}")


def write_text(path: Path, text: str) -> None:
    """``path.write_text``, with the path in the OSError of a failed write as well as of a
    failed open (a full disk fails the write, whose OSError names no file)."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


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
    executor: str = "local"
    retries: int = 0  # shards recomputed after a worker, actor or node was lost (ray)

    def lines(self) -> list[str]:
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"store      {self.store}",
            f"images     {self.total} total: {self.done} done, {self.failed} failed"
            + (f", {self.pending} pending" if self.pending else "")
            + f" ({self.computed} computed now at {rate:.2f} img/s, {self.skipped} already finished)",
        ]
        if self.retries:
            out.append(f"retries    {self.retries} shard(s) recomputed after a lost worker (see the progress log)")
        if self.not_converged:
            out.append(f"warning    {self.not_converged} image(s) have residuals above the solver's residual_tol")
        for id_, reason in list(self.failures.items())[:20]:
            out.append(f"failed     {id_}: {reason}")
        if len(self.failures) > 20:
            out.append(f"failed     ... and {len(self.failures) - 20} more (see the summary JSON)")
        if self.preview:
            out.append(f"preview    {self.preview}")
        return out


def _side_path(out: str | Path, suffix: str) -> Path:
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".zarr" else out
    return stem.with_name(stem.name + suffix)


def side_paths(out: str | Path) -> tuple[Path, Path]:
    """Preview PNG and summary JSON live next to the store: x.zarr → x.preview.png, x.summary.json."""
    return _side_path(out, ".preview.png"), _side_path(out, ".summary.json")


def progress_path(out: str | Path) -> Path:
    """The JSON-lines progress log next to the store: x.zarr → x.progress.jsonl (appended to by every run)."""
    return _side_path(out, ".progress.jsonl")


def make_manifest(
    dataset: Dataset,
    extractor_provenance: dict,
    max_grid: tuple[int, int],
    graph_cfg: GraphConfig,
    spectral_cfg: SpectralConfig,
    shard_size: int,
) -> dict:
    if "auto" in (graph_cfg.backend, spectral_cfg.solver):
        raise ValueError("resolve the 'auto' graph backend / solver (compute.resolve_auto) before writing a manifest")
    return build_manifest(
        dataset=dataset.describe(),
        extractor=extractor_provenance,
        graph=graph_cfg.describe(),  # new settings at their old behaviour left out: old fingerprints hold
        solver=asdict(spectral_cfg),
        num_eigs=spectral_cfg.num_eigs,
        layout={"shard_size": shard_size, "max_grid": list(max_grid), "eigvecs_dtype": "float16"},
    )


# ----------------------------------------------------------------------------- the driver's side


class ProgressLog:
    """JSON lines next to the store, one per event: start, shard, retry, ..., end.

    Appended to (a resumed job adds its own start..end), flushed per line so that a
    watcher (or a post-mortem after a kill) sees every finished shard.
    """

    def __init__(self, path: Path):
        self.path = path
        self.started = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, event: str, **fields) -> None:
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": event,
            "elapsed_s": round(time.perf_counter() - self.started, 3),
            **fields,
        }
        try:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()
        except OSError as exc:  # a full disk: name the file (the write's own error names none)
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc

    def close(self) -> None:
        self._file.close()


class JobRun:
    """The driver's side of one job: the store writer (which holds the store's lock), the
    shards to do, the progress bar and log, and the summary. Use it as a context manager;
    the executor calls ``record`` for every finished shard, then ``finish`` after the block.
    """

    def __init__(
        self,
        dataset: Dataset,
        manifest: dict,
        job: JobConfig,
        spectral_cfg: SpectralConfig,
        *,
        executor: str = "local",
        **start_info,
    ):
        self.dataset, self.manifest, self.job, self.spectral_cfg = dataset, manifest, job, spectral_cfg
        self.executor, self.start_info = executor, start_info
        self.started = time.perf_counter()

    def __enter__(self) -> JobRun:
        job = self.job
        # The writer holds the store's lock until the block is left: on success, on an error
        # and on Ctrl-C alike (only a killed process leaves a stale lock behind).
        self.writer = StoreWriter.open(
            job.out,
            ids=list(self.dataset.ids),
            manifest=self.manifest,
            overwrite=job.overwrite,
            take_over_lock=job.take_over_lock,
        )
        try:
            mine = shards_of_part(self.writer.num_shards, job.part)
            self.todo = {s: v for s, v in self.writer.todo(retry_failed=job.retry_failed).items() if s in mine}
            self.num_todo = sum(len(v) for v in self.todo.values())
            in_part = sum(len(self.writer.shard_range(s)) for s in mine)
            self.summary = JobSummary(
                store=str(job.out),
                total=self.writer.num_images,
                skipped=in_part - self.num_todo,
                executor=self.executor,
            )
            log.info("%d of %d images to compute (%d shards)", self.num_todo, self.writer.num_images, len(self.todo))
            self.progress = ProgressLog(progress_path(job.out))
            self.progress.write(
                "start",
                executor=self.executor,
                total=self.writer.num_images,
                images_todo=self.num_todo,
                shards_todo=len(self.todo),
                **self.start_info,
            )
            self.bar = tqdm(
                total=self.num_todo, unit="img", disable=not job.progress, desc="priors", dynamic_ncols=True
            )
        except BaseException:
            self.writer.close()
            raise
        return self

    def record(self, shard: int, results: list[ImageResult], *, advance: bool = True, **info) -> None:
        """Write a finished shard, then count it in the summary, the bar and the progress log."""
        self.writer.write_shard(shard, results)
        s = self.summary
        failures = sum(not r.ok for r in results)
        s.computed += len(results)
        s.failed += failures
        s.not_converged += sum(r.ok and bool(np.nanmax(r.residuals) > self.spectral_cfg.residual_tol) for r in results)
        if advance:
            self.bar.update(len(results))
        self.bar.set_postfix(failed=s.failed, refresh=False)
        elapsed = time.perf_counter() - self.started
        self.progress.write(
            "shard",
            shard=shard,
            images=len(results),
            failures=failures,
            done=s.computed,
            todo=self.num_todo,
            rate=round(s.computed / elapsed, 3) if elapsed > 0 else None,
            **info,
        )
        fault_point("job.after_shard")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.bar.close()
            if exc_type is KeyboardInterrupt:
                log.warning(
                    "interrupted: finished shards are saved in %s; re-run the same command to resume", self.job.out
                )
            if exc_type is not None:
                # Best effort: on a full disk this line cannot be written either, and its error
                # must not hide the one that stopped the job.
                with contextlib.suppress(OSError):
                    self.progress.write("stopped", error=f"{exc_type.__name__}: {exc}", done=self.summary.computed)
            self.counts = self.writer.counts()
        finally:
            if exc_type is not None:
                with contextlib.suppress(OSError):
                    self.progress.close()
            self.writer.close()

    def finish(self) -> JobSummary:
        """After the block: counts, failures, preview and summary JSON, and the progress log's end line."""
        s, job = self.summary, self.job
        s.seconds = time.perf_counter() - self.started
        store = open_store(job.out)
        s.done, s.failed, s.pending = (self.counts[k] for k in ("done", "failed", "pending"))
        s.failures = store.failures()
        preview_png, summary_json = side_paths(job.out)
        if job.preview > 0 and s.done:
            s.preview = str(write_preview(store, self.dataset, preview_png, count=job.preview))
        write_text(summary_json, json.dumps(asdict(s), indent=2))
        self.progress.write(
            "end",
            computed=s.computed,
            failed=s.failed,
            done=s.done,
            pending=s.pending,
            retries=s.retries,
            seconds=round(s.seconds, 3),
            rate=round(s.computed / s.seconds, 3) if s.seconds > 0 else None,
        )
        self.progress.close()
        return s


class _Inline:
    """The part of ThreadPoolExecutor that run_local uses, running each call at once (its
    errors are raised at once too)."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def run_local(
    dataset: Dataset,
    extractor: Extractor,
    graph_cfg: GraphConfig,
    spectral_cfg: SpectralConfig,
    job: JobConfig,
) -> JobSummary:
    """Compute priors for every image of ``dataset`` in this process, resuming ``job.out``."""
    graph_cfg, spectral_cfg = resolve_auto(graph_cfg, spectral_cfg, gpu=on_gpu(extractor))
    manifest = make_manifest(
        dataset, extractor.provenance(), extractor.max_grid, graph_cfg, spectral_cfg, job.shard_size
    )
    batch = max(1, getattr(extractor.config, "batch_size", 8))
    load = lambda i: dataset.load_image(dataset.ids[i])  # noqa: E731
    # With a GPU extractor, two helpers keep the GPU busy: decoding runs in worker threads
    # one shard ahead (PIL releases the GIL), and each finished shard is written by a
    # writer thread while the next one is computed. Shards are still written one at a time
    # and in order, and a shard that was computed is always written, also on Ctrl-C. On a
    # CPU the compute already uses every core, and helper threads would only compete with
    # it (measured: bench/cpu_path.py), so there both run inline.
    # job.decode_workers overrides the choice (0: inline).
    workers = job.decode_workers if job.decode_workers is not None else (4 if on_gpu(extractor) else 0)
    if workers > 0:
        decoders = ThreadPoolExecutor(workers, thread_name_prefix="sazs-decode")
        writes = ThreadPoolExecutor(1, thread_name_prefix="sazs-write")
    else:
        decoders = writes = _Inline()
    try:
        with JobRun(dataset, manifest, job, spectral_cfg, executor="local") as run:
            shards = sorted(run.todo.items())
            decode = lambda indices: {i: decoders.submit(load_one, load, i) for i in indices}  # noqa: E731
            ahead = decode(shards[0][1]) if shards else {}
            writing = None
            try:
                for n, (shard, indices) in enumerate(shards):
                    t0 = time.perf_counter()
                    loaded = {i: f.result() for i, f in ahead.items()}
                    ahead = decode(shards[n + 1][1]) if n + 1 < len(shards) else {}
                    results = priors_of_shard(
                        loaded, indices, extractor, graph_cfg, spectral_cfg, batch=batch, progress=run.bar.update
                    )
                    if writing is not None:
                        writing.result()  # the previous shard's write, and its errors
                    writing = writes.submit(
                        run.record, shard, results, advance=False, seconds=round(time.perf_counter() - t0, 3)
                    )
            finally:
                if writing is not None:
                    writing.result()
    finally:
        decoders.shutdown(wait=True, cancel_futures=True)
        writes.shutdown(wait=True)
    return run.finish()


def write_preview(
    store, dataset: Dataset | None, out_png: str | Path, *, ids: list[str] | None = None, count: int = 4
) -> Path:
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
    extractor = store.manifest["extractor"].get("name")
    title = f"{ds.get('name')}/{ds.get('split')} · {extractor} · K={store.manifest['num_eigs']}"
    return draw_priors(rows, out_png, title=title)
