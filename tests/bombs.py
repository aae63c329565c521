"""Decompression bombs for store chunks, built without ever holding what they decode to.

* :func:`zstd_bomb`: a zstd frame of RLE blocks (4 bytes per 128 KiB: 32 KB -> 1 GiB), with
  its content size in the header or without one;
* :func:`zstd_lie`: a 16-byte zstd frame whose header claims ``claim`` bytes (it holds none);
* :func:`gzip_bomb`: a gzip stream of ``nbytes`` zeros, compressed block by block (~1 MB/GiB);
* :func:`blosc_lie`: a valid blosc buffer whose header claims ``claim`` bytes;
* :func:`put_inner_chunk`: replace one inner chunk of a sharded array's shard object,
  rewriting the shard index (and its crc32c) so only the chunk's bytes are hostile.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

BLOCK = 128 << 10  # the largest zstd block
MAGIC = struct.pack("<I", 0xFD2FB528)


def zstd_bomb(nbytes: int, *, declare: bool = True) -> bytes:
    """A zstd frame that decodes to ``nbytes`` zero bytes, 4 bytes per 128 KiB block."""
    if declare:  # single segment, 8-byte content size
        header = MAGIC + bytes([0xE0]) + struct.pack("<Q", nbytes)
    else:  # no content size; a 128 KiB window
        header = MAGIC + bytes([0x00, 0x38])
    blocks, left = [], nbytes
    while left:
        size = min(BLOCK, left)
        left -= size
        last = 0 if left else 1
        blocks.append(((size << 3) | (1 << 1) | last).to_bytes(3, "little") + b"\x00")
    return header + b"".join(blocks)


def zstd_lie(claim: int) -> bytes:
    """16 bytes: a zstd frame header claiming ``claim`` bytes, then one empty last block."""
    return MAGIC + bytes([0xE0]) + struct.pack("<Q", claim) + (1).to_bytes(3, "little")


def gzip_bomb(nbytes: int) -> bytes:
    """A gzip stream of ``nbytes`` zeros, built 1 MiB at a time."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros, out, left = bytes(1 << 20), [], nbytes
    while left:
        n = min(len(zeros), left)
        out.append(c.compress(zeros[:n]))
        left -= n
    out.append(c.flush())
    return b"".join(out)


def blosc_lie(claim: int) -> bytes:
    """A blosc buffer of 64 zero bytes whose header claims ``claim`` uncompressed bytes."""
    from numcodecs import blosc

    data = bytearray(blosc.compress(bytes(64), b"zstd", 5, 1))
    struct.pack_into("<I", data, 4, claim)
    return bytes(data)


def blosc_bomb(nbytes: int) -> bytes:
    """A real blosc bomb: ``nbytes`` zeros compressed (this builds them, so keep it out of a measured process)."""
    from numcodecs import blosc

    return blosc.compress(np.zeros(nbytes, np.uint8), b"zstd", 9, 1)


def put_inner_chunk(shard: Path, num_chunks: int, index: int, data: bytes | None) -> None:
    """Replace inner chunk ``index`` of the shard object ``shard`` (index at the end, with crc32c);
    None drops it (it reads back as the fill value)."""
    import google_crc32c

    raw = shard.read_bytes()
    table = np.frombuffer(raw[-(16 * num_chunks + 4) : -4], "<u8").reshape(num_chunks, 2).copy()
    chunks = [raw[int(o) : int(o) + int(n)] if int(o) != 2**64 - 1 else None for o, n in table]
    chunks[index] = data
    body, offset = [], 0
    for i, chunk in enumerate(chunks):
        if chunk is None:
            table[i] = (2**64 - 1, 2**64 - 1)
            continue
        table[i] = (offset, len(chunk))
        body.append(chunk)
        offset += len(chunk)
    index_bytes = table.astype("<u8").tobytes()
    shard.write_bytes(b"".join(body) + index_bytes + struct.pack("<I", google_crc32c.value(index_bytes)))
