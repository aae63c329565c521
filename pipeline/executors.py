"""The Ray executor: one priors job spread over the CPUs and GPUs of one machine or a cluster.

    sazs-priors run --dataset coco --data /data/coco --executor ray          # a local Ray instance
    RAY_ADDRESS=head:6379 sazs-priors run ... --executor ray                 # join a running cluster

How the work is spread (``run_ray``):

* The unit of work is one store shard. The **driver** (this process) owns the
  ``StoreWriter`` and its lock and writes every shard as its results come back, so no
  two tasks ever write one shard, the single-writer lock keeps its meaning, and the
  store may live on the driver's disk. Resuming, ``--part`` and the summary are the
  local executor's (``job.JobRun``).
* ``ShardWorker`` actors are long-lived: each builds the extractor once (one GPU per
  actor when the cluster has GPUs, one CPU otherwise). By default an actor also builds
  the graphs and solves them, where the features are; with ``solve_on="cpu-tasks"`` it
  only extracts features and a CPU task per shard (placed on the actor's node) solves.
* Images are decoded in parallel on CPU: by a task per shard on the actor's node when
  CPUs are left over beside the actors (GPU actors), else by the CPU actor itself.
* Backpressure: at most ``max_in_flight`` shards are outstanding (``ray.wait``), so the
  driver's and the object store's memory stay flat for any dataset size.
* Faults: a shard whose actor, worker or node is lost comes back as a Ray system error;
  the driver logs it, records a ``retry`` line in the progress log, replaces a dead
  actor and resubmits the shard (``max_retries`` times, then its images are recorded as
  failed). A killed driver leaves a stale lock: re-run with ``--take-over-lock``.

Every image is computed with the local executor's functions in the same batches
(``job.load_images``, ``job.priors_of_shard``, ``job.solve_features``), so a store written
through Ray is bitwise identical to one written by ``run_local`` with as many threads as
an actor has (Ray sets OMP_NUM_THREADS to the actor's CPUs, 1, unless it is set).

Ray is imported inside functions: this module (like the rest of the pipeline) imports
without it. Every node needs the same environment (``pip install -e .``) and the
dataset at the same path; the store only needs to be on the driver.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from sazs.core.faults import arm_from_environment, fault_point
from sazs.datasets.readers import Dataset, read_image
from sazs.stores.writer import ImageResult

from .extractors import ExtractorConfig, Features, build_extractor
from .graph import GraphConfig
from .job import (
    JobConfig,
    JobRun,
    JobSummary,
    batches,
    extract_features,
    load_images,
    make_manifest,
    priors_of_shard,
    resolve_auto,
    solve_features,
    to_result,
)
from .spectral import SpectralConfig

log = logging.getLogger(__name__)

SOLVE_ON = ("actor", "cpu-tasks")
# Environment variables that workers on other nodes need from the driver (a local
# instance's workers inherit them anyway): weights cache, fault injection, offline hub.
FORWARDED_ENV_PREFIXES = ("SAZS_", "HF_")
WAIT_LOG_S = 60.0  # how often a stalled driver says what it waits for


class RayJobError(RuntimeError):
    """The job cannot go on on Ray (no actor can start, all were lost, nodes disagree)."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS, else start a local instance
    num_cpus: int | None = None  # size of a local instance (None: all); ignored on a cluster
    num_gpus: int | None = None
    actors: int | None = None  # None: one per GPU; without GPUs one per CPU (cpu-tasks: half the CPUs)
    solve_on: str = "actor"  # "actor": graph + eigen-solve in the actor; "cpu-tasks": in CPU tasks
    max_in_flight: int | None = None  # shards outstanding at once (None: 2 x actors)
    max_retries: int = 3  # resubmissions of a shard after lost workers, then its images are recorded failed

    def __post_init__(self) -> None:
        if self.solve_on not in SOLVE_ON:
            raise ValueError(f"unknown --ray-solve-on {self.solve_on!r}; choose from {list(SOLVE_ON)}")
        for name in ("num_cpus", "num_gpus", "actors", "max_in_flight"):
            value = getattr(self, name)
            if value is not None and value < (0 if name in ("num_cpus", "num_gpus") else 1):
                raise ValueError(f"ray {name} must be {'>= 0' if name.startswith('num') else '>= 1'}, got {value}")
        if self.max_retries < 0:
            raise ValueError(f"ray max_retries must be >= 0, got {self.max_retries}")


# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class ShardSource:
    """What a worker needs to decode a shard's images: absolute paths (workers do not share
    the driver's working directory) and the dataset's size check. Shipping the paths, not
    the Dataset, keeps big annotation indexes (COCO) off the workers. ``load`` is what
    ``Dataset.load_image`` does: ``read_image(path, min_side, max_pixels, root=image_root)``."""

    paths: dict[int, str]
    min_side: int
    max_pixels: int
    root: str | None  # the dataset's image_root (absolute), which no path may leave; None: no check

    @classmethod
    def of(cls, dataset: Dataset, indices: list[int]) -> ShardSource:
        return cls(
            {i: os.path.abspath(dataset.image_path(dataset.ids[i])) for i in indices},
            dataset.min_side,
            dataset.max_pixels,
            dataset.image_root,
        )

    def load(self, i: int) -> np.ndarray:
        return read_image(self.paths[i], self.min_side, self.max_pixels, root=self.root)


def decode_shard(source: ShardSource, indices: list[int]) -> dict[int, np.ndarray | ImageResult]:
    """A shard's decoded images (or the failures of unusable ones)."""
    return load_images(source.load, indices)


class Extracted(NamedTuple):
    """One image's features on their way from an actor to a solve task (solve_on="cpu-tasks")."""

    index: int
    image_size: tuple[int, int]
    features: Features
    image: np.ndarray | None  # only when the graph's colour term needs it


def solve_shard(items: list, graph_cfg: GraphConfig, spectral_cfg: SpectralConfig) -> list[ImageResult]:
    """Graph + spectrum of every image of a shard from ``ShardWorker.extract``'s output."""
    ready = [x for x in items if isinstance(x, Extracted)]
    solved = dict(
        zip((x.index for x in ready), solve_features([(x.image, x.features) for x in ready], graph_cfg, spectral_cfg))
    )
    return [to_result(x.index, x.image_size, solved[x.index]) if isinstance(x, Extracted) else x for x in items]


class ShardWorker:
    """A long-lived worker (a Ray actor): builds the extractor once, then computes shards."""

    def __init__(self, extractor_cfg: ExtractorConfig, graph_cfg: GraphConfig, spectral_cfg: SpectralConfig):
        arm_from_environment()  # a worker process: the driver's $SAZS_FAULT reaches it through the runtime env
        t0 = time.perf_counter()
        self.extractor = build_extractor(extractor_cfg)
        self.graph_cfg, self.spectral_cfg = graph_cfg, spectral_cfg
        self.batch = max(1, extractor_cfg.batch_size)
        self.startup_s = time.perf_counter() - t0

    def info(self) -> dict:
        import ray
        import torch

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": str(self.extractor.device),
            "threads": torch.get_num_threads(),
            "startup_s": round(self.startup_s, 3),
            "provenance": self.extractor.provenance(),
            "max_grid": list(self.extractor.max_grid),
        }

    def _loaded(self, indices: list[int], images) -> dict:
        # A decode task's output (resolved by Ray), or the paths: then decode here.
        if not isinstance(images, dict):
            return decode_shard(images, indices)
        # Arrays from the object store are read-only views; torch warns on those.
        return {i: np.array(v) if isinstance(v, np.ndarray) and not v.flags.writeable else v for i, v in images.items()}

    def compute(self, indices: list[int], images) -> list[ImageResult]:
        """Features, graphs and spectra of a shard's images, batch by batch as ``run_local`` does."""
        fault_point("ray.actor_shard")
        return priors_of_shard(
            self._loaded(indices, images), indices, self.extractor, self.graph_cfg, self.spectral_cfg, batch=self.batch
        )

    def extract(self, indices: list[int], images) -> list[Extracted | ImageResult]:
        """Features only (solve_on="cpu-tasks"), in the same batches; failed loads pass through."""
        fault_point("ray.actor_shard")
        loaded = self._loaded(indices, images)
        keep_image = self.graph_cfg.color_weight > 0
        out: list[Extracted | ImageResult] = []
        for chunk in batches(indices, self.batch):
            ok = [i for i in chunk if isinstance(loaded[i], np.ndarray)]
            feats = dict(zip(ok, extract_features([loaded[i] for i in ok], self.extractor))) if ok else {}
            for i in chunk:
                if i not in feats:
                    out.append(loaded[i])
                elif isinstance(feats[i], Exception):
                    out.append(to_result(i, tuple(loaded[i].shape[:2]), feats[i]))
                else:
                    out.append(Extracted(i, tuple(loaded[i].shape[:2]), feats[i], loaded[i] if keep_image else None))
        return out


# ----------------------------------------------------------------------------- driver side


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("--executor ray needs Ray: pip install 'ray[default]>=2.40'") from exc
    return ray


def _system_errors(ray) -> tuple[type[BaseException], ...]:
    """Errors that mean a worker, an actor, an object or a node was lost (retry the shard),
    as opposed to an exception raised by our own code (a bug: stop)."""
    e = ray.exceptions
    return (
        e.RayActorError,
        e.WorkerCrashedError,
        e.ObjectLostError,
        e.NodeDiedError,
        e.LocalRayletDiedError,
        e.OutOfMemoryError,
        e.TaskUnschedulableError,
        e.ActorUnschedulableError,
    )


def connect(ray, cfg: RayConfig) -> tuple[str, bool]:
    """Join the cluster at ``cfg.address`` / $RAY_ADDRESS, or start a local instance.

    Returns (mode, owned): mode is "cluster", "local" or "existing" (Ray was already
    initialised in this process, e.g. by a notebook); owned says whether to shut down.
    """
    if ray.is_initialized():
        log.info("ray: using the Ray instance already initialised in this process")
        return "existing", False
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    runtime_env = {"env_vars": env} if env else None
    if address:
        log.info("ray: joining the cluster at %s", address)
        ray.init(address=address, include_dashboard=False, runtime_env=runtime_env)
        return "cluster", True
    ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False, runtime_env=runtime_env)
    log.info("ray: started a local Ray instance (set RAY_ADDRESS or --ray-address to join a cluster)")
    return "local", True


@dataclass(frozen=True)
class Plan:
    """How a job is laid out on the cluster (decided once from its resources)."""

    use_gpus: bool
    actors: int
    actor_options: dict
    decode_tasks: bool  # decode in CPU tasks (else inside the actor)
    max_in_flight: int
    device: str  # the extractor's device inside an actor

    def describe(self) -> dict:
        return {
            "actors": self.actors,
            "actor_kind": "gpu" if self.use_gpus else "cpu",
            "decode": "tasks" if self.decode_tasks else "actor",
            "max_in_flight": self.max_in_flight,
        }


def plan(resources: dict, cfg: RayConfig, extractor_cfg: ExtractorConfig, num_shards: int) -> Plan:
    """Actors, their resources and where images are decoded, from the cluster's resources."""
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    device = extractor_cfg.device
    use_gpus = gpus > 0 and (device == "auto" or device.startswith("cuda"))
    if device.startswith("cuda") and not use_gpus:
        log.warning("--device %s requested but the Ray cluster has no GPUs; using CPU actors", device)
    if use_gpus:
        n = cfg.actors or gpus
        options = {"num_gpus": 1, "num_cpus": 1}
    else:
        n = cfg.actors or (max(1, cpus) if cfg.solve_on == "actor" else max(1, cpus // 2))
        options = {"num_cpus": 1}
    if n > num_shards:
        log.info(
            "ray: %d shard(s) for %d actor(s): starting %d (a smaller --shard-size spreads a small dataset "
            "over more actors)",
            num_shards,
            n,
            max(1, num_shards),
        )
    n = max(1, min(n, num_shards))
    free_cpus = cpus - n * options["num_cpus"]
    if cfg.solve_on == "cpu-tasks" and free_cpus < 1:
        raise ValueError(
            f"--ray-solve-on cpu-tasks needs CPUs beside the {n} actor(s) ({cpus} CPUs in the "
            "cluster): use fewer --ray-actors"
        )
    return Plan(
        use_gpus=use_gpus,
        actors=n,
        actor_options=options,
        decode_tasks=free_cpus >= 1,
        max_in_flight=cfg.max_in_flight or 2 * n,
        device="cuda" if use_gpus else "cpu",
    )


@dataclass
class _Actor:
    index: int
    handle: Any
    ready: Any  # ObjectRef of info() until it resolves, then None
    info: dict | None = None
    busy: int = 0
    dead: bool = False


@dataclass
class _Flight:
    shard: int
    indices: list[int]
    actor: _Actor
    attempt: int
    submitted: float


class _Driver:
    """Hands shards to actors, writes what comes back, replaces what is lost."""

    def __init__(self, ray, dataset, extractor_cfg, graph_cfg, spectral_cfg, job, cfg: RayConfig, mode: str):
        self.ray, self.dataset, self.job, self.cfg, self.mode = ray, dataset, job, cfg, mode
        self.graph_cfg, self.spectral_cfg = graph_cfg, spectral_cfg
        self.errors = _system_errors(ray)
        resources = ray.cluster_resources()
        self.nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        num_shards = -(-len(dataset) // max(1, job.shard_size))
        self.plan = plan(resources, cfg, extractor_cfg, num_shards)
        self.extractor_cfg = replace(extractor_cfg, device=self.plan.device)
        # "auto" backend/solver: decided here for the whole cluster (the manifest needs one
        # answer): the fast path when GPU actors solve (they use CuPy if the driver has it:
        # the cluster shares one environment); CPU solve tasks get the CPU path.
        gpu_solve = self.plan.use_gpus and cfg.solve_on == "actor"
        self.graph_cfg, self.spectral_cfg = resolve_auto(
            graph_cfg, spectral_cfg, gpu=gpu_solve, cupy=_cupy_installed() if gpu_solve else False
        )
        log.info(
            "ray: %d node(s), %g CPUs, %g GPUs; %d %s actor(s), decode in %s, solve in %s, at most %d shards in flight",
            self.nodes,
            resources.get("CPU", 0),
            resources.get("GPU", 0),
            self.plan.actors,
            "GPU" if self.plan.use_gpus else "CPU",
            "tasks" if self.plan.decode_tasks else "the actors",
            cfg.solve_on,
            self.plan.max_in_flight,
        )
        self.resources = {k: resources.get(k, 0) for k in ("CPU", "GPU")}
        self.worker_cls = ray.remote(ShardWorker)
        self.decode_task = ray.remote(num_cpus=1)(decode_shard)
        self.solve_task = ray.remote(num_cpus=1)(solve_shard)
        self.per_actor = -(-self.plan.max_in_flight // self.plan.actors)
        self.actors: list[_Actor] = []
        self.replacements = 0
        self.max_replacements = max(4, 2 * self.plan.actors)
        self.provenance: dict | None = None

    # -- actors
    def spawn(self) -> _Actor:
        handle = self.worker_cls.options(max_restarts=0, max_task_retries=0, **self.plan.actor_options).remote(
            self.extractor_cfg, self.graph_cfg, self.spectral_cfg
        )
        actor = _Actor(index=len(self.actors), handle=handle, ready=handle.info.remote())
        self.actors.append(actor)
        return actor

    def on_ready(self, actor: _Actor, run: JobRun | None) -> None:
        """An actor's info() resolved (or raised: it died while starting)."""
        ref, actor.ready = actor.ready, None
        try:
            actor.info = self.ray.get(ref)
        except self.errors as exc:
            if getattr(exc, "actor_init_failed", False):  # the extractor cannot be built: no retry helps
                raise RayJobError(f"a Ray actor could not build the extractor: {exc}") from None
            self.retire(actor, exc, run)
            return
        if self.provenance is not None and actor.info["provenance"] != self.provenance:
            raise RayJobError(
                f"ray actor {actor.index} on {actor.info['host']} builds a different extractor "
                f"({actor.info['provenance']}) than the first ({self.provenance}); the cluster's "
                "nodes need the same code, weights and devices"
            )
        log.info(
            "ray: actor %d ready on %s (pid %d, %s) after %.1fs",
            actor.index,
            actor.info["host"],
            actor.info["pid"],
            actor.info["device"],
            actor.info["startup_s"],
        )
        if run is not None:
            self.log_actor(run, actor)

    def log_actor(self, run: JobRun, actor: _Actor) -> None:
        info = {k: v for k, v in actor.info.items() if k != "provenance"}
        run.progress.write("actor", actor=actor.index, **info)

    def retire(self, actor: _Actor, exc: BaseException, run: JobRun | None) -> None:
        """An actor is lost (its process, or its node, died): kill what is left, start another."""
        if actor.dead:
            return
        actor.dead = True
        self.ray.kill(actor.handle, no_restart=True)
        message = _one_line(exc)
        log.warning("ray: actor %d lost: %s", actor.index, message)
        if run is not None:
            run.progress.write("actor_lost", actor=actor.index, error=message)
        if self.replacements >= self.max_replacements:
            log.warning(
                "ray: not replacing actor %d: %d actors replaced already (the limit)", actor.index, self.replacements
            )
            return
        self.replacements += 1
        new = self.spawn()
        log.info("ray: starting actor %d to replace actor %d", new.index, actor.index)

    def ready_actors(self) -> list[_Actor]:
        return [a for a in self.actors if a.info is not None and not a.dead]

    def starting_actors(self) -> list[_Actor]:
        return [a for a in self.actors if a.ready is not None and not a.dead]

    def wait_first_actor(self) -> _Actor:
        """Block until one actor is up: its extractor's provenance goes into the store's manifest."""
        last_log = time.monotonic()
        while not self.ready_actors():
            starting = self.starting_actors()
            if not starting:
                raise RayJobError(
                    f"no Ray actor could start ({self.replacements} replaced); the last error is logged above"
                )
            done, _ = self.ray.wait([a.ready for a in starting], num_returns=1, timeout=5.0)
            for ref in done:
                self.on_ready(next(a for a in starting if a.ready == ref), None)
            if not done and time.monotonic() - last_log > WAIT_LOG_S:
                log.warning("ray: waiting for actors to start; available: %s", self.ray.available_resources())
                last_log = time.monotonic()
        first = self.ready_actors()[0]
        self.provenance = first.info["provenance"]
        return first

    # -- shards
    def submit(self, shard: int, indices: list[int], actor: _Actor, attempt: int) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=actor.info["node_id"], soft=True)
        images = ShardSource.of(self.dataset, indices)
        if self.plan.decode_tasks:
            images = self.decode_task.options(scheduling_strategy=here).remote(images, indices)
        if self.cfg.solve_on == "cpu-tasks":
            items = actor.handle.extract.remote(indices, images)
            ref = self.solve_task.options(scheduling_strategy=here).remote(items, self.graph_cfg, self.spectral_cfg)
        else:
            ref = actor.handle.compute.remote(indices, images)
        actor.busy += 1
        return ref, _Flight(shard, indices, actor, attempt, time.perf_counter())

    def run(self) -> JobSummary:
        for _ in range(self.plan.actors):
            self.spawn()
        first = self.wait_first_actor()
        manifest = make_manifest(
            self.dataset,
            self.provenance,
            tuple(first.info["max_grid"]),
            self.graph_cfg,
            self.spectral_cfg,
            self.job.shard_size,
        )
        start_info = {
            "ray": {"mode": self.mode, "nodes": self.nodes, **self.resources},
            "solve_on": self.cfg.solve_on,
            **self.plan.describe(),
        }
        with JobRun(self.dataset, manifest, self.job, self.spectral_cfg, executor="ray", **start_info) as run:
            for actor in self.ready_actors():
                self.log_actor(run, actor)
            self.loop(run)
        return run.finish()

    def loop(self, run: JobRun) -> None:
        queue = deque(sorted(run.todo))
        attempts: dict[int, int] = {}
        flights: dict[Any, _Flight] = {}
        last_progress = time.monotonic()
        while queue or flights:
            while queue and len(flights) < self.plan.max_in_flight:
                # At most an even share per actor, so that actors that come up late get work too.
                ready = [a for a in self.ready_actors() if a.busy < self.per_actor]
                if not ready:
                    break
                actor = min(ready, key=lambda a: (a.busy, a.index))
                shard = queue.popleft()
                ref, flight = self.submit(shard, run.todo[shard], actor, attempts.get(shard, 0))
                flights[ref] = flight
            starting = {a.ready: a for a in self.starting_actors()}
            if not flights and not starting:
                raise RayJobError(
                    f"every Ray actor was lost and {self.replacements} were replaced (the limit); "
                    f"{len(queue)} shard(s) left: finished shards are saved, re-run the same "
                    "command to resume"
                )
            done, _ = self.ray.wait([*flights, *starting], num_returns=1, timeout=5.0)
            if not done:
                if time.monotonic() - last_progress > WAIT_LOG_S:
                    log.warning(
                        "ray: nothing finished for %.0fs (%d shard(s) in flight, %d actor(s) starting; available: %s)",
                        time.monotonic() - last_progress,
                        len(flights),
                        len(starting),
                        self.ray.available_resources(),
                    )
                    last_progress = time.monotonic()
                continue
            last_progress = time.monotonic()
            for ref in done:
                if ref in starting:
                    self.on_ready(starting[ref], run)
                    continue
                flight = flights.pop(ref)
                flight.actor.busy -= 1
                try:
                    results = self.ray.get(ref)
                except self.errors as exc:
                    self.lost(run, flight, exc, queue, attempts)
                    continue
                run.record(
                    flight.shard,
                    results,
                    actor=flight.actor.index,
                    attempt=flight.attempt,
                    seconds=round(time.perf_counter() - flight.submitted, 3),
                )

    def lost(self, run: JobRun, flight: _Flight, exc: BaseException, queue: deque, attempts: dict) -> None:
        """A shard came back as a system error: replace its actor if that died, then retry the shard."""
        if isinstance(exc, self.ray.exceptions.RayActorError):
            self.retire(flight.actor, exc, run)
        attempt = flight.attempt + 1
        message = _one_line(exc)
        run.summary.retries += 1
        run.progress.write("retry", shard=flight.shard, attempt=attempt, actor=flight.actor.index, error=message)
        if attempt > self.cfg.max_retries:
            log.error("ray: shard %d lost its worker %d times; recording its images as failed", flight.shard, attempt)
            reason = f"worker lost {attempt} times while computing shard {flight.shard}: {message}"
            run.record(
                flight.shard,
                [ImageResult(index=i, error=reason) for i in flight.indices],
                actor=flight.actor.index,
                attempt=attempt,
            )
            return
        log.warning(
            "ray: shard %d lost (%s); retrying it (attempt %d of %d)",
            flight.shard,
            message,
            attempt,
            self.cfg.max_retries,
        )
        attempts[flight.shard] = attempt
        queue.appendleft(flight.shard)

    def shutdown_actors(self) -> None:
        for actor in self.actors:
            if not actor.dead:
                self.ray.kill(actor.handle, no_restart=True)


def _cupy_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("cupy") is not None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def run_ray(
    dataset: Dataset,
    extractor_cfg: ExtractorConfig,
    graph_cfg: GraphConfig,
    spectral_cfg: SpectralConfig,
    job: JobConfig,
    cfg: RayConfig,
) -> JobSummary:
    """Compute priors for every image of ``dataset`` on Ray actors, resuming ``job.out``."""
    ray = _import_ray()
    mode, owned = connect(ray, cfg)
    driver = None
    try:
        driver = _Driver(ray, dataset, extractor_cfg, graph_cfg, spectral_cfg, job, cfg, mode)
        return driver.run()
    finally:
        if driver is not None:
            driver.shutdown_actors()
        if owned:
            ray.shutdown()
