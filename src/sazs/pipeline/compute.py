"""The priors of a shard's images, computed the same way by every executor (`priors_of_shard`).

An image goes extract (`extractors`) -> kNN graph (`graph`) -> eigenvectors (`spectral`),
and comes out as the `ImageResult` the store writer takes. Both executors (`job.run_local`
and `ray_executor.run_ray`) compute a shard with `priors_of_shard`, in the same batches, so
their stores are bitwise identical (given the same BLAS/OpenMP thread count per process:
the kNN similarities can differ in the last bit across thread counts). `compute_priors`
is the same computation for a list of decoded images (the evaluator's on-the-fly priors);
Ray's CPU solve tasks use its two halves, `extract_features` and `solve_features`.

A bad image, or numerical trouble in its graph or solver (`RECORDED_ERRORS`), fails that
image alone: the error is recorded in the store and its batch-mates are computed again
one by one. `resolve_auto` picks the graph backend and solver for "auto", once per job.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from sazs.datasets.images import ImageError
from sazs.features.extractors import Extractor
from sazs.features.types import Features
from sazs.stores.writer import ImageResult

from .ell import ell_from_graphs
from .graph import GraphConfig, build_graph, build_knn_graphs, patch_colors
from .spectral import SolverError, SpectralConfig, laplacian_eigs, laplacian_eigs_batch
from .types import Spectrum

log = logging.getLogger(__name__)

# Per-image failures that are recorded in the store instead of stopping the job: bad
# images, and numerical trouble in the graph or the solver for one image.
RECORDED_ERRORS = (ImageError, SolverError, ValueError, FloatingPointError, np.linalg.LinAlgError)
# Images per batched eigensolve (solver "batched"): GPU throughput is flat from ~256 on,
# and memory grows with it (about 10 MB per image at N = 3,600).
SOLVE_BATCH = 256


def on_gpu(extractor: Extractor) -> bool:
    return getattr(getattr(extractor, "device", None), "type", "cpu") == "cuda"


def gpu_solver_available() -> bool:
    """CuPy installed and seeing a CUDA device (what the batched solver needs on a GPU)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except (ImportError, RuntimeError):  # not installed, or no driver/device (CUDARuntimeError)
        return False


def resolve_auto(
    graph_cfg: GraphConfig, spectral_cfg: SpectralConfig, *, gpu: bool, cupy: bool | None = None
) -> tuple[GraphConfig, SpectralConfig]:
    """Pick the path for "auto" graph backend / solver, once per job.

    gpu: the features are computed on a CUDA device. Then the GPU fast path: backend
    "batched" (all of a shard's kNN graphs in one call on the GPU) and solver "batched"
    (their spectra in one CuPy call), if CuPy is installed; otherwise "eigsh" on the
    CPU. Without a GPU: "certified" kNN and "eigsh", the fastest CPU path.
    """
    backend, solver = graph_cfg.backend, spectral_cfg.solver
    if backend == "auto":
        backend = "batched" if gpu else "certified"
    if solver == "auto":
        cupy = gpu_solver_available() if cupy is None and gpu else cupy
        solver = "batched" if gpu and cupy else "eigsh"
        if gpu and not cupy:
            log.warning(
                "GPU found but CuPy is missing: eigenvectors are solved per image on the CPU "
                "(pip install cupy-cuda12x for the GPU fast path)"
            )
    if (backend, solver) != (graph_cfg.backend, spectral_cfg.solver):
        log.info("path: graph backend %s, solver %s (%s)", backend, solver, "GPU" if gpu else "CPU")
    return replace(graph_cfg, backend=backend), replace(spectral_cfg, solver=solver)


def load_one(load: Callable[[int], np.ndarray], i: int) -> np.ndarray | ImageResult:
    """A decoded image, or the failed ImageResult of an image that cannot be used."""
    try:
        return load(i)
    except ImageError as exc:
        return ImageResult(index=i, error=str(exc))


def load_images(load: Callable[[int], np.ndarray], indices: list[int]) -> dict[int, np.ndarray | ImageResult]:
    """Decoded image per index, or the failed ImageResult of an image that cannot be used."""
    return {i: load_one(load, i) for i in indices}


def batches(indices: list[int], size: int) -> list[list[int]]:
    """The extractor batches of a shard. Every executor uses these same slices: batch
    composition can change the last bits of a model's output."""
    size = max(1, size)
    return [indices[lo : lo + size] for lo in range(0, len(indices), size)]


def extract_features(images: list[np.ndarray], extractor: Extractor, *, on_device: bool = False) -> list:
    """Features per image, or the recorded error: one bad input must not fail its
    batch-mates, so a failed batch is extracted again one image at a time."""
    try:
        return extractor.extract(images, on_device=on_device)
    except RECORDED_ERRORS as exc:
        if len(images) == 1:
            return [exc]
        return [extract_features([image], extractor, on_device=on_device)[0] for image in images]


def _solve_one(image: np.ndarray | None, feats: Features, graph_cfg: GraphConfig, spectral_cfg: SpectralConfig):
    """Graph + spectrum of one image from its features: (grid, Spectrum), or the recorded error."""
    try:
        colors = patch_colors(image, feats.grid) if graph_cfg.color_weight > 0 else None
        graph = build_graph(_host(feats.feats), graph_cfg, grid=feats.grid, colors=colors)
        return feats.grid, laplacian_eigs(graph, spectral_cfg)
    except RECORDED_ERRORS as exc:
        return exc


def _host(feats) -> np.ndarray:
    """Features as a numpy array (they stay a device tensor on the batched path)."""
    return feats.detach().float().cpu().numpy() if hasattr(feats, "detach") else np.asarray(feats)


def _solve_batch(
    items: list[tuple[np.ndarray | None, Features]], graph_cfg: GraphConfig, spectral_cfg: SpectralConfig
) -> list:
    """Graphs and spectra of many images in batched calls (solver "batched"): per image
    (grid, Spectrum) or the recorded error.

    Graph backend "batched": one padded kNN over all images on the features' device (a
    GPU extractor's features never leave the GPU), then one batched eigensolve there.
    Other backends (or the colour term, which is built per image) build each graph on
    the CPU and only the solve is batched. A recorded error anywhere in the batch falls
    back to image by image, so one bad image never fails its batch-mates; running out of
    (GPU) memory splits the batch in halves until it fits.
    """
    try:
        if graph_cfg.builds_in_batch:
            ell = build_knn_graphs([f.feats for _, f in items], graph_cfg, grids=[f.grid for _, f in items])
        else:
            graphs = [
                build_graph(
                    _host(f.feats),
                    graph_cfg,
                    grid=f.grid,
                    colors=patch_colors(image, f.grid) if graph_cfg.color_weight > 0 else None,
                )
                for image, f in items
            ]
            ell = ell_from_graphs(graphs)
        spectra = laplacian_eigs_batch(ell, spectral_cfg)
        return [(f.grid, spec) for (_, f), spec in zip(items, spectra)]
    except RECORDED_ERRORS as exc:
        if len(items) == 1:
            return [exc]
        log.info("batched solve failed (%s: %s); solving its %d images one by one", type(exc).__name__, exc, len(items))
        return [_solve_batch([item], graph_cfg, spectral_cfg)[0] for item in items]
    except (MemoryError, RuntimeError) as exc:  # torch's OutOfMemoryError is a RuntimeError
        if not _out_of_memory(exc):
            raise
        if len(items) == 1:
            return [exc]
        half = len(items) // 2
        log.warning(
            "out of memory solving %d images at once (%s); splitting the batch in two", len(items), type(exc).__name__
        )
        _release_device_memory()
        return _solve_batch(items[:half], graph_cfg, spectral_cfg) + _solve_batch(items[half:], graph_cfg, spectral_cfg)


def _out_of_memory(exc: BaseException) -> bool:
    """Host or device out of memory: MemoryError (numpy, CuPy's OutOfMemoryError) or torch's."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def _release_device_memory() -> None:
    """Give cached GPU blocks back before a retry with smaller batches (no-op without a GPU)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()


def solve_features(
    items: list[tuple[np.ndarray | None, Features]], graph_cfg: GraphConfig, spectral_cfg: SpectralConfig
) -> list:
    """Graph + spectrum per (image, features) pair, in order: one by one, or with the
    batched solver in batches of up to SOLVE_BATCH images of similar size (less padding)."""
    if spectral_cfg.solver != "batched":
        return [_solve_one(image, f, graph_cfg, spectral_cfg) for image, f in items]
    order = sorted(range(len(items)), key=lambda j: (items[j][1].feats.shape[0], j))
    out: list = [None] * len(items)
    for lo in range(0, len(order), SOLVE_BATCH):
        group = order[lo : lo + SOLVE_BATCH]
        for j, result in zip(group, _solve_batch([items[j] for j in group], graph_cfg, spectral_cfg)):
            out[j] = result
    return out


def compute_priors(
    images: list[np.ndarray],
    extractor: Extractor,
    graph_cfg: GraphConfig,
    spectral_cfg: SpectralConfig,
) -> list[tuple[tuple[int, int], Spectrum] | Exception]:
    """Priors for a batch of decoded images: per image (grid, Spectrum), or the recorded error."""
    graph_cfg, spectral_cfg = resolve_auto(graph_cfg, spectral_cfg, gpu=on_gpu(extractor))
    on_device = spectral_cfg.solver == "batched"
    features = extract_features(images, extractor, on_device=on_device)
    ok = [j for j, f in enumerate(features) if not isinstance(f, Exception)]
    solved = dict(zip(ok, solve_features([(images[j], features[j]) for j in ok], graph_cfg, spectral_cfg)))
    return [solved.get(j, f) for j, f in enumerate(features)]


def to_result(index: int, image_size: tuple[int, int], out) -> ImageResult:
    """An image's ImageResult from its (grid, Spectrum), or from its recorded error."""
    if isinstance(out, Exception):
        return ImageResult(index=index, image_size=image_size, error=f"{type(out).__name__}: {out}")
    grid, spec = out
    h, w = grid
    vecs = np.ascontiguousarray(spec.eigvecs.T).reshape(-1, h, w)
    return ImageResult(
        index=index, image_size=image_size, grid=grid, eigvals=spec.eigvals, eigvecs=vecs, residuals=spec.residuals
    )


def priors_of_shard(
    loaded: dict,
    indices: list[int],
    extractor: Extractor,
    graph_cfg: GraphConfig,
    spectral_cfg: SpectralConfig,
    *,
    batch: int,
    progress: Callable[[int], None] | None = None,
) -> list[ImageResult]:
    """ImageResults of a shard whose images ``load_images`` decoded, in ``indices`` order.

    Both executors compute a shard with this function, so they form the same batches.
    Per-image solvers: extractor batch by extractor batch (``compute_priors``), as the
    images come. The batched solver: the whole shard goes to the extractor at once (it
    groups equal-sized images into batches of its batch_size, so a GPU gets full batches
    on mixed-size datasets too), the features stay on its device, and the shard's graphs
    and spectra are solved together. ``progress(n)`` is called as images are finished.
    """
    outs: dict[int, object] = {}
    if spectral_cfg.solver != "batched":
        for chunk in batches(indices, batch):
            ok = [i for i in chunk if isinstance(loaded[i], np.ndarray)]
            outs.update(
                zip(ok, compute_priors([loaded[i] for i in ok], extractor, graph_cfg, spectral_cfg) if ok else [])
            )
            if progress:
                progress(len(chunk))
    else:
        ok = [i for i in indices if isinstance(loaded[i], np.ndarray)]
        feats = dict(zip(ok, extract_features([loaded[i] for i in ok], extractor, on_device=True) if ok else []))
        outs.update((i, f) for i, f in feats.items() if isinstance(f, Exception))
        good = [i for i in ok if not isinstance(feats[i], Exception)]
        outs.update(zip(good, solve_features([(loaded[i], feats[i]) for i in good], graph_cfg, spectral_cfg)))
        if progress:
            progress(len(indices))
    return [to_result(i, tuple(loaded[i].shape[:2]), outs[i]) if i in outs else loaded[i] for i in indices]
