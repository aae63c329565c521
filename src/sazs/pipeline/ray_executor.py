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
(``compute.load_images``, ``compute.priors_of_shard``, ``compute.solve_features``), so a store written
through Ray is bitwise identical to one written by ``run_local`` with as many threads as
an actor has (Ray sets OMP_NUM_THREADS to the actor's CPUs, 1, unless it is set).

Ray is imported inside functions: this module (like the rest of the pipeline) imports
without it. Every node needs the same environment (``pip install -e .``) and the
dataset at the same path; the store only needs to be on the driver.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from sazs.datasets.base import Dataset
from sazs.features.extractors import ExtractorConfig
from sazs.stores.writer import ImageResult

from .compute import resolve_auto
from .graph import GraphConfig
from .job import JobConfig, JobRun, JobSummary, make_manifest
from .ray_plan import RayConfig, connect, plan
from .ray_worker import ShardSource, ShardWorker, decode_shard, solve_shard
from .spectral import SpectralConfig

log = logging.getLogger(__name__)

WAIT_LOG_S = 60.0  # how often a stalled driver says what it waits for


class RayJobError(RuntimeError):
    """The job cannot go on on Ray (no actor can start, all were lost, nodes disagree)."""


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
