"""Processes and process groups, as /proc and the kernel see them (not about any lock).

A pid alone does not name a process (pids are reused); a pid with its start time does. A group's
members are found in /proc, so that zombies, which run nothing and hold nothing, do not count.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["group_alive", "kill_group", "process_alive", "process_start_time"]


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ")".
    return stat.rsplit(")", 1)[-1].split()


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None when it does not exist.

    Pids are reused; a pid together with its start time names one process (proc(5), field 22).
    """
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start_time: int | None) -> bool:
    """True when the process ``pid`` that started at ``start_time`` still runs (not a zombie)."""
    fields = _stat_fields(pid)  # one read: state and start time of the same process
    if not fields or len(fields) < 20:
        return False
    if start_time is not None and fields[19] != str(start_time):
        return False
    return fields[0] != "Z"


def group_alive(pgid: int) -> bool:
    """True when a process (not a zombie) is left in process group ``pgid``.

    Zombies count as members for the kernel until their parent reaps them; an orphan's parent
    is init, which may take a while (a container's init reaps about once a second), and a
    zombie holds no descriptor (no lock) and runs nothing.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[-1].split()
        except OSError:
            continue
        # After the command name: state (field 3), ppid (4), pgrp (5); proc(5).
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            return True
    return False


def kill_group(
    pgid: int,
    *,
    wait: float = 0.0,
    term_first: bool = False,
    leader: subprocess.Popen[bytes] | None = None,
) -> None:
    """Kill process group ``pgid`` (SIGTERM first with ``term_first``) and wait it out.

    SIGKILL follows after ``wait`` s for whatever is left. ``leader`` is reaped while waiting:
    our own child would otherwise linger as a zombie and keep the group alive in the kernel's eyes.
    """
    sig = signal.SIGTERM if term_first else signal.SIGKILL
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()
        if not group_alive(pgid):
            return
        time.sleep(0.02)
    if term_first and group_alive(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def seconds_text(value: float) -> str:
    """A duration for messages: "90 s", "30 min"."""
    if value >= 120:
        return f"{value / 60:.0f} min"
    return f"{value:g} s"


def describe_end(
    name: str,
    *,
    returncode: int | None,
    timed_out: bool = False,
    cancelled: bool = False,
    error: str | None = None,
    timeout: float = 0.0,
) -> str:
    """How a child command ended, in one phrase: the rebuild's, an activation's, a hook's."""
    if error is not None and returncode is not None:
        return f"{name} ended, but {error}"
    if error is not None:
        return f"{name} could not be started: {error}"
    if timed_out:
        return f"{name} timed out after {seconds_text(timeout)} and was killed"
    if cancelled:
        return f"{name} was stopped on request"
    if returncode is not None and returncode < 0:
        try:
            return f"{name} was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:  # a real-time signal has no name
            return f"{name} was killed by signal {-returncode}"
    return f"{name} exited with status {returncode}"
