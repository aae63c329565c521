"""Compressors that never decode a chunk to more bytes than its array's metadata allows.

A compressed chunk is untrusted: 32 KB of zstd decode to 1 GiB, and a 16-byte zstd frame
header may claim 1 TiB, which the decoder allocates before reading a block. Yet every chunk
of a prior store decodes to a size its array's metadata fixes (shape x item size; for the
string arrays, at most ``MAX_STRING_BYTES`` a string), and that metadata has been checked
(stores/schema.py) before Zarr parses it. So the compressors a store may use (zstd, gzip,
blosc: the allow-list of schema.py) are replaced in Zarr's codec registry by subclasses that
check the size a frame declares (zstd frame header, blosc header) or decode with a bounded
output (gzip), and raise :class:`ChunkTooLarge` (a
ValueError, so every reader reports it as a damaged object) before allocating more.

Importing this module installs them (``zarr.config``: ``codecs.zstd`` etc.); the reader and
the writer import it, so every path that opens a store (read, verify, resume, merge, pull,
export) decodes through them. Encoding is Zarr's own.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import zarr
from numcodecs import blosc as _blosc
from numcodecs import zstd as _zstd
from zarr.codecs.blosc import BloscCodec
from zarr.codecs.gzip import GzipCodec
from zarr.codecs.zstd import ZstdCodec
from zarr.core.buffer.cpu import as_numpy_array_wrapper
from zarr.registry import register_codec

from sazs.core.limits import CHUNK_SLACK_BYTES, MAX_SHARD_BYTES, MAX_STRING_BYTES, MAX_TABLE_BYTES

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # skippable frames: 0x184D2A5?


class ChunkTooLarge(ValueError):
    """A compressed chunk declares or decodes to more bytes than its array's metadata allows."""


def max_decoded_bytes(spec) -> int:
    """The most bytes a chunk of ``spec`` (Zarr's ArraySpec) can take uncompressed.

    Fixed-size types: shape x item size (plus a little framing: a crc32c after the bytes
    codec). Variable-length strings (vlen-utf8): a 4-byte count, then per string a 4-byte
    length and at most MAX_STRING_BYTES of text, at most MAX_TABLE_BYTES in all. Never more than
    MAX_SHARD_BYTES.
    """
    n = int(np.prod(spec.shape, dtype=np.int64))
    native = spec.dtype.to_native_dtype()
    if native.kind in "OT":  # strings: the reader holds them all as Python objects
        return min(n * (4 + MAX_STRING_BYTES), MAX_TABLE_BYTES) + CHUNK_SLACK_BYTES
    return min(n * native.itemsize, MAX_SHARD_BYTES) + CHUNK_SLACK_BYTES


def zstd_content_size(data: bytes, limit: int) -> int:
    """The decompressed size the zstd frames of ``data`` declare, in all; walks the frame and block
    headers only. ChunkTooLarge once the sum passes ``limit``; ValueError for a frame that
    declares no size (Zarr always writes one) or headers cut short."""
    total, pos, end = 0, 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ValueError(f"a zstd chunk is cut short at byte {pos} of {end}")
        magic = struct.unpack_from("<I", data, pos)[0]
        if magic & 0xFFFFFFF0 == _ZSTD_SKIPPABLE:
            pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
            continue
        if magic != _ZSTD_MAGIC:
            raise ValueError(f"a zstd chunk holds no zstd frame at byte {pos}")
        fhd = data[pos + 4]
        fcs_flag, single_segment, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
        pos += 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
        size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
        if size == 0:
            raise ValueError("a zstd frame of the chunk declares no content size (Zarr always writes one)")
        total += int.from_bytes(data[pos : pos + size], "little") + (256 if size == 2 else 0)
        if total > limit:
            raise _refuse("zstd", f"declares {total}", limit)
        pos += size
        last = 0
        while not last:
            if pos + 3 > end:
                raise ValueError(f"a zstd chunk is cut short at byte {pos} of {end}")
            header = int.from_bytes(data[pos : pos + 3], "little")
            last, kind, block = header & 1, (header >> 1) & 3, header >> 3
            pos += 3 + (1 if kind == 1 else block)
        pos += 4 * checksum
    return total


def _refuse(codec: str, claimed: int, limit: int) -> ChunkTooLarge:
    return ChunkTooLarge(
        f"a {codec} chunk {claimed} bytes uncompressed, where its array's metadata allows at most "
        f"{limit} (a decompression bomb, or a damaged object)"
    )


def zstd_decode(data: bytes, limit: int) -> bytes:
    """Decode zstd ``data`` to at most ``limit`` bytes, checking the declared size first.

    Zarr (numcodecs) always writes the content size into each frame's header; a frame without
    one would be decoded by growing a buffer without bound, so it is refused. The decoder
    allocates the sum of the declared sizes and fails on a frame that decodes to more.
    """
    zstd_content_size(data, limit)
    return _zstd.decompress(data)


def gzip_decode(data: bytes, limit: int) -> bytes:
    """Decode gzip (or zlib) ``data``, every member, to at most ``limit`` bytes."""
    out, rest = [], bytes(data)
    total = 0
    while rest:
        d = zlib.decompressobj(47)  # 32 + 15: gzip or zlib header, detected
        try:
            part = d.decompress(rest, limit - total + 1)
        except zlib.error as exc:
            raise ValueError(f"a gzip chunk is damaged ({exc})") from None
        total += len(part)
        if total > limit or d.unconsumed_tail:
            raise _refuse("gzip", f"decodes to more than {limit}", limit)
        if not d.eof:
            raise ValueError("a gzip chunk is truncated")
        out.append(part)
        rest = d.unused_data
    return b"".join(out)


def blosc_decode(codec, data: bytes, limit: int) -> bytes:
    """Decode blosc ``data`` with ``codec`` (numcodecs) once its header's sizes are within bounds."""
    if len(data) < 16:
        raise ValueError(f"a blosc chunk is {len(data)} bytes, shorter than its 16-byte header")
    nbytes, cbytes, _ = _blosc._cbuffer_sizes(data)
    if nbytes > limit:
        raise _refuse("blosc", f"declares {nbytes}", limit)
    if cbytes != len(data):
        raise ValueError(f"a blosc chunk's header says {cbytes} bytes, the object holds {len(data)}")
    return codec.decode(data)


class BoundedZstdCodec(ZstdCodec):
    def _decode_sync(self, chunk_bytes, chunk_spec):
        limit = max_decoded_bytes(chunk_spec)
        return as_numpy_array_wrapper(lambda a: zstd_decode(a.tobytes(), limit), chunk_bytes, chunk_spec.prototype)


class BoundedGzipCodec(GzipCodec):
    def _decode_sync(self, chunk_bytes, chunk_spec):
        limit = max_decoded_bytes(chunk_spec)
        return as_numpy_array_wrapper(lambda a: gzip_decode(a.tobytes(), limit), chunk_bytes, chunk_spec.prototype)


class BoundedBloscCodec(BloscCodec):
    def _decode_sync(self, chunk_bytes, chunk_spec):
        limit = max_decoded_bytes(chunk_spec)
        return as_numpy_array_wrapper(
            lambda a: blosc_decode(self._blosc_codec, a.tobytes(), limit), chunk_bytes, chunk_spec.prototype
        )


BOUNDED = {"zstd": BoundedZstdCodec, "gzip": BoundedGzipCodec, "blosc": BoundedBloscCodec}


def install() -> None:
    """Make Zarr decode zstd, gzip and blosc chunks through the bounded codecs above."""
    for name, cls in BOUNDED.items():
        register_codec(name, cls)
    zarr.config.set({f"codecs.{name}": f"{cls.__module__}.{cls.__qualname__}" for name, cls in BOUNDED.items()})


install()
