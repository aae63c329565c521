"""Who wrote it: the user name recorded in manifests, locks and published summaries."""

from __future__ import annotations

import getpass
import os


def user_name() -> str:
    """The login name; the numeric uid where there is none (containers without a passwd entry)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
