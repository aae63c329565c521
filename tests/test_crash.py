"""Crash safety: the real CLI killed with SIGKILL at every point that matters, then resumed.

A kill leaves a store whose finished shards verify, a stale lock that a plain re-run
refuses (naming it), and a re-run with --take-over-lock that ends with exactly the arrays
of an uninterrupted run. The kills come from ``SAZS_FAULT`` (core/faults.py), plus one
from outside at a random moment. Nothing races the job: where a test acts while the job runs,
the job is held at a fault point (``wait=PATH``) that the test waits for (``held_pids``).
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from storecheck import ARRAYS, arrays, assert_same_arrays

from sazs.core.faults import ENV_VAR, held_pids
from sazs.pipeline import cli
from sazs.stores.integrity import finalize, verify
from sazs.stores.lock import is_stale, read_lock
from sazs.stores.reader import open_store

ARGS = [
    "--extractor",
    "color",
    "--short-side",
    "64",
    "--limit",
    "6",
    "--shard-size",
    "2",
    "--batch-size",
    "2",
    "--no-progress",
    "--preview",
    "0",
]
KILLED = -signal.SIGKILL


def environment(fault):
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if fault:
        env[ENV_VAR] = fault
    return env


def run_cli(out, *extra, fault=None, args=ARGS):
    """The real CLI in a subprocess (so that a SIGKILL kills only it); the finished Popen."""
    cmd = [sys.executable, "-m", "sazs.pipeline", "run", *args, "--out", str(out), *map(str, extra)]
    proc = subprocess.Popen(
        cmd, env=environment(fault), cwd=Path(out).parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=300)
    return proc


def start_cli(out, *, fault=None, args=ARGS):
    log = open(Path(out).parent / "first.log", "w")
    cmd = [sys.executable, "-m", "sazs.pipeline", "run", *args, "--out", str(out)]
    return subprocess.Popen(cmd, env=environment(fault), cwd=Path(out).parent, stdout=log, stderr=log)


def rerun(out, *extra, args=ARGS):
    """A re-run in this process (quicker than a subprocess; the same code path)."""
    return cli.main(["run", *args, "--out", str(out), *map(str, extra)])


def wait_for(condition, what, timeout=300.0):
    """Poll ``condition`` until it holds; the timeout is a safety net that fails the test."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not seen in {timeout:.0f}s")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The arrays of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "ref.zarr"
    assert rerun(out) == 0
    return arrays(out)


def check_after_kill(out, proc, done_shards, num_images=6, shard_size=2):
    """What every kill must leave: done shards intact, the rest pending, a stale lock."""
    assert proc.returncode == KILLED, getattr(proc, "stderr_text", "")[-3000:]
    ids = open_store(out).ids
    n_done = min(num_images, done_shards * shard_size)
    assert list(open_store(out).status()) == [1] * n_done + [0] * (num_images - n_done)
    report = verify(str(out))
    assert report.ok, report.lines()
    assert report.pending == ids[n_done:] and not report.failed
    lock = read_lock(out)
    assert lock["pid"] == proc.pid and is_stale(lock)
    return report


def resume_after_kill(out, pid, reference, capsys):
    """A plain re-run refuses the stale lock; --take-over-lock completes the store."""
    capsys.readouterr()
    assert rerun(out) == 2
    err = capsys.readouterr().err
    assert f"stale (process {pid} is not running)" in err and "--take-over-lock" in err
    assert read_lock(out)["pid"] == pid  # refused, not taken over silently
    assert rerun(out, "--take-over-lock") == 0
    assert read_lock(out) is None
    assert_same_arrays(out, reference)
    report = verify(str(out))
    assert report.ok and not report.pending, report.lines()
    return report


# (fault, shards finished when the process dies); 3 shards of 2 images
CASES = [
    ("write_shard.start:1", 0),
    ("write_shard.start:2", 1),
    ("write_shard.after_eigvecs:1", 0),
    ("write_shard.after_eigvecs:2", 1),
    ("write_shard.after_data:1", 0),
    ("write_shard.after_data:3", 2),
    ("write_shard.after_status:1", 1),
    ("write_shard.after_status:2", 2),
    ("job.after_shard:1", 1),
    ("job.after_shard:3", 3),  # every shard written, killed before the summary
]


@pytest.mark.parametrize("fault,done_shards", CASES, ids=[c[0] for c in CASES])
def test_kill_at_fault_point_then_resume(tmp_path, reference, capsys, fault, done_shards):
    out = tmp_path / "s.zarr"
    proc = run_cli(out, fault=fault)
    check_after_kill(out, proc, done_shards)
    # Data before status: a shard killed after its eigvecs were written is still pending.
    in_flight_written = (out / "eigvecs" / "c" / str(done_shards)).exists()
    assert in_flight_written == fault.startswith(("write_shard.after_eigvecs", "write_shard.after_data"))
    resume_after_kill(out, proc.pid, reference, capsys)


def test_kill_inside_a_zarr_write_leaves_a_partial_file(tmp_path, reference, capsys):
    out = tmp_path / "s.zarr"
    first = run_cli(out, fault="job.after_shard:1")
    check_after_kill(out, first, 1)
    # Resuming writes nothing through Zarr until shard 1: its eigvecs shard is write 1,
    # its eigvals chunk write 2, killed after the temporary file is written, before the rename.
    second = run_cli(out, "--take-over-lock", fault="zarr.before_rename:2")
    check_after_kill(out, second, 1)
    partials = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.partial"))
    assert len(partials) == 1 and partials[0].startswith("eigvals/c/1/0."), partials
    report = verify(str(out))
    assert report.ok and report.temp_files == partials, report.lines()
    report = resume_after_kill(out, second.pid, reference, capsys)
    assert report.temp_files == partials  # harmless, still reported
    finalize(str(out))
    assert not list(out.rglob("*.partial"))
    report = verify(str(out))
    assert report.finalized and report.ok and not report.temp_files and not report.extra, report.lines()


def test_second_writer_is_refused_while_the_first_runs(tmp_path, reference):
    out, go = tmp_path / "s.zarr", tmp_path / "go"
    # The first writer holds after its first shard until `go` exists.
    first = start_cli(out, fault=f"job.after_shard:1:wait={go}")
    try:
        wait_for(lambda: first.pid in held_pids(go) or first.poll() is not None, "the first writer after a shard")
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert list(open_store(out).status()) == [1, 1, 0, 0, 0, 0]
        second = run_cli(out)
        assert second.returncode == 2, second.stderr_text[-3000:]
        assert "locked by " in second.stderr_text and f"pid {first.pid} since" in second.stderr_text
        assert "stale" not in second.stderr_text
        assert read_lock(out)["pid"] == first.pid
    finally:
        go.touch()
        first.wait(timeout=300)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()
    assert read_lock(out) is None
    assert_same_arrays(out, reference)


@pytest.mark.slow
def test_sigkill_from_outside_at_any_moment(tmp_path, capsys):
    """One shard per image and larger images, killed at a random moment after the first shard.

    The moment is random (the seed is in every message); the outcome is not: the job is held
    before it writes its last shard, so it is always killed mid-job, at worst while held."""
    args = [
        "--extractor",
        "color",
        "--short-side",
        "160",
        "--limit",
        "8",
        "--shard-size",
        "1",
        "--batch-size",
        "1",
        "--no-progress",
        "--preview",
        "0",
    ]
    ref = tmp_path / "ref.zarr"
    assert rerun(ref, args=args) == 0
    expected = arrays(ref)
    out = tmp_path / "s.zarr"
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0.0, 0.5)
    proc = start_cli(out, args=args, fault=f"write_shard.start:8:wait={tmp_path / 'never'}")
    wait_for(lambda: (out / "status" / "c" / "0").exists() or proc.poll() is not None, "a first shard")
    assert proc.poll() is None, (tmp_path / "first.log").read_text()
    time.sleep(delay)  # picks the moment of the kill; the hold above keeps the job running until then
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    context = f"seed {seed}, delay {delay:.3f}s"
    assert proc.returncode == KILLED, f"the run ended before the kill ({context})"
    status = open_store(out).status()
    n_done = int(status.sum())
    assert 1 <= n_done <= 7 and list(status) == [1] * n_done + [0] * (8 - n_done), context
    report = verify(str(out))  # may list a *.partial if the kill hit a Zarr write
    assert report.ok and len(report.pending) == 8 - n_done, (context, report.lines())
    assert is_stale(read_lock(out)), context
    capsys.readouterr()
    assert rerun(out, args=args) == 2
    assert f"stale (process {proc.pid} is not running)" in capsys.readouterr().err
    assert rerun(out, "--take-over-lock", args=args) == 0
    got = arrays(out)
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name} ({context})")
    finalize(str(out))
    report = verify(str(out))
    assert report.finalized and report.ok and not report.temp_files, (context, report.lines())
