"""What the daemon's kernel-descriptor watches share: libc through ctypes, one non-blocking fd.

``_clocks.WallClockWatch`` (a timerfd) and ``_system_watch.SystemSwitchWatch`` (an inotify fd)
each add what they watch for; the selector loop only needs ``fileno`` and their ``on_ready``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os


def load_libc() -> ctypes.CDLL | None:
    """The C library with errno kept, or None where ctypes cannot load it."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def last_error() -> str:
    return os.strerror(ctypes.get_errno())


class FdWatch:
    """Owns one descriptor made by a libc call; ``close`` is safe to call twice."""

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self._fd = fd
        self._libc = libc

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
