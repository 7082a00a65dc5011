"""Notice, without polling, when the running system is switched: the ``/run/current-system`` link.

``nixos-rebuild switch`` of the base system (or a hand-run ``test``) replaces the link while the
daemon runs; what is applied is then unknown, and the daemon must bring the wanted set back on
the new base. An inotify watch on the link itself (``IN_DONT_FOLLOW``) fires when the link is
replaced (its inode goes: ``IN_DELETE_SELF``/``IN_MOVE_SELF``/``IN_ATTRIB``) and nothing else, so
an idle daemon still has no wakeups; the watch is then put on the new link.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ._fdwatch import FdWatch, last_error, load_libc

log = logging.getLogger(__name__)

# <sys/inotify.h> (inotify(7)); the same values on every Linux architecture.
_IN_ATTRIB = 0x00000004
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_DONT_FOLLOW = 0x02000000
_IN_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC  # IN_NONBLOCK | IN_CLOEXEC
_MASK = _IN_ATTRIB | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_DONT_FOLLOW


class SystemSwitchWatch(FdWatch):
    """A descriptor that becomes readable when ``link`` is replaced; ``on_ready`` re-arms the
    watch and calls ``on_switch``. ``open`` returns None where that cannot be watched (no such
    link, no inotify): then a switch is noticed at the daemon's next start, as before."""

    def __init__(
        self, fd: int, libc: ctypes.CDLL, link: Path, on_switch: Callable[[], None]
    ) -> None:
        super().__init__(fd, libc)
        self.link = link
        self.on_switch = on_switch

    @classmethod
    def open(cls, link: Path, on_switch: Callable[[], None]) -> SystemSwitchWatch | None:
        libc = load_libc()
        if libc is None:
            return None
        try:
            fd = libc.inotify_init1(_IN_FLAGS)
        except AttributeError:
            return None
        if fd < 0:
            return None
        watch = cls(fd, libc, link, on_switch)
        if not watch._arm():
            watch.close()
            return None
        return watch

    def _arm(self) -> bool:
        if self._libc.inotify_add_watch(self._fd, os.fsencode(self.link), _MASK) < 0:
            log.info("cannot watch %s: %s", self.link, last_error())
            return False
        return True

    def on_ready(self, mask: int) -> None:
        try:
            while os.read(self._fd, 4096):  # the events say only "it changed": drain them
                pass
        except BlockingIOError:
            pass
        # The link is replaced by a rename, so the new one is already there; a watch on a path
        # that names the same inode again is harmless (inotify returns the same watch).
        self._arm()
        self.on_switch()
