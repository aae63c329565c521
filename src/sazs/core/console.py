"""How every sazs command ends: bad input → a one-line message and exit 2, Ctrl-C → 130.

All four console scripts (`sazs-priors`, `sazs-store`, `sazs-train`, `sazs-eval`) dispatch
their subcommand through :func:`run_command`, so they agree on exit codes and on when a
traceback is shown (only with ``-v``), and set up logging the same way (:func:`setup_logging`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

# Errors that mean "the input is wrong": their messages name the input and the fix.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)

# Errors of the disk or directory, not of the program: full, or not writable.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def disk_error_message(exc: OSError, path=None) -> str | None:
    """One line naming the path and the fix for a full or read-only disk; None for other errors."""
    if exc.errno in _DISK_FULL:
        fix = (
            "free space there or write to another disk, then re-run the same command "
            "(finished work is kept and resumed)"
        )
    elif exc.errno in _NOT_WRITABLE:
        fix = (
            "it is read-only or not writable by you: choose a writable output path (--out / OUT=) "
            "or fix its permissions"
        )
    else:
        return None
    where = exc.filename or path or "the output"
    return f"cannot write {where}: {exc.strerror or exc}; {fix}"


def setup_logging(verbose: bool, *, level: int = logging.INFO) -> None:
    """Timestamped log lines on stderr at ``level`` for other libraries; ``sazs`` at INFO, DEBUG with -v."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    logging.getLogger("sazs").setLevel(logging.DEBUG if verbose else logging.INFO)


def run_command(
    prog: str,
    args: argparse.Namespace,
    *,
    user_errors: tuple[type[BaseException], ...] = (),
    codes: dict[type[BaseException], int] | None = None,
    interrupted: str = "interrupted",
) -> int:
    """Run ``args.func(args)``; expected errors become a message and an exit code.

    ``codes`` maps exception types to their own exit codes (always printed, never
    re-raised); everything in USER_ERRORS + ``user_errors``, and an OSError of a full or
    read-only disk (:func:`disk_error_message`), exits 2, with the traceback kept when
    ``args.verbose`` is set.
    """
    codes = codes or {}
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except (*codes, *USER_ERRORS, *user_errors) as exc:
        code = next((c for kind, c in codes.items() if isinstance(exc, kind)), 2)
        if code == 2 and getattr(args, "verbose", False):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return code
    except OSError as exc:  # a full or read-only disk: the fix is the user's, not a bug
        msg = disk_error_message(exc)
        if msg is None or getattr(args, "verbose", False):
            raise
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
