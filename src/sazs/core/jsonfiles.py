"""Reading JSON that may come from someone else, within bounds.

:func:`json_depth` measures the nesting of JSON text without decoding it, in linear time
(the stores refuse metadata nested deeper than a few levels before parsing it).
:func:`read_json` reads a JSON file:
the size is checked on the file before a byte is read (at most ``max_bytes``, read as
``max_bytes + 1`` so a file that grows meanwhile is caught too); nesting is bounded while
decoding: Python's parser recurses once per level and stops at the interpreter's recursion
limit (~1000 levels), which is turned into the same one-line error as malformed JSON. A
decoded value then costs at most ~25 bytes of Python objects per byte of text.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))


def json_depth(data: bytes) -> int:
    """Deepest nesting of objects/arrays in JSON text, without decoding it; O(len(data)).

    A quote delimits a string unless an odd run of backslashes precedes it; brackets count
    outside strings only. (A regular expression over the strings backtracks quadratically on
    text such as ``"\\"\\"\\"...``.)
    """
    b = np.frombuffer(data, np.uint8)
    if not b.size:
        return 0
    quotes = np.flatnonzero(b == _QUOTE)
    toggles = np.zeros(b.size, np.uint8)
    if quotes.size:
        at = np.arange(b.size, dtype=np.int32 if b.size < 2**31 else np.int64)
        last_other = np.maximum.accumulate(np.where(b != _BACKSLASH, at, -1))
        before = quotes - 1
        run = np.where(before >= 0, before - last_other[np.maximum(before, 0)], 0)  # backslashes just before
        toggles[quotes[run % 2 == 0]] = 1
        del at, last_other
    outside = np.bitwise_xor.accumulate(toggles) == 0
    step = (np.isin(b, _OPEN) & outside).astype(np.int8) - (np.isin(b, _CLOSE) & outside).astype(np.int8)
    return int(np.cumsum(step, dtype=np.int32).max(initial=0))


def read_json(path: str | os.PathLike, *, max_bytes: int, what: str, fix: str, raise_with: str) -> Any:
    """The JSON value in ``path``; ValueError naming ``what`` (the file), the problem and ``fix``.

    ``raise_with`` names the bound's environment variable (``$SAZS_...``) in the too-large error.
    """
    size = os.stat(path).st_size
    if size > max_bytes:
        raise ValueError(
            f"{what} {path} is {size} bytes, more than the {max_bytes} sazs reads ({raise_with} raises it); {fix}"
        )
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{what} {path} grew past {max_bytes} bytes while being read; {fix}")
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); {fix}"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 JSON (byte {err.start}: {err.reason}); {fix}") from None
    except RecursionError:
        raise ValueError(f"{what} {path} nests arrays/objects too deeply (over ~1000 levels); {fix}") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"{what} {path} is not usable JSON ({str(err).split(';')[0][:120]}); {fix}") from None
