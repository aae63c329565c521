"""Fault injection for crash tests: kill (or pause) the process at a named point.

The store writer and the priors job call ``fault_point(name)`` at the moments where a
crash matters (between the data of a shard and its status, after a shard, ...). With the
environment variable ``SAZS_FAULT`` unset this is one truth test of an empty dict, so
the hooks cost nothing in production. Nothing is armed at import: each console script's
``main`` and each Ray worker call :func:`arm_from_environment`, which reads the variable.
Tests set it in a subprocess's environment:

    SAZS_FAULT=write_shard.after_data:2 sazs-priors run ...   # SIGKILL at the 2nd time

A spec is ``point:occurrence[:action]``; several specs are separated by commas.

* ``occurrence``: ``N`` fires at the N-th time the point is reached (1-based), ``*`` every time.
* ``action``: ``kill`` (the default) sends SIGKILL to this process (no ``finally``, no
  ``atexit``, no flush: what a power cut or the OOM killer does); ``sleep=SECONDS`` pauses;
  ``wait=PATH`` holds the process at the point until PATH exists, so a test can act (start
  a second writer, kill a worker or a node) while a job is held at a known point, then
  release it. On arrival the held process creates ``PATH.held-<pid>`` (see ``held_pids``):
  the test waits for that file, never for a time. A hold longer than ``WAIT_TIMEOUT_S``
  raises TimeoutError (a test that never released its job fails, it does not go on).

Points:

* ``write_shard.start``, ``write_shard.after_eigvecs`` (the eigvecs shard is written, the
  small arrays are not), ``write_shard.after_data`` (all data written, status not yet),
  ``write_shard.after_status``: in ``StoreWriter.write_shard``;
* ``job.after_shard``: in ``JobRun.record`` (the driver of either executor), after each shard
  is written and logged;
* ``ray.actor_shard``: in a Ray ``ShardWorker`` (the actor's process), as it starts a shard;
* ``zarr.before_rename``: inside Zarr's local store, after an object's temporary file
  (``*.partial``) is written and before it is renamed into place. Naming this point patches
  Zarr's private ``_atomic_write``; a kill there leaves a real ``*.partial`` file behind.

Example: ``SAZS_FAULT="job.after_shard:1:wait=/tmp/go,write_shard.after_data:3"``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

ENV_VAR = "SAZS_FAULT"
WAIT_TIMEOUT_S = 300.0
POINTS = frozenset(
    {
        "write_shard.start",
        "write_shard.after_eigvecs",
        "write_shard.after_data",
        "write_shard.after_status",
        "job.after_shard",
        "ray.actor_shard",
        "zarr.before_rename",
    }
)


@dataclass(frozen=True)
class Fault:
    point: str
    occurrence: int | None  # None: every time
    action: str = "kill"  # kill | sleep | wait
    arg: str = ""


_faults: dict[str, list[Fault]] = {}
_counts: dict[str, int] = {}


def parse(spec: str) -> list[Fault]:
    """``"point:N[:action],..."`` → faults; raises ValueError naming what is wrong."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, rest = item.partition(":")
        nth, _, action = rest.partition(":")
        if point not in POINTS:
            raise ValueError(f"{ENV_VAR}: unknown fault point {point!r}; choose from {sorted(POINTS)}")
        if nth != "*" and not (nth.isdigit() and int(nth) >= 1):
            raise ValueError(f"{ENV_VAR}: occurrence of {point!r} must be a number >= 1 or '*', got {nth!r}")
        name, _, arg = (action or "kill").partition("=")
        if name not in ("kill", "sleep", "wait") or (name != "kill") != bool(arg):
            raise ValueError(f"{ENV_VAR}: action of {point!r} must be kill, sleep=SECONDS or wait=PATH, got {action!r}")
        if name == "sleep":
            float(arg)  # ValueError now rather than at the fault point
        faults.append(Fault(point, None if nth == "*" else int(nth), name, arg))
    return faults


def configure(spec: str | None) -> None:
    """Arm the faults of ``spec`` (None or "" disarms all) and reset the counters."""
    _faults.clear()
    _counts.clear()
    for fault in parse(spec or ""):
        _faults.setdefault(fault.point, []).append(fault)
    if "zarr.before_rename" in _faults:
        _patch_zarr()


def fault_point(name: str) -> None:
    """Mark a point where a crash matters; does nothing unless ``SAZS_FAULT`` names it."""
    if _faults:
        _reached(name)


def _reached(name: str) -> None:
    faults = _faults.get(name)
    if not faults:
        return
    n = _counts[name] = _counts.get(name, 0) + 1
    for fault in faults:
        if fault.occurrence is None or fault.occurrence == n:
            _act(fault, n)


def _act(fault: Fault, n: int) -> None:
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "sleep":
        time.sleep(float(fault.arg))
    else:
        open(f"{fault.arg}.held-{os.getpid()}", "w").close()
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while not os.path.exists(fault.arg):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{ENV_VAR}: held at {fault.point} (time {n}) for {WAIT_TIMEOUT_S:.0f}s and "
                    f"{fault.arg} was never created"
                )
            time.sleep(0.02)


def held_pids(path) -> list[int]:
    """The processes that reached a ``wait=PATH`` fault (held there until PATH exists)."""
    prefix = f"{os.path.basename(path)}.held-"
    folder = os.path.dirname(os.path.abspath(path))
    return sorted(int(name[len(prefix) :]) for name in os.listdir(folder) if name.startswith(prefix))


def _patch_zarr() -> None:
    """Wrap Zarr's local-store write so that ``zarr.before_rename`` is reached before each rename."""
    from zarr.storage import _local

    original = getattr(_local, "_atomic_write", None)
    if original is None:
        raise ValueError(
            f"{ENV_VAR}: zarr.before_rename needs zarr.storage._local._atomic_write, which this "
            "Zarr version does not have"
        )
    if getattr(original, "_sazs_fault", False):
        return

    @contextlib.contextmanager
    def atomic_write(path, mode, exclusive=False):
        with original(path, mode, exclusive) as f:
            yield f
            f.flush()  # the temporary file holds the whole object when the fault fires
            fault_point("zarr.before_rename")

    atomic_write._sazs_fault = True
    _local._atomic_write = atomic_write


def arm_from_environment() -> None:
    """Arm the faults named by ``$SAZS_FAULT`` (an explicit opt-in; unset disarms them)."""
    configure(os.environ.get(ENV_VAR))
