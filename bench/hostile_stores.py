"""Peak memory, time and error lines of ``sazs-store`` on hostile stores and servers (issue 21).

Two tables, each command in a child process with ``PYTHONPATH=<src>`` (so an extract of an
older commit is measured the same way) under ``/usr/bin/time`` (peak RSS):

* ``bombs``: a 7-image store with one decompression bomb in a chunk (``status/c/0``: zstd of
  1 GiB in 32 KB, a 16-byte zstd header claiming 1 TiB, gzip and blosc of 2 GiB; and a 1 GiB
  zstd inner chunk of an eigenvector shard), through ``info``, ``verify`` and ``export``;
* ``http``: a finalised store published on a loopback server (tests/httpserver.py) that lies
  about one shard (Content-Length 10^12, an endless body, a truncated body, no answer, one
  byte every 10 s, another shard's bytes, a redirect to another store), through ``verify``,
  ``export`` and ``pull``; a command still running after ``--limit`` seconds is killed.

    python bench/hostile_stores.py bombs --work /tmp/hs
    python bench/hostile_stores.py http --work /tmp/hs --limit 90
    git archive 51926fc src | tar -x -C /tmp/before
    python bench/hostile_stores.py bombs --work /tmp/hs --src /tmp/before/src    # before the fix
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import httpserver  # noqa: E402
from bombs import blosc_bomb, gzip_bomb, put_inner_chunk, zstd_bomb, zstd_lie  # noqa: E402
from test_http_store import SHARD  # noqa: E402
from test_http_store import make_store as make_finalised  # noqa: E402
from test_store_hardening import make_store  # noqa: E402

from sazs.stores.publish import publish  # noqa: E402


def run(cmd: list[str], src: str, limit: int) -> tuple[str, str, str, int, str]:
    """(exit, seconds, peak RSS MB, stderr lines, last line) of ``sazs-store cmd``."""
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    argv = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "sazs.stores", *cmd, "--no-progress"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=limit)
    except subprocess.TimeoutExpired:
        return "killed", f">{limit}", "", 0, "still running"
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("Command exited")]
    rss, secs = lines[-1].split()
    lines = lines[:-1]
    last = (lines[-1] if lines else (r.stdout.strip().splitlines() or [""])[-1])[:140].replace("|", "/")
    return str(r.returncode), secs, str(int(rss) // 1024), len(lines), last


def bombs(work: Path, src: str, limit: int) -> None:
    make_store(work / "clean.zarr")

    def variant(name, data, codec=None):
        store = work / f"{name}.zarr"
        shutil.copytree(work / "clean.zarr", store)
        if codec:
            meta = json.loads((store / "status" / "zarr.json").read_text())
            meta["codecs"][-1] = codec
            (store / "status" / "zarr.json").write_text(json.dumps(meta))
        (store / "status" / "c" / "0").write_bytes(data)
        return store, len(data)

    blosc = {"cname": "zstd", "clevel": 9, "shuffle": "noshuffle", "typesize": 1, "blocksize": 0}
    cases = {
        "none (clean store)": (work / "clean.zarr", 0),
        "zstd-1GiB": variant("zstd-1GiB", zstd_bomb(1 << 30)),
        "zstd-lie-1TiB": variant("zstd-lie-1TiB", zstd_lie(1 << 40)),
        "gzip-2GiB": variant("gzip-2GiB", gzip_bomb(2 << 30), {"name": "gzip", "configuration": {"level": 5}}),
        "blosc-2GiB": variant("blosc-2GiB", blosc_bomb((2 << 30) - 64), {"name": "blosc", "configuration": blosc}),
    }
    inner = work / "eigvecs-zstd-1GiB.zarr"
    shutil.copytree(work / "clean.zarr", inner)
    data = zstd_bomb(1 << 30)
    put_inner_chunk(inner / "eigvecs/c/0/0/0/0", 3, 0, data)
    cases["eigvecs-zstd-1GiB"] = (inner, len(data))
    print("| bomb | chunk bytes | command | exit | s | peak RSS (MB) | stderr lines | last line |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (store, n) in cases.items():
        export = ["export", str(store), str(work / "out"), "--format", "npz"]
        for cmd in (["info", str(store)], ["verify", str(store)], export):
            shutil.rmtree(work / "out", ignore_errors=True)
            code, secs, rss, nerr, last = run(cmd, src, limit)
            print(f"| {name} | {n} | {cmd[0]} | {code} | {secs} | {rss} | {nerr} | {last} |", flush=True)


def http(work: Path, src: str, limit: int) -> None:
    local = make_finalised(work / "local.zarr")
    publish(local, str(work / "site" / "x.zarr"), progress=False)
    publish(local, str(work / "site" / "y.zarr"), progress=False)
    state = httpserver.HTTPServer(root=work.resolve(), url="")
    httpd = httpserver._Server(("127.0.0.1", 0), httpserver._handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url, shard = state.url + "/site/x.zarr", "/site/x.zarr" + SHARD
    faults = {
        "Content-Length 10^12": lambda: state.length.__setitem__(shard, 10**12),
        "endless chunked body": lambda: state.endless.add(shard),
        "truncated body": lambda: state.length.__setitem__(shard, 10_000),
        "stall (no headers)": lambda: state.stall.add(shard),
        "trickle 1 B / 10 s": lambda: (state.trickle.add(shard), setattr(state, "trickle_s", 10.0)),
        "swapped shard": lambda: state.swap.__setitem__(shard, "/site/x.zarr/eigvecs/c/0/0/0/0"),
        "redirect to y.zarr": lambda: state.redirect.__setitem__(shard, "/site/y.zarr/eigvecs/c/0/0/0/0"),
    }
    print("| server fault | command | exit | s | peak RSS (MB) | stderr lines | last line |")
    print("|---|---|---|---|---|---|---|")
    for name, arm in faults.items():
        export = ["export", url, str(work / "out"), "--format", "npz"]
        for cmd in (["verify", url], export, ["pull", url, str(work / "p")]):
            for faults_of in (state.length, state.swap, state.redirect):
                faults_of.clear()
            for faults_of in (state.endless, state.stall, state.trickle):
                faults_of.clear()
            state.released.set()  # let the threads of the last fault end
            time.sleep(0.2)
            state.released.clear()
            shutil.rmtree(work / "out", ignore_errors=True)
            shutil.rmtree(work / "p", ignore_errors=True)
            arm()
            code, secs, rss, nerr, last = run(cmd, src, limit)
            print(f"| {name} | {cmd[0]} | {code} | {secs} | {rss} | {nerr} | {last} |", flush=True)
    state.released.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["bombs", "http"])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied)")
    parser.add_argument("--src", default=str(REPO / "src"), help="the src/ of the sazs to measure")
    parser.add_argument("--limit", type=int, default=300, help="seconds before a command is killed")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    (bombs if args.table == "bombs" else http)(args.work, args.src, args.limit)


if __name__ == "__main__":
    main()
