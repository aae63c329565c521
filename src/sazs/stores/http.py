"""Bounds on reading a store over HTTP(S): sizes, timeouts and redirects.

A store served as static files (``https://host/x.zarr``) is read through fsspec's HTTP
filesystem, which runs aiohttp. A server is untrusted, so every session it opens comes from
:func:`bounded_client`:

* a response body larger than what was asked (a byte range: its length; a whole object:
  ``limits.MAX_HTTP_BYTES``) fails with :class:`ResponseTooLarge`, whether the server says
  so in ``Content-Length`` (refused before reading) or sends an endless body (stopped at the
  bound);
* ``limits.HTTP_CONNECT_TIMEOUT_S`` to connect, ``HTTP_READ_TIMEOUT_S`` without a byte
  (before the headers or in the body), ``HTTP_TIMEOUT_S`` for a whole request (a server
  that sends one byte every few seconds);
* a redirect may change the host or scheme (a CDN, http -> https) but not the path: a
  redirect to another object or another store fails with :class:`RedirectRefused`.

``http_options(storage_options)`` adds the client to the options of an http(s) URL;
``stores/format.split_url`` and the reader's Zarr store use it, so every read goes through
it. The bounds are read when a session opens (tests shrink them).
"""

from __future__ import annotations

import functools
import re

from sazs.core import limits

_RANGE = re.compile(r"bytes=(\d+)-(\d+)$")


@functools.cache
def _classes():
    """(ResponseTooLarge, RedirectRefused, BoundedResponse), built on first use (aiohttp is optional)."""
    import aiohttp

    class ResponseTooLarge(aiohttp.ClientPayloadError):
        """A server sends (or announces) more bytes than were asked for or than any object of a store has."""

    class RedirectRefused(aiohttp.ClientError):
        """A server redirects a read to another path."""

    class BoundedResponse(aiohttp.ClientResponse):
        def _limit(self) -> tuple[int, str]:
            # A server that answers a range with more (a whole object, an endless body) is refused too.
            match = _RANGE.match(self.request_info.headers.get("Range", ""))
            if match:
                return int(match[2]) - int(match[1]) + 1, "the byte range asked for"
            return limits.MAX_HTTP_BYTES, "MAX_HTTP_BYTES (raise it with $SAZS_MAX_HTTP_BYTES)"

        async def read(self) -> bytes:
            if self._body is None:
                limit, what = self._limit()
                length = self.content_length
                if length is not None and length > limit:
                    self.close()
                    raise ResponseTooLarge(f"{self.url}: the server announces {length} bytes, over {limit}, {what}")
                chunks, total = [], 0
                try:
                    while chunk := await self.content.read(1 << 20):
                        total += len(chunk)
                        if total > limit:
                            raise ResponseTooLarge(f"{self.url}: the server sends more than {limit} bytes, {what}")
                        chunks.append(chunk)
                except BaseException:
                    self.close()
                    raise
                self._body = b"".join(chunks)
            return await super().read()

    return ResponseTooLarge, RedirectRefused, BoundedResponse


def response_too_large() -> type[Exception]:
    return _classes()[0]


def redirect_refused() -> type[Exception]:
    return _classes()[1]


async def _check_redirect(session, ctx, params) -> None:
    from yarl import URL

    target = params.url.join(URL(params.response.headers.get("Location", "")))
    if target.path != params.url.path:
        params.response.close()
        raise redirect_refused()(
            f"{params.url} redirects to {target}, another path; a store's objects are read only from "
            "the URL given (point it at where the store is)"
        )


async def bounded_client(timeouts: tuple[float, float, float], **kwargs):
    """An aiohttp session with the bounds of this module (fsspec's ``get_client``); ``timeouts``
    are (connect, idle, whole request) in seconds."""
    import aiohttp

    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_check_redirect)
    connect, idle, total = timeouts
    kwargs.setdefault("timeout", aiohttp.ClientTimeout(total=total, sock_connect=connect, sock_read=idle))
    return aiohttp.ClientSession(response_class=_classes()[2], trace_configs=[trace], **kwargs)


def http_options(url: str, storage_options: dict | None) -> dict:
    """``storage_options`` for ``url``, with :func:`bounded_client` for an http(s) URL (unless one is given).

    The timeouts are part of the options, so fsspec (which keeps one filesystem, and its
    session, per set of options) opens a new session when they change."""
    options = dict(storage_options or {})
    if str(url).split("://", 1)[0].lower() in ("http", "https"):
        timeouts = (limits.HTTP_CONNECT_TIMEOUT_S, limits.HTTP_READ_TIMEOUT_S, limits.HTTP_TIMEOUT_S)
        options.setdefault("get_client", functools.partial(bounded_client, timeouts))
    return options
