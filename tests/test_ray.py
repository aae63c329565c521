"""The Ray executor: same stores as the local executor, also after lost workers, a lost node
and a killed driver.

Every Ray instance these tests start lives under a temporary directory of their own
(``RAY_TMPDIR``, ``--temp-dir``), and the clean-up (fixture finalizers, so it runs on
failures too) kills only processes whose environment names that directory: never a Ray
that someone else runs on the machine. ``RAY_AUTH_MODE=disabled`` keeps Ray from writing
an auth token into the home directory.

No fault test races the job: the job is held at a fault point (``SAZS_FAULT`` with
``wait=PATH``, core/faults.py) until the test has killed what it kills, then released.
The held process announces itself (``faults.held_pids``), so the tests wait for events,
never for a time; their timeouts are safety nets that fail the test with a message.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from storecheck import arrays, assert_same_arrays  # noqa: E402

from sazs.core.faults import ENV_VAR, held_pids  # noqa: E402
from sazs.datasets.synthetic import make_coco  # noqa: E402
from sazs.features.extractors import ExtractorConfig  # noqa: E402
from sazs.pipeline import cli  # noqa: E402
from sazs.pipeline.job import progress_path, side_paths  # noqa: E402
from sazs.pipeline.ray_plan import RayConfig, plan  # noqa: E402
from sazs.stores.lock import is_stale, read_lock  # noqa: E402
from sazs.stores.reader import open_store  # noqa: E402

# 12 COCO-layout images, one shard each: enough shards in flight to kill something mid-job.
ARGS = [
    "--dataset",
    "coco",
    "--split",
    "val2017",
    "--extractor",
    "color",
    "--short-side",
    "128",
    "--shard-size",
    "1",
    "--batch-size",
    "1",
    "--no-progress",
    "--preview",
    "0",
]
RAY = ["--executor", "ray"]


# ----------------------------------------------------------------------------- helpers


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return b""


def kill_scoped(ray_tmp: Path) -> list[int]:
    """SIGKILL every process whose environment holds RAY_TMPDIR=<ray_tmp>: the Ray processes
    these tests started (including the agents a killed driver's instance leaves behind)."""
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if marker in _environ(int(entry.name)).split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[1]), int(fields[2])


def kill_node(group: int) -> list[int]:
    """SIGKILL a node started by `ray start` in process group ``group``: its daemons (the
    group) and their descendants (workers start sessions of their own), all at once, as
    when a machine goes down."""
    stats = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    stats = {pid: st for pid, st in stats.items() if st is not None}
    doomed = {pid for pid, (_, pgrp) in stats.items() if pgrp == group}
    while True:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in doomed} - doomed
        if not more:
            break
        doomed |= more
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(doomed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(out) -> list[dict]:
    """The progress log's lines so far (a line being written is skipped)."""
    path = progress_path(out)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def last_run(out) -> list[dict]:
    """The events of the last run (the log is appended to by every run)."""
    evs = events(out)
    starts = [k for k, e in enumerate(evs) if e["event"] == "start"]
    return evs[starts[-1] :] if starts else []


def run(*argv) -> int:
    return cli.main(["run", *map(str, argv)])


def wait_for(condition, timeout=300.0, what="condition"):
    """Poll ``condition`` until it holds; the timeout is a safety net that fails the test."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not seen in {timeout:.0f}s")
        time.sleep(0.01)


def held(go: Path, count: int, what: str) -> list[int]:
    """The pids of the first ``count`` processes held at a ``wait=go`` fault (waits for them)."""
    wait_for(lambda: len(held_pids(go)) >= count, what=f"{count} {what} held at the fault point")
    return held_pids(go)


@contextlib.contextmanager
def meanwhile(action):
    """Run ``action`` in a thread while the block (the job, in this thread) runs; after the
    block, wait for it and raise what it raised. ``action`` must release the job itself."""
    errors: list[BaseException] = []

    def target():
        try:
            action()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield
    thread.join(timeout=60)
    assert not thread.is_alive(), "the test's action did not finish after the job"
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ray_tmp():
    """A short private RAY_TMPDIR (Unix socket paths must stay under ~100 characters)."""
    path = Path(tempfile.mkdtemp(prefix="sazs-ray-", dir="/tmp"))
    yield path
    kill_scoped(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def ray_env(ray_tmp, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
    if ray.is_initialized():  # a test that failed half-way
        ray.shutdown()


@pytest.fixture
def own_ray():
    """A Ray instance started by the test itself; the job then uses it ("existing" mode)."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco") / "coco", num_train=1, num_val=12)


@pytest.fixture(scope="module")
def reference(coco, tmp_path_factory):
    """The arrays of an uninterrupted local run."""
    out = tmp_path_factory.mktemp("reference") / "ref.zarr"
    assert run(*ARGS, "--data", coco, "--out", out) == 0
    return arrays(out)


# ----------------------------------------------------------------------------- tests


def test_plan_from_resources():
    cpu = ExtractorConfig(name="color", device="auto")
    p = plan({"CPU": 8}, RayConfig(), cpu, num_shards=100)
    assert (p.actors, p.use_gpus, p.decode_tasks, p.max_in_flight) == (8, False, False, 16)
    p = plan({"CPU": 8}, RayConfig(solve_on="cpu-tasks"), cpu, num_shards=100)
    assert (p.actors, p.decode_tasks) == (4, True)
    p = plan({"CPU": 16, "GPU": 4}, RayConfig(), cpu, num_shards=100)
    assert (p.actors, p.use_gpus, p.device, p.decode_tasks) == (4, True, "cuda", True)
    assert p.actor_options == {"num_gpus": 1, "num_cpus": 1}
    p = plan({"CPU": 16, "GPU": 4}, RayConfig(), ExtractorConfig(name="color", device="cpu"), num_shards=100)
    assert (p.actors, p.use_gpus) == (16, False)
    assert plan({"CPU": 8}, RayConfig(), cpu, num_shards=3).actors == 3  # never more actors than shards
    with pytest.raises(ValueError, match="use fewer --ray-actors"):
        plan({"CPU": 2}, RayConfig(solve_on="cpu-tasks", actors=2), cpu, num_shards=10)
    with pytest.raises(ValueError, match="--ray-solve-on"):
        RayConfig(solve_on="gpu")


def test_ray_executor_matches_local(coco, reference, tmp_path):
    """`make priors DATASET=coco EXECUTOR=ray` (the CLI starts and stops a local instance)."""
    out = tmp_path / "ray.zarr"
    assert run(*ARGS, *RAY, "--ray-num-cpus", 2, "--data", coco, "--out", out) == 0
    assert not ray.is_initialized()
    assert_same_arrays(out, reference)
    evs = last_run(out)
    assert [e["event"] for e in evs][0] == "start" and evs[-1]["event"] == "end"
    start = evs[0]
    assert start["executor"] == "ray" and start["ray"]["mode"] == "local" and start["actors"] == 2
    shards = [e for e in evs if e["event"] == "shard"]
    assert sorted(e["shard"] for e in shards) == list(range(12))
    assert all({"time", "images", "failures", "rate", "actor"} <= set(e) for e in shards)
    summary = json.loads(side_paths(out)[1].read_text())
    assert summary["executor"] == "ray" and summary["computed"] == 12 and summary["done"] == 12
    # the same command again resumes: nothing to compute
    assert run(*ARGS, *RAY, "--ray-num-cpus", 2, "--data", coco, "--out", out) == 0
    assert json.loads(side_paths(out)[1].read_text())["computed"] == 0


def test_solve_in_cpu_tasks_with_decode_tasks(coco, reference, tmp_path, own_ray):
    """One feature actor, images decoded in tasks, graphs solved in CPU tasks: same arrays."""
    out = tmp_path / "tasks.zarr"
    assert run(*ARGS, *RAY, "--ray-solve-on", "cpu-tasks", "--ray-actors", 1, "--data", coco, "--out", out) == 0
    assert ray.is_initialized()  # an instance the job did not start is left running
    assert_same_arrays(out, reference)
    start = last_run(out)[0]
    assert start["ray"]["mode"] == "existing" and start["decode"] == "tasks" and start["solve_on"] == "cpu-tasks"


def test_worker_killed_mid_shard_is_retried(coco, reference, tmp_path, monkeypatch):
    """An actor's process SIGKILLed while it computes a shard: a new actor computes it again."""
    out, go = tmp_path / "killed.zarr", tmp_path / "go"
    # Every actor holds at the start of its first shard until `go` exists (the job forwards
    # SAZS_* to its workers), so the kill always lands mid-shard, never after the job.
    monkeypatch.setenv(ENV_VAR, f"ray.actor_shard:1:wait={go}")
    killed: list[int] = []

    def kill_a_held_actor():
        try:
            pid = held(go, 1, "actor")[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        finally:
            go.touch()  # release the other actor (and the replacement, which passes the point)

    with meanwhile(kill_a_held_actor):
        assert run(*ARGS, *RAY, "--ray-num-cpus", 2, "--data", coco, "--out", out) == 0
    assert_same_arrays(out, reference)
    evs = last_run(out)
    victim = next(e["actor"] for e in evs if e["event"] == "actor" and e["pid"] == killed[0])
    assert [e["actor"] for e in evs if e["event"] == "actor_lost"] == [victim]
    retried = {e["shard"] for e in evs if e["event"] == "retry"}
    assert retried and all(e["actor"] == victim for e in evs if e["event"] == "retry")
    assert all(
        any(e["event"] == "shard" and e["shard"] == s and e["attempt"] >= 1 and e["actor"] != victim for e in evs)
        for s in retried
    )
    assert evs[-1]["event"] == "end" and evs[-1]["retries"] == len(retried) and evs[-1]["done"] == 12
    assert json.loads(side_paths(out)[1].read_text())["retries"] == len(retried)


@pytest.fixture
def two_nodes(ray_tmp, tmp_path):
    """A head node and a second node (`ray start --address`) on this machine, 1 CPU each."""
    port = free_port()
    env = {
        **os.environ,
        "RAY_TMPDIR": str(ray_tmp),
        # notice a dead node within ~2 s instead of ~30 s
        "RAY_health_check_initial_delay_ms": "0",
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_timeout_ms": "500",
        "RAY_health_check_failure_threshold": "3",
    }
    ray_bin = str(Path(sys.executable).with_name("ray"))

    def node_args():  # each raylet's agent and metrics need ports of their own on one machine
        return [
            "--num-cpus=1",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]

    head = [
        ray_bin,
        "start",
        "--head",
        f"--port={port}",
        "--include-dashboard=false",
        f"--temp-dir={ray_tmp}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-port={free_port()}",
        *node_args(),
    ]
    node2 = [ray_bin, "start", f"--address=127.0.0.1:{port}", *node_args()]
    groups = []
    try:
        for name, cmd in (("head", head), ("node2", node2)):
            log = open(tmp_path / f"{name}.log", "w")
            # A session of its own: `ray start` exits, its daemons keep this process group.
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            groups.append(proc.pid)
            assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        yield {"address": f"127.0.0.1:{port}", "head_group": groups[0], "node2_group": groups[1]}
    finally:
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_scoped(ray_tmp)


@pytest.mark.slow
def test_node_lost_mid_job(coco, reference, tmp_path, two_nodes, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", two_nodes["address"])
    out, go = tmp_path / "node.zarr", tmp_path / "go"
    # One actor per node (1 CPU each); each holds at the start of its first shard until `go`
    # exists: the second node dies while its actor is mid-shard, whatever the machine's load.
    monkeypatch.setenv(ENV_VAR, f"ray.actor_shard:1:wait={go}")
    lost: list[set[int]] = []

    def kill_node2():
        try:
            actors = set(held(go, 2, "actors"))
            lost.append(actors & set(kill_node(two_nodes["node2_group"])))
        finally:
            go.touch()

    with meanwhile(kill_node2):
        assert run(*ARGS, *RAY, "--data", coco, "--out", out) == 0
    assert len(lost[0]) == 1, "the second node's actor was not among the held actors"
    assert_same_arrays(out, reference)
    evs = last_run(out)
    assert evs[0]["ray"]["mode"] == "cluster" and evs[0]["ray"]["nodes"] == 2
    actors = {e["pid"]: e for e in evs if e["event"] == "actor"}
    assert len({e["node_id"] for e in actors.values()}) == 2  # the actors were spread over both nodes
    victim = actors[next(iter(lost[0]))]["actor"]
    assert [e["actor"] for e in evs if e["event"] == "actor_lost"] == [victim]
    retried = {e["shard"] for e in evs if e["event"] == "retry"}
    assert retried and all(
        any(e["event"] == "shard" and e["shard"] == s and e["actor"] != victim for e in evs) for s in retried
    )
    assert evs[-1]["event"] == "end" and evs[-1]["done"] == 12


@pytest.mark.slow
def test_driver_killed_then_resumed(coco, reference, tmp_path, ray_tmp, capsys):
    out, never = tmp_path / "driver.zarr", tmp_path / "never"
    cmd = [
        sys.executable,
        "-m",
        "sazs.pipeline",
        "run",
        *ARGS,
        *RAY,
        "--ray-num-cpus",
        "2",
        "--data",
        str(coco),
        "--out",
        str(out),
    ]
    log = open(tmp_path / "driver.log", "w")
    # The driver holds after writing its first shard (`never` is never created) and is killed there.
    env = {**os.environ, ENV_VAR: f"job.after_shard:1:wait={never}"}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.pid in held_pids(never) or proc.poll() is not None, what="the driver after a shard")
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        # The killed driver's Ray instance: most of it dies with the driver, its agents do not.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_scoped(ray_tmp)
    assert proc.returncode == -signal.SIGKILL
    status = open_store(out).status()  # what the driver had written: one shard (one image), whichever came first
    assert int((status == 1).sum()) == 1 and int((status == 0).sum()) == 11, status
    assert is_stale(read_lock(out)) and read_lock(out)["pid"] == proc.pid

    # The same command again: refused, and the message says what to do.
    capsys.readouterr()
    assert run(*ARGS, *RAY, "--ray-num-cpus", 2, "--data", coco, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"stale (process {proc.pid} is not running)" in err and "--take-over-lock" in err
    assert run(*ARGS, *RAY, "--ray-num-cpus", 2, "--data", coco, "--out", out, "--take-over-lock") == 0
    assert read_lock(out) is None
    assert_same_arrays(out, reference)
    summary = json.loads(side_paths(out)[1].read_text())
    assert summary["skipped"] == 1 and summary["computed"] == 11


def test_batched_solver_through_ray_matches_local(coco, tmp_path, own_ray):
    """The fast path's per-shard code (batched kNN + batched solve of a whole shard) gives the
    same store through Ray actors and through CPU solve tasks as in this process."""
    fast = [*ARGS, "--solver", "batched", "--graph-backend", "batched", "--shard-size", 4, "--data", coco]
    local = tmp_path / "local.zarr"
    assert run(*fast, "--out", local) == 0
    expected = arrays(local)
    assert open_store(local).manifest["solver"]["solver"] == "batched"
    for mode in ("actor", "cpu-tasks"):
        out = tmp_path / f"{mode}.zarr"
        assert run(*fast, *RAY, "--ray-solve-on", mode, "--ray-actors", 1, "--out", out) == 0
        assert_same_arrays(out, expected)
