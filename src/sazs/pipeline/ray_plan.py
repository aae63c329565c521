"""How a priors job is laid out on Ray: its settings (`RayConfig`), joining or starting the
cluster (`connect`), and the actors planned from the cluster's resources (`plan`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from sazs.features.extractors import ExtractorConfig

log = logging.getLogger(__name__)

SOLVE_ON = ("actor", "cpu-tasks")
# Environment variables that workers on other nodes need from the driver (a local
# instance's workers inherit them anyway): weights cache, fault injection, offline hub.
FORWARDED_ENV_PREFIXES = ("SAZS_", "HF_")


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
