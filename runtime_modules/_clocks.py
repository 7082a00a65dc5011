"""The daemon's two clocks: CLOCK_BOOTTIME for its decisions, the wall clock for the user's.

Rules' settle and linger, the quiet period and backoff run on CLOCK_BOOTTIME: monotonic, and
counting suspend, so that a linger of 30 s is over after a laptop slept for an hour. Pins end at
wall-clock moments ("until 18:00"), which the daemon converts onto CLOCK_BOOTTIME when it hands
them to the reconciler; the conversion holds until someone sets the wall clock (NTP stepping it
at boot, a manual change). ``WallClockWatch`` says when that happens, without polling: a Linux
timerfd armed with ``TFD_TIMER_CANCEL_ON_SET`` becomes readable when CLOCK_REALTIME is set
(timerfd_create(2)). Suspend moves both clocks alike and needs no conversion.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from collections.abc import Callable

from ._fdwatch import FdWatch, last_error, load_libc

__all__ = ["WallClockWatch", "boottime"]

log = logging.getLogger(__name__)


def boottime() -> float:
    """CLOCK_BOOTTIME seconds: monotonic, and counting suspend (see the module docstring)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# <sys/timerfd.h> and <time.h> on Linux (all architectures use these values).
_CLOCK_REALTIME = 0
_TFD_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC  # TFD_NONBLOCK | TFD_CLOEXEC
_TFD_TIMER_ABSTIME = 1
_TFD_TIMER_CANCEL_ON_SET = 2
# The timer itself never needs to expire: only its cancellation matters. Ten years ahead is far
# past any daemon's life and far from overflowing a 64-bit time_t.
_FAR = 10 * 365 * 24 * 3600


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class WallClockWatch(FdWatch):
    """A descriptor that becomes readable when the wall clock is set; ``on_ready`` re-arms it
    and calls ``on_set``. ``open`` returns None where timerfd is not available (then the caller
    notices a jump only at its next wakeup)."""

    def __init__(self, fd: int, libc: ctypes.CDLL, on_set: Callable[[], None]) -> None:
        super().__init__(fd, libc)
        self.on_set = on_set

    @classmethod
    def open(cls, on_set: Callable[[], None]) -> WallClockWatch | None:
        libc = load_libc()
        if libc is None:
            return None
        try:
            fd = libc.timerfd_create(_CLOCK_REALTIME, _TFD_FLAGS)
        except AttributeError:
            return None
        if fd < 0:
            log.info("no timerfd: wall clock changes are noticed at the next wakeup only")
            return None
        watch = cls(fd, libc, on_set)
        if not watch._arm():
            watch.close()
            return None
        return watch

    def _arm(self) -> bool:
        spec = _Itimerspec()
        spec.it_value.tv_sec = int(time.time()) + _FAR
        flags = _TFD_TIMER_ABSTIME | _TFD_TIMER_CANCEL_ON_SET
        if self._libc.timerfd_settime(self._fd, flags, ctypes.byref(spec), None) != 0:
            log.info("timerfd_settime: %s", last_error())
            return False
        return True

    def on_ready(self, mask: int) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.ECANCELED:  # ECANCELED is the news: the clock was set
                raise
        self._arm()
        self.on_set()
