"""The single-writer lock of a prior store: a ``.sazs-lock`` file at the store root.

``StoreWriter.open`` takes the lock (create and resume) and ``StoreWriter.close`` gives it
back, so two jobs never write one store at once (the second is refused with the first's
owner, pid, host and age). The file is created with ``O_CREAT | O_EXCL``, which is atomic
on local disks and on NFSv3+, and holds JSON::

    {"owner": "user@host", "host": ..., "pid": ..., "started": ISO time, "command": ...,
     "heartbeat": ISO time, "token": random hex}

The heartbeat is rewritten whenever a shard is written, so across hosts the age of the
heartbeat tells a live job from a dead one; on the lock's own host a pid that is not
running marks the lock *stale*. A stale lock is reported, never taken over silently:
taking over is explicit (``take_over=True`` / ``--take-over-lock``, or ``break_lock`` for
``sazs-store unlock``). The token lets a writer notice that its lock was taken over and
stop, and keeps it from deleting the new owner's lock when it closes.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import stat
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from sazs.core.console import disk_error_message
from sazs.core.files import write_atomic
from sazs.core.host import user_name
from sazs.core.limits import MAX_JSON_BYTES

from .format import LOCK_FILE, StoreError
from .schema import parse_json

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _command_line() -> str:
    """This process's command line, e.g. ``python -m sazs.pipeline run --limit 3``."""
    argv = list(sys.argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and argv:  # started with -m: argv[0] is the path of __main__.py
        argv[0] = f"python -m {spec.name.removesuffix('.__main__')}"
    elif argv:
        argv[0] = Path(argv[0]).name
    return " ".join(argv)


def lock_path(store: str | Path) -> Path:
    return Path(store) / LOCK_FILE


def read_lock(store: str | Path) -> dict | None:
    """The lock's JSON, ``{}`` if the file exists but cannot be parsed, None if unlocked."""
    try:
        if not stat.S_ISREG(os.stat(lock_path(store)).st_mode):
            return {}  # a FIFO would block the read forever: an unreadable lock
        with open(lock_path(store), "rb") as f:
            text = f.read(MAX_JSON_BYTES + 1).decode(errors="replace")
    except FileNotFoundError:
        return None
    return _parse_lock(text)


def _parse_lock(text: str) -> dict:
    try:
        info = parse_json(text.encode(), LOCK_FILE)  # bounded: a lock file is untrusted too
    except StoreError:
        return {}  # crashed between O_EXCL create and write, or not ours
    return info if isinstance(info, dict) else {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(info: dict) -> bool:
    """True when the lock was taken on this host by a process that is no longer running.

    (A lock from another host is never called stale: its pid means nothing here; its
    heartbeat age is shown instead.)
    """
    pid = info.get("pid")
    return info.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def _age(iso: str | None) -> str:
    try:
        then = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return "an unknown time"
    s = max(0, int((datetime.now(UTC) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def describe(info: dict) -> str:
    """``root@host pid 123 since 2m ago (last heartbeat 5s ago; command: ...)``."""
    if "pid" not in info:
        return "an unreadable lock file"
    pid = info.get("pid", "?")
    text = f"{info.get('owner', '?')} pid {pid} since {_age(info.get('started'))}"
    details = [f"last heartbeat {_age(info.get('heartbeat'))}"]
    if pid == os.getpid() and info.get("host") == socket.gethostname():
        details.insert(0, "this process")
    if info.get("command"):
        details.append(f"command: {info['command']}")
    return f"{text} ({'; '.join(details)})"


def locked_message(store: str | Path, info: dict) -> str:
    hint = f"if that process is gone, take the lock over with --take-over-lock / `sazs-store unlock {store}`"
    if not info:
        return f"{store} is locked ({LOCK_FILE} exists but cannot be read); {hint}"
    if is_stale(info):
        return (
            f"{store} has a stale lock: locked by {describe(info)}, stale (process {info['pid']} is not "
            f"running); take the lock over with --take-over-lock / `sazs-store unlock {store}`"
        )
    return f"{store} is locked by {describe(info)}; {hint}"


class StoreLock:
    """A held lock; ``release()`` removes the file if it is still this holder's."""

    def __init__(self, store: Path, info: dict):
        self.store = store
        self.info = info
        self._mutex = threading.Lock()  # shards may be written from several threads (merge)

    @property
    def path(self) -> Path:
        return lock_path(self.store)

    def owned(self) -> bool:
        current = read_lock(self.store)
        return bool(current) and current.get("token") == self.info["token"]

    def heartbeat(self) -> None:
        """Refresh the heartbeat; raise StoreError if another writer took the lock over."""
        with self._mutex:
            current = read_lock(self.store)
            if not current or current.get("token") != self.info["token"]:
                by = locked_message(self.store, current) if current is not None else f"{LOCK_FILE} was removed"
                raise StoreError(
                    f"this writer lost the lock of {self.store} ({by}); stopping so that two "
                    "writers never write one store"
                )
            self.info = {**self.info, "heartbeat": _now()}
            # A whole new file renamed over the old one: readers never see half a lock.
            write_atomic(self.path, json.dumps(self.info, indent=1).encode())

    def release(self) -> None:
        if self.owned():
            self.path.unlink(missing_ok=True)
            log.debug("released the lock of %s", self.store)
        else:
            log.warning("the lock of %s is no longer this writer's; leaving it in place", self.store)

    def __repr__(self) -> str:
        return f"StoreLock({str(self.store)!r}, pid={self.info['pid']})"


def acquire_lock(store: str | Path, *, take_over: bool = False, command: str | None = None) -> StoreLock:
    """Take the lock of ``store`` (its directory is created if needed) or raise StoreError.

    With ``take_over`` an existing lock (stale or not) is removed first and its holder is
    logged; that holder notices at its next shard and stops.
    """
    store = Path(store)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _disk_error(exc, store) from None
    host = socket.gethostname()
    info = {
        "owner": f"{user_name()}@{host}",
        "host": host,
        "pid": os.getpid(),
        "started": _now(),
        "command": command if command is not None else _command_line(),
        "heartbeat": _now(),
        "token": secrets.token_hex(8),
    }
    if take_over:
        old = break_lock(store)
        if old is not None:
            log.warning("took over the lock of %s from %s", store, describe(old))
    for attempt in range(3):
        try:
            fd = os.open(lock_path(store), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            held = read_lock(store)
            if held == {}:  # just created by another writer, its JSON not written yet
                time.sleep(0.1)
                held = read_lock(store)
            if held is not None or attempt == 2:
                raise StoreError(locked_message(store, held or {})) from None
            # released between our open and read: try again
        except OSError as exc:
            raise _disk_error(exc, store) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info, indent=1))
    except OSError as exc:
        lock_path(store).unlink(missing_ok=True)  # ours, and unreadable: leave no lock behind
        raise _disk_error(exc, store) from None
    log.debug("locked %s (pid %d)", store, info["pid"])
    return StoreLock(store, info)


def _disk_error(exc: OSError, store: Path) -> OSError | StoreError:
    """A full or read-only disk as a StoreError naming the store and the fix; other errors as they are."""
    msg = disk_error_message(exc, lock_path(store))
    return StoreError(msg) if msg else exc


def break_lock(store: str | Path) -> dict | None:
    """Remove the lock of ``store`` whoever holds it; returns its info, or None if unlocked.

    The info of an unreadable lock file is ``{"raw": <its first 200 characters>}``.
    """
    path = lock_path(store)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    info = _parse_lock(text)
    return info if info else {"raw": text[:200]}
