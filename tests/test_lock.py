"""The apply lock: one holder, named to a caller that must not wait; `status` never blocks it."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from runtime_modules._errors import LockBusyError
from runtime_modules._lock import ApplyLock, lock_holder


def test_a_second_holder_is_refused_and_told_who_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "apply.lock"
    first = ApplyLock(path)
    assert first.acquire(apply_id="a1", command="runtime-modules enable gaming")
    try:
        with pytest.raises(LockBusyError, match=r"pid \d+ \(runtime-modules enable gaming\)"):
            ApplyLock(path).acquire(apply_id="a2", command="x", wait=False)
        holder = lock_holder(path)
        assert holder is not None and holder.apply_id == "a1" and holder.pid == os.getpid()
    finally:
        first.release()
    assert lock_holder(path) is None


def test_a_status_looking_at_the_lock_does_not_make_a_no_wait_apply_fail(tmp_path: Path) -> None:
    """`lock_holder` takes a shared lock for a moment; hold one exactly as it does meanwhile."""
    path = tmp_path / "apply.lock"
    path.touch()
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    timer = threading.Timer(0.03, os.close, (fd,))  # a status lasts far less than 30 ms
    timer.start()
    lock = ApplyLock(path)
    try:
        assert lock.acquire(apply_id="a", command="x", wait=False)
    finally:
        timer.join()
        lock.release()


def test_cancel_stops_the_wait(tmp_path: Path) -> None:
    path = tmp_path / "apply.lock"
    first = ApplyLock(path)
    first.acquire(apply_id="a1", command="x")
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    try:
        assert not ApplyLock(path).acquire(apply_id="a2", command="y", cancel=cancel)
    finally:
        first.release()
