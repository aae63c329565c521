"""A hostile HTTP server on 127.0.0.1 (tests/httpserver.py): wrong lengths, endless bodies,
stalls, trickles, swapped bodies and redirects. Each read ends in one line naming the URL,
within the bounds of core/limits.py (shrunk here so that no test waits long)."""

import time

import pytest
from httpserver import http_server  # noqa: F401  (pytest fixture)
from test_http_store import SHARD, make_store

from sazs.core import limits
from sazs.stores import cli
from sazs.stores import pull as pull_module
from sazs.stores.dataset import PriorDataset
from sazs.stores.format import StoreError
from sazs.stores.publish import publish
from sazs.stores.reader import open_store


@pytest.fixture(autouse=True)
def _small_bounds(monkeypatch):
    monkeypatch.setattr(pull_module, "RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(limits, "HTTP_READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr(limits, "HTTP_TIMEOUT_S", 1.5)
    monkeypatch.setattr(limits, "MAX_HTTP_BYTES", 4 << 20)


@pytest.fixture
def served(tmp_path, http_server):
    local = make_store(tmp_path / "local.zarr")
    site = tmp_path / "site" / "priors" / "x.zarr"
    publish(local, str(site), progress=False)
    other = tmp_path / "site" / "priors" / "y.zarr"
    publish(local, str(other), progress=False)
    url = http_server.url_for(site)
    return local, url, http_server.path_of(url), tmp_path


def one_line(capsys, url):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in captured.err and "never retrieved" not in captured.err
    assert url in err, err
    return err


def run_all(argv_list, capsys, url, want=2):
    out = []
    for argv in argv_list:
        start = time.monotonic()
        assert cli.main([*argv, "--no-progress"]) == want, argv
        assert time.monotonic() - start < 10
        out.append(one_line(capsys, url))
    return out


def commands(url, tmp_path):
    return [
        ["verify", url],
        ["pull", url, str(tmp_path / "pulled.zarr")],
        ["export", url, str(tmp_path / "out"), "--format", "npz"],
    ]


def test_a_huge_content_length_is_refused_before_reading(served, http_server, capsys):
    _, url, path, tmp_path = served
    http_server.length[path + SHARD] = 10**12
    errs = run_all(commands(url, tmp_path), capsys, url)
    assert all("10000000000" in e or "announces" in e for e in errs), errs


def test_an_endless_body_stops_at_the_bound(served, http_server, capsys):
    _, url, path, tmp_path = served
    http_server.endless.add(path + SHARD)
    errs = run_all(commands(url, tmp_path), capsys, url)
    assert all("more than" in e or "Timeout" in e for e in errs), "\n".join(errs)


def test_a_truncated_body_is_one_line(served, http_server, capsys):
    _, url, path, tmp_path = served
    size = (served[0] / SHARD.lstrip("/")).stat().st_size
    http_server.length[path + SHARD] = size + 100  # the body ends early
    run_all(commands(url, tmp_path), capsys, url)


@pytest.mark.parametrize("fault", ["stall", "trickle"])
def test_a_stalled_or_trickling_server_times_out(served, http_server, capsys, fault):
    _, url, path, tmp_path = served
    getattr(http_server, fault).add(path + SHARD)
    errs = run_all(commands(url, tmp_path), capsys, url)
    assert all("Timeout" in e or "timeout" in e for e in errs), errs


def test_a_stall_on_opening_times_out(served, http_server, capsys):
    _, url, path, tmp_path = served
    http_server.stall.add(path + "/zarr.json")
    run_all([["info", url]], capsys, url)


def test_a_swapped_shard_is_refused_by_its_checksum(served, http_server, capsys):
    _, url, path, tmp_path = served
    http_server.swap[path + SHARD] = path + "/eigvecs/c/0/0/0/0"  # a valid shard of other images
    assert cli.main(["export", url, str(tmp_path / "out"), "--format", "npz", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "2 FAILED" in out and "checksum" in out, out
    with pytest.raises(StoreError, match="checksum"):
        PriorDataset(url)[3]


def test_a_redirect_to_another_path_is_refused(served, http_server, capsys):
    _, url, path, tmp_path = served
    elsewhere = path.replace("x.zarr", "y.zarr") + "/eigvecs/c/0/0/0/0"
    http_server.redirect[path + SHARD] = elsewhere
    assert cli.main(["export", url, str(tmp_path / "out"), "--format", "npz", "--no-progress"]) == 2
    assert "another path" in one_line(capsys, url)
    with pytest.raises(StoreError, match="another path"):
        open_store(url).get("img04")
    assert cli.main(["verify", url, "--no-progress"]) == 2
    assert "another path" in one_line(capsys, url)


def test_a_redirect_that_keeps_the_path_is_followed(served, http_server):
    _, url, path, _ = served
    store = open_store(url)
    port = url.split(":")[2].split("/")[0]
    http_server.redirect[path + SHARD] = f"http://localhost:{port}{path}{SHARD}"  # another host, same path
    assert store.get("img04").eigvecs.shape[0] == 4
    assert ("GET", path + SHARD) in http_server.requests  # asked of 127.0.0.1, redirected, followed
