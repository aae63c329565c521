"""Reading a JSON file that may come from someone else, within bounds.

The size is checked on the file before a byte is read (at most ``max_bytes``, read as
``max_bytes + 1`` so a file that grows meanwhile is caught too); nesting is bounded while
decoding: Python's parser recurses once per level and stops at the interpreter's recursion
limit (~1000 levels), which is turned into the same one-line error as malformed JSON. A
decoded value then costs at most ~25 bytes of Python objects per byte of text.
"""

from __future__ import annotations

import json
import os
from typing import Any


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
