"""The apply lock: one apply at a time on this machine, across the CLI and the daemon.

An ``fcntl.flock`` on ``<state dir>/apply.lock``, a file only root may open (0600): a shared lock
needs only read access, so a readable lock file would let any user hold off every apply. The
holder writes who it is into ``apply.lock.holder`` (0644), so a caller that must not wait, or a
``status`` of any user, can name it; whether the lock is held is read from ``/proc/locks``, never
by taking the lock. The kernel drops the lock when the last descriptor closes:
the applier hands its descriptor to ``nixos-rebuild`` too, so a rebuild orphaned by a killed
applier keeps the machine locked until it ends (or until recovery kills it), and no second rebuild
can start beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ._errors import LockBusyError, PermissionDeniedError, StateError
from ._state import state_dir_problem

# How often a waiting caller retries: short enough that a queued `enable` starts at once in human
# terms, long enough to cost nothing. Polling (not a blocking flock) lets a cancel stop the wait.
POLL_INTERVAL = 0.05
WAIT_CHECK_INTERVAL = 1.0  # how often a waiter looks for a holder that died (see Applier)
_MAX_HOLDER_BYTES = 4096  # we write ~150 bytes; more is not ours


@dataclass(frozen=True, slots=True)
class LockHolder:
    pid: int
    command: str
    apply_id: str
    since: float  # wall time

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.since, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        return f"pid {self.pid} ({self.command}), apply {self.apply_id}, since {when}"


def holder_file(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder")


def read_holder(path: Path) -> LockHolder | None:
    """Who took the lock at ``path`` last (meaningful only while the lock is held)."""
    try:
        with holder_file(path).open("rb") as f:
            data = json.loads(f.read(_MAX_HOLDER_BYTES))
        return LockHolder(
            pid=int(data["pid"]),
            command=str(data["command"]),
            apply_id=str(data["apply_id"]),
            since=float(data["since"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ApplyLock:
    """The exclusive apply lock. Use ``acquire`` and ``release`` (or ``with``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        """The locked descriptor, to hand to child processes that must keep the lock."""
        if self._fd is None:
            raise RuntimeError("the apply lock is not held")
        return self._fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError:
            raise PermissionDeniedError(
                f"{self.path}: changing modules needs root (the apply lock is root's); "
                "run the command with sudo"
            ) from None
        except OSError as exc:
            raise StateError(
                f"{self.path}: cannot open the apply lock: {exc.strerror}; "
                f"{state_dir_problem(exc, self.path)}"
            ) from None
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o600)  # a lock file left readable by an older version
        return fd

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        if self._fd is not None:
            raise RuntimeError("the apply lock is already held by this object")
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def acquire(
        self,
        *,
        apply_id: str,
        command: str,
        wait: bool = True,
        cancel: threading.Event | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> bool:
        """Take the lock and write the holder; False only when ``cancel`` was set while waiting.

        Raises LockBusyError naming the holder when the lock is taken and ``wait`` is False.
        ``while_waiting`` is called about once a second while the lock is busy.
        """
        next_check = time.monotonic() + WAIT_CHECK_INTERVAL
        while not self.try_acquire():
            if wait and while_waiting is not None and time.monotonic() >= next_check:
                while_waiting()
                next_check = time.monotonic() + WAIT_CHECK_INTERVAL
            if not wait:
                holder = read_holder(self.path)
                who = holder.describe() if holder else "another process (holder unknown)"
                raise LockBusyError(
                    f"another apply is running: {who}; wait for it (drop --no-wait) "
                    "or see `runtime-modules status`"
                )
            if cancel is not None:
                if cancel.wait(POLL_INTERVAL):
                    return False
            else:
                time.sleep(POLL_INTERVAL)
        self._write_holder(apply_id, command)
        return True

    def _write_holder(self, apply_id: str, command: str) -> None:
        record = {
            "pid": os.getpid(),
            "command": command,
            "apply_id": apply_id,
            "since": time.time(),
        }
        data = json.dumps(record).encode() + b"\n"
        # Best effort: a full disk must not stop an apply that can otherwise run.
        with contextlib.suppress(OSError):
            fd = os.open(
                holder_file(self.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
            )
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            holder_file(self.path).unlink()
        os.close(fd)  # the flock goes with the last descriptor

    def __enter__(self) -> ApplyLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(path: Path) -> LockHolder | None:
    """Who holds the apply lock right now, or None when it is free; never touches the lock.

    Anyone may ask (``status`` of an unprivileged user): the lock file is only stat'ed and the
    kernel's table of locks read.
    """
    if not _is_locked(path):
        return None
    return read_holder(path) or LockHolder(pid=0, command="?", apply_id="?", since=0.0)


def _is_locked(path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    # /proc/locks names a lock's file as "MAJOR:MINOR:INODE", device numbers in hex (proc(5)).
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            return any("FLOCK" in line and key in line.split() for line in f)
    except OSError:  # no /proc: say what the holder file says
        return holder_file(path).exists()
