"""argparse types that check a number where it is typed, shared by the four console scripts.

``type=float`` accepts "nan", "inf" and "1e300", and ``type=int`` any size, so a value that
makes no sense would travel into a run and fail (or worse, not fail) much later. Every
numeric flag of sazs-priors, sazs-store, sazs-train and sazs-eval is parsed with
:func:`number` (a finite float in a range) or :func:`at_least` (an integer in a range): a bad
value ends the command at once with argparse's usage line and exit 2, naming the flag, the
value and the range.
"""

from __future__ import annotations

import argparse
import math


def at_least(lo: int, hi: int | None = None):
    """argparse type: an integer >= lo (and <= hi when given)."""
    span = f">= {lo}" if hi is None else f"in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer {span}")
        return value

    return parse


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite float in [lo, hi] (an end open where asked); never nan or inf."""
    span = f"{'(' if lo_open or lo == -math.inf else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (
            math.isfinite(value)
            and (value > lo if lo_open else value >= lo)
            and (value < hi if hi_open else value <= hi)
        )
        if not ok:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a finite number in {span}")
        return value

    return parse
