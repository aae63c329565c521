"""The writer lock (one writer per store, explicit take-over) and the fault hooks."""

import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from storecheck import toy_manifest

from sazs.core import faults
from sazs.pipeline import cli, compute
from sazs.stores.format import LOCK_FILE, StoreError
from sazs.stores.integrity import finalize
from sazs.stores.lock import break_lock, is_stale, read_lock
from sazs.stores.writer import ImageResult, StoreWriter

FAST = ["--extractor", "color", "--short-side", "64", "--no-progress", "--preview", "0"]
IDS = ["a", "b", "c", "d", "e"]
K = 4


def make_manifest(ids, *, knn=10):
    return toy_manifest(ids, num_eigs=K, knn=knn, shard_size=2)


def result(i, grid=(3, 5)):
    rng = np.random.default_rng(i)
    h, w = grid
    return ImageResult(
        index=i,
        image_size=(h * 8, w * 8),
        grid=grid,
        eigvals=np.sort(rng.random(K)).astype(np.float32),
        eigvecs=rng.standard_normal((K, h, w)).astype(np.float32),
        residuals=np.full(K, 1e-6, np.float32),
    )


def open_writer(path, **kw):
    return StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS), **kw)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(proc.stdout)


def plant_lock(store, **fields):
    """Write a lock file as another writer would have left it."""
    ago = (datetime.now(UTC) - timedelta(minutes=2)).isoformat(timespec="seconds")
    info = {
        "owner": "alice@elsewhere",
        "host": "elsewhere",
        "pid": 123,
        "started": ago,
        "heartbeat": ago,
        "command": "sazs-priors run --limit 9",
        "token": "feedface",
        **fields,
    }
    (store / LOCK_FILE).write_text(json.dumps(info))
    return info


def test_lock_file_is_held_while_open_and_released_on_close(tmp_path):
    path = tmp_path / "s.zarr"
    with open_writer(path) as w:
        info = read_lock(path)
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["owner"].endswith("@" + socket.gethostname())
        assert set(info) >= {"started", "heartbeat", "command", "token"}
        # the same process opening the store again is refused too
        with pytest.raises(StoreError, match=rf"locked by .* pid {os.getpid()} since \d+s ago \(this process"):
            open_writer(path)
        w.write_shard(0, [result(0), result(1)])
    assert read_lock(path) is None
    with pytest.raises(StoreError, match="closed"):
        w.write_shard(1, [result(2), result(3)])
    with open_writer(path) as again:  # resumes
        assert again.todo() == {1: [2, 3], 2: [4]}


def test_lock_is_released_when_the_block_raises(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match="exceeds the store's max grid"):
        with open_writer(path) as w:
            w.write_shard(0, [result(0, grid=(7, 7))])
    assert read_lock(path) is None


def test_live_lock_of_another_host_names_owner_pid_host_and_age(tmp_path):
    path = tmp_path / "s.zarr"
    open_writer(path).close()
    plant_lock(path)
    with pytest.raises(StoreError) as err:
        open_writer(path)
    msg = str(err.value)
    assert "locked by alice@elsewhere pid 123 since 2m ago" in msg
    assert "last heartbeat 2m ago" in msg and "sazs-priors run --limit 9" in msg
    assert "--take-over-lock" in msg and f"sazs-store unlock {path}" in msg
    assert "stale" not in msg  # another host's pid means nothing here
    assert read_lock(path)["token"] == "feedface"  # refused, untouched


def test_stale_lock_is_reported_never_taken_silently(tmp_path):
    path = tmp_path / "s.zarr"
    with open_writer(path) as w:
        w.write_shard(0, [result(0), result(1)])
    pid = dead_pid()
    plant_lock(path, host=socket.gethostname(), pid=pid)
    assert is_stale(read_lock(path))
    with pytest.raises(StoreError, match=rf"stale \(process {pid} is not running\).*--take-over-lock"):
        open_writer(path)
    assert read_lock(path)["pid"] == pid
    with open_writer(path, take_over_lock=True) as w:
        assert read_lock(path)["pid"] == os.getpid()
        assert w.todo() == {1: [2, 3], 2: [4]}  # the data survived
    assert read_lock(path) is None


def test_break_lock(tmp_path):
    path = tmp_path / "s.zarr"
    assert break_lock(path) is None
    w = open_writer(path)
    removed = break_lock(path)
    assert removed["pid"] == os.getpid() and read_lock(path) is None
    # an unreadable lock (killed between create and write) is reported and can be broken
    (path / LOCK_FILE).write_text("")
    with pytest.raises(StoreError, match="cannot be read"):
        open_writer(path)
    assert break_lock(path) == {"raw": ""}
    w.close()


def test_heartbeat_and_losing_the_lock(tmp_path):
    path = tmp_path / "s.zarr"
    old = open_writer(path)
    info = read_lock(path)
    (path / LOCK_FILE).write_text(json.dumps({**info, "heartbeat": "2000-01-01T00:00:00+00:00"}))
    old.write_shard(0, [result(0), result(1)])
    beat = datetime.fromisoformat(read_lock(path)["heartbeat"])
    assert abs(datetime.now(UTC) - beat) < timedelta(minutes=1)
    assert not list(path.glob("*.partial"))
    new = open_writer(path, take_over_lock=True)
    with pytest.raises(StoreError, match="lost the lock"):
        old.write_shard(1, [result(2), result(3)])
    assert new.todo() == {1: [2, 3], 2: [4]}  # the old writer stopped before writing
    old.close()  # must not delete the new owner's lock
    assert read_lock(path)["token"] == new.lock.info["token"]
    new.close()
    assert read_lock(path) is None


def test_finalize_waits_for_the_writer(tmp_path):
    path = tmp_path / "s.zarr"
    w = open_writer(path)
    for shard in range(w.num_shards):
        w.write_shard(shard, [result(i) for i in w.shard_range(shard)])
    with pytest.raises(StoreError, match="locked by a writer"):
        finalize(str(path))
    w.close()
    assert finalize(str(path))["done"] == len(IDS)


def test_overwrite_keeps_the_lock_and_failed_create_leaves_nothing(tmp_path):
    path = tmp_path / "s.zarr"
    open_writer(path).close()
    with StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS, knn=20), overwrite=True) as w:
        assert read_lock(path)["pid"] == os.getpid()
        assert w.manifest["graph"]["k"] == 20
    empty = tmp_path / "none.zarr"
    with pytest.raises(StoreError, match="no images"):
        StoreWriter.open(empty, ids=[], manifest=make_manifest([]))
    assert not empty.exists()
    # a directory holding only a (stale) lock is not "a directory that is not a store"
    lonely = tmp_path / "lonely.zarr"
    lonely.mkdir()
    plant_lock(lonely, host=socket.gethostname(), pid=dead_pid())
    with pytest.raises(StoreError, match="stale"):
        StoreWriter.open(lonely, ids=IDS, manifest=make_manifest(IDS))
    StoreWriter.open(lonely, ids=IDS, manifest=make_manifest(IDS), take_over_lock=True).close()


def test_job_releases_the_lock_on_interrupt_and_error(tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.zarr"
    args = ["run", *FAST, "--limit", "2", "--shard-size", "1", "--out", str(out)]

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(compute, "compute_priors", interrupted)
    assert cli.main(args) == 130
    assert read_lock(out) is None

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(compute, "compute_priors", broken)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(args)
    assert read_lock(out) is None
    monkeypatch.undo()
    plant_lock(out)
    assert cli.main(args) == 2
    assert "locked by alice@elsewhere pid 123" in capsys.readouterr().err
    assert cli.main([*args, "--take-over-lock"]) == 0
    assert read_lock(out) is None


# -- fault hooks --------------------------------------------------------------------------


@pytest.fixture
def armed():
    yield faults.configure
    faults.arm_from_environment()


def test_fault_specs(armed):
    assert faults.parse("") == []
    assert faults.parse("job.after_shard:2, write_shard.start:*:sleep=0.5") == [
        faults.Fault("job.after_shard", 2, "kill", ""),
        faults.Fault("write_shard.start", None, "sleep", "0.5"),
    ]
    for bad, why in [
        ("nope:1", "unknown fault point"),
        ("job.after_shard", "occurrence"),
        ("job.after_shard:0", "occurrence"),
        ("job.after_shard:1:explode", "action"),
        ("job.after_shard:1:wait", "action"),
        ("job.after_shard:1:sleep=x", "float"),
    ]:
        with pytest.raises(ValueError, match=why):
            faults.parse(bad)
    armed("write_shard.start:2:sleep=0,job.after_shard:*:sleep=0")
    for _ in range(3):
        faults.fault_point("write_shard.start")
        faults.fault_point("job.after_shard")
        faults.fault_point("write_shard.after_data")  # not armed: not even counted
    assert faults._counts == {"write_shard.start": 3, "job.after_shard": 3}
    armed(None)
    faults.fault_point("write_shard.start")
    assert faults._counts == {}


def test_fault_kill_and_wait_in_a_subprocess(tmp_path):
    go = tmp_path / "go"
    code = (
        "from sazs.core.faults import arm_from_environment, fault_point\n"
        "arm_from_environment()\n"
        "for i in range(3):\n"
        "    fault_point('job.after_shard'); print(i, flush=True)\n"
    )
    env = {**os.environ, faults.ENV_VAR: f"job.after_shard:1:wait={go},job.after_shard:3"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # a safety net: the outcome is decided by the hold below
        while proc.pid not in faults.held_pids(go) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert faults.held_pids(go) == [proc.pid], "the subprocess never reached the wait fault"
        assert proc.poll() is None  # held at the first point until `go` exists
    finally:
        go.touch()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -9 and out.split() == ["0", "1"]  # released, then killed at the 3rd time


def test_fault_wait_that_is_never_released_fails(armed, tmp_path, monkeypatch):
    never = tmp_path / "never"
    armed(f"job.after_shard:1:wait={never}")
    monkeypatch.setattr(faults, "WAIT_TIMEOUT_S", 0.0)
    with pytest.raises(TimeoutError, match=rf"held at job.after_shard \(time 1\).*{never.name} was never created"):
        faults.fault_point("job.after_shard")
    assert faults.held_pids(never) == [os.getpid()]


def test_store_cli_unlock_removes_a_dead_writers_lock(tmp_path, capsys):
    from sazs.stores import cli as store_cli

    path = tmp_path / "s.zarr"
    StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS)).close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = datetime.now(UTC).isoformat()
    (path / LOCK_FILE).write_text(
        json.dumps(
            {
                "owner": "ghost@" + socket.gethostname(),
                "host": socket.gethostname(),
                "pid": int(dead.stdout),
                "started": now,
                "heartbeat": now,
            }
        )
    )
    with pytest.raises(StoreError, match="stale"):
        StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS))
    assert store_cli.main(["unlock", str(path)]) == 0
    assert f"removed the lock of ghost@{socket.gethostname()} pid {int(dead.stdout)}" in capsys.readouterr().out
    assert store_cli.main(["unlock", str(path)]) == 0
    assert "was not locked" in capsys.readouterr().out
    StoreWriter.open(path, ids=IDS, manifest=make_manifest(IDS)).close()
