"""sd_notify(3): tell systemd that the daemon is ready, what it is doing, and that it is alive.

A datagram to ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading "@"). Outside
systemd the variable is unset and every call is a no-op, so the daemon needs no special case.
This is the whole protocol the daemon uses (READY=1, STATUS=, WATCHDOG=1, STOPPING=1); twenty
lines of socket code spare a dependency on libsystemd's behaviour for a message format that is
stable since systemd 209.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

# systemd truncates STATUS= for `systemctl status`; keep the line within what it shows usefully.
MAX_STATUS = 1024


class Notifier:
    """Sends sd_notify messages; ``watchdog_interval`` is half of ``WatchdogSec`` or None.

    systemd kills the service when no WATCHDOG=1 arrives within WatchdogSec; sd_watchdog_enabled(3)
    recommends pinging at half the period, which leaves room for one late loop iteration.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address: str | None = address if address.startswith(("/", "\0")) else None
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._status: str | None = None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one message of ``KEY=value`` lines; False when there is nobody to tell."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError as exc:  # systemd went away (or never was): nothing to do about it
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self._status = _one_line(status)
        self.send("READY=1", f"STATUS={self._status}")

    def status(self, text: str) -> None:
        """Update STATUS= when it changed (a message per event would cost a syscall each)."""
        line = _one_line(text)
        if line != self._status:
            self._status = line
            self.send(f"STATUS={line}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self._status = _one_line(status)
        self.send("STOPPING=1", f"STATUS={self._status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_STATUS]
