"""Reads of a finalised store over HTTP, each object checked against the store's checksum file.

A web server answers what it is asked for, not necessarily with what was published there: a
stale cache, a mis-configured rewrite or a hostile host may serve a valid shard of other
images in place of the one asked for, and it would decode as data. A finalised store names
the SHA-256 of every object in ``sazs-checksums.sha256``, so :class:`VerifiedStore` (the Zarr
store the reader uses for an http(s) URL of a finalised store) fetches each object whole,
checks its digest, and serves Zarr's byte ranges from the verified bytes; an object that is
not in the checksum file reads as absent (fill values), whatever the server has there. A
mismatch is :class:`ChecksumMismatch` (a ValueError: the reader reports it as a damaged
object, export as that image's failure).

Verified objects are kept in a cache of at most ``limits.HTTP_CACHE_BYTES`` per store handle,
most recently used first: reading the images of one shard in turn downloads it once. Random
access over many shards downloads a whole shard per image; ``sazs-store pull`` the store
once instead for training at scale.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore

from sazs.core import limits


class ChecksumMismatch(ValueError):
    """An object read from a server differs from what the store's checksum file names."""


def _slice(data: bytes, byte_range) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix :] if byte_range.suffix else b""
    raise TypeError(f"unexpected byte range {byte_range!r}")


class VerifiedStore(FsspecStore):
    """An FsspecStore whose every object is checked against ``checksums`` ({key: sha256}) before use."""

    checksums: dict[str, str]
    url: str

    def verified(self, checksums: dict[str, str], url: str) -> VerifiedStore:
        self.checksums, self.url = checksums, url
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._locks: dict[str, asyncio.Lock] = {}
        return self

    def with_read_only(self, read_only: bool = False) -> VerifiedStore:
        return super().with_read_only(read_only).verified(self.checksums, self.url)

    async def _object(self, key: str, prototype) -> bytes | None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        expected = self.checksums.get(key)
        if expected is None:
            return None  # not part of the finalised store: absent, whatever the server holds
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._cache:
                return self._cache[key]
            buf = await super().get(key, prototype)
            if buf is None:
                return None
            data = buf.to_bytes()
            if hashlib.sha256(data).hexdigest() != expected:
                raise ChecksumMismatch(
                    f"{self.url}/{key} does not match the store's checksum file (the server sends other "
                    "bytes than were published); run `sazs-store verify` on the URL and re-publish it"
                )
            self._cache[key] = data
            self._cached += len(data)
            while self._cached > limits.HTTP_CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)
        self._locks.pop(key, None)
        return data

    async def get(self, key, prototype=None, byte_range=None):
        prototype = prototype or default_buffer_prototype()
        data = await self._object(key, prototype)
        if data is None:
            return None
        return prototype.buffer.from_bytes(_slice(data, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]
