"""How every sazs command ends: bad input → a one-line message and exit 2, Ctrl-C → 130.

All four console scripts (`sazs-priors`, `sazs-store`, `sazs-train`, `sazs-eval`) dispatch
their subcommand through :func:`run_command`, so they agree on exit codes and on when a
traceback is shown (only with ``-v``). It lives in ``stores`` because that is the package
every other one already depends on.
"""

from __future__ import annotations

import argparse
import sys

# Errors that mean "the input is wrong": their messages name the input and the fix.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


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
    re-raised); everything in USER_ERRORS + ``user_errors`` exits 2, with the traceback
    kept when ``args.verbose`` is set.
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
