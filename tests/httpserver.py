"""A static file server on loopback, like a web server or a public bucket serving a published store.

Use it from a test module::

    from httpserver import http_server  # noqa: F401  (pytest fixture)

    def test_x(http_server, tmp_path):
        url = http_server.url_for(tmp_path / "site" / "x.zarr")  # http://127.0.0.1:PORT/site/x.zarr

It serves the test's base temporary directory read-only on 127.0.0.1 (a free port, a
ThreadingHTTPServer in a daemon thread, one per test). Like an object-storage bucket or
nginx without ``autoindex`` it answers ``Range`` requests (Zarr reads shards by byte
range) and lists no directories (a directory is 404), so a client must work from known
keys. Faults, by path relative to the served directory's URL:

* ``drop[path] = n``: the next ``n`` GETs of ``path`` send the full ``Content-Length``,
  half the body, then close the connection (n = -1: every GET);
* ``corrupt.add(path)``: ``path`` is served with one byte flipped;
* ``ranges = False``: ``Range`` headers are ignored (the whole file, 200), as some servers do.

A hostile server, by path too:

* ``swap[path] = other``: ``path`` is served with the content of ``other``;
* ``redirect[path] = location``: a 302 to ``location`` (asked of 127.0.0.1, not of localhost);
* ``length[path] = n``: ``Content-Length: n`` whatever the body (the body is the file's);
* ``endless.add(path)``: a chunked body of zeros that never ends;
* ``stall.add(path)``: no answer until the test ends (``released`` is set at teardown);
* ``trickle.add(path)``: the headers, then one byte of the body every ``trickle_s`` seconds.

``requests`` records ``(method, path)`` of every request.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class HTTPServer:
    root: Path
    url: str
    drop: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    ranges: bool = True
    requests: list[tuple[str, str]] = field(default_factory=list)
    swap: dict[str, str] = field(default_factory=dict)
    redirect: dict[str, str] = field(default_factory=dict)
    length: dict[str, int] = field(default_factory=dict)
    endless: set[str] = field(default_factory=set)
    stall: set[str] = field(default_factory=set)
    trickle: set[str] = field(default_factory=set)
    trickle_s: float = 0.05
    released: threading.Event = field(default_factory=threading.Event)

    def url_for(self, path: Path) -> str:
        return f"{self.url}/{Path(path).resolve().relative_to(self.root).as_posix()}"

    def path_of(self, url: str) -> str:
        """The served path of ``url`` (what ``drop`` and ``corrupt`` are keyed by)."""
        return url.removeprefix(self.url)


def _handler(server: HTTPServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

        def log_message(self, fmt, *args):
            logging.getLogger("tests.httpserver").debug(fmt, *args)

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            server.requests.append((self.command, path))
            if path in server.stall:
                server.released.wait(60)
                return
            if path in server.redirect and self.headers.get("Host", "").startswith("127.0.0.1"):
                self.send_response(HTTPStatus.FOUND)
                self.send_header("Location", server.redirect[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path in server.endless:
                self._endless(body)
                return
            file = (server.root / server.swap.get(path, path).lstrip("/")).resolve()
            if not file.is_relative_to(server.root) or not file.is_file():
                self._error(HTTPStatus.NOT_FOUND)
                return
            data = file.read_bytes()
            if path in server.corrupt and data:
                data = bytearray(data)
                data[len(data) // 2] ^= 0xFF
                data = bytes(data)
            status, start, end = HTTPStatus.OK, 0, len(data)
            match = _RANGE.match(self.headers.get("Range", ""))
            if server.ranges and match and (match[1] or match[2]):
                if match[1]:
                    start = int(match[1])
                    end = min(len(data), int(match[2]) + 1) if match[2] else len(data)
                else:
                    start = max(0, len(data) - int(match[2]))
                if start >= end:
                    self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    return
                status = HTTPStatus.PARTIAL_CONTENT
            self.send_response(status)
            self.send_header("Content-Length", str(server.length.get(path, end - start)))
            self.send_header("Accept-Ranges", "bytes")
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if path in server.trickle:
                for i in range(start, end):
                    if server.released.wait(server.trickle_s):
                        return
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                return
            if path in server.length:
                self.wfile.write(data[start:end])
                self.wfile.flush()
                self.close_connection = True
                return
            left = server.drop.get(path, 0)
            if left:
                server.drop[path] = left - 1 if left > 0 else left
                self.wfile.write(data[start : start + (end - start) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data[start:end])

        def _endless(self, body: bool) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not body:
                return
            block = b"%x\r\n%s\r\n" % (1 << 16, bytes(1 << 16))
            try:
                while not server.released.is_set():
                    self.wfile.write(block)
            except OSError:  # the client hung up
                pass
            self.close_connection = True

        def _error(self, status: HTTPStatus) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that hangs up is no test failure
        logging.getLogger("tests.httpserver").debug("connection from %s ended early", client_address)


@pytest.fixture
def http_server(tmp_path_factory):
    """A static server of the session's base temporary directory (tmp_path lies under it)."""
    root = tmp_path_factory.getbasetemp().resolve()
    state = HTTPServer(root=root, url="")
    httpd = _Server(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, name="http-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.released.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()
