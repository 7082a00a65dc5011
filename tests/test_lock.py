"""The apply lock: one holder, root only, named to a caller that must not wait and to `status`."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runtime_modules._errors import LockBusyError
from runtime_modules._lock import ApplyLock, holder_file, lock_holder


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


def test_only_root_may_open_the_lock_file_even_one_left_readable(tmp_path: Path) -> None:
    path = tmp_path / "apply.lock"
    path.touch(mode=0o644)
    lock = ApplyLock(path)
    assert lock.acquire(apply_id="a", command="x", wait=False)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(holder_file(path).stat().st_mode) == 0o644  # anyone may read who
    finally:
        lock.release()
    assert not holder_file(path).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")
def test_an_unprivileged_user_cannot_hold_off_applies(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = tmp_path / "apply.lock"
    first = ApplyLock(path)
    assert first.try_acquire()  # creates the file as an apply would
    first.release()
    grab = (
        "import fcntl, sys\n"
        "try:\n"
        f"    f = open({str(path)!r}, 'rb')\n"
        "    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)\n"
        "except OSError as e:\n"
        "    sys.exit(e.errno)\n"
    )
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable]
    result = subprocess.run([*argv, "-c", grab], check=False, timeout=30)
    assert result.returncode == errno.EACCES
    lock = ApplyLock(path)
    assert lock.acquire(apply_id="a", command="x", wait=False)
    lock.release()


def test_lock_holder_reads_the_kernel_table_without_taking_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "apply.lock"
    assert lock_holder(path) is None  # no file yet
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from runtime_modules._lock import ApplyLock;"
            f"l = ApplyLock(Path({str(path)!r})); l.acquire(apply_id='c1', command='child');"
            "print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        holder = lock_holder(path)
        assert holder is not None and holder.pid == child.pid and holder.apply_id == "c1"
        # Asking did not take the lock: a caller that must not wait still sees it busy, at once.
        with pytest.raises(LockBusyError, match=r"\(child\)"):
            ApplyLock(path).acquire(apply_id="a2", command="x", wait=False)
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    assert lock_holder(path) is None


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
