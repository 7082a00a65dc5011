"""The control socket's client: its errors when no daemon, a hung one, or a newer one answers.

Each test stands a bare socket in for the daemon, so what is checked is the client alone.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from runtime_modules._control_client import ControlClient
from runtime_modules._control_protocol import Ok, PauseRequest, StatusRequest
from runtime_modules._errors import ControlError, ExitCode, NoDaemonError


def test_no_daemon_is_a_clear_error(sock_dir: Path) -> None:
    with pytest.raises(NoDaemonError, match=r"no daemon is running: .* does not exist") as err:
        ControlClient(sock_dir / "control.sock").call(StatusRequest())
    assert err.value.exit_code == ExitCode.NO_DAEMON
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_dir / "control.sock"))
    stale.close()  # a socket file nobody listens on: a killed daemon's
    with pytest.raises(NoDaemonError, match="nothing listens on"):
        ControlClient(sock_dir / "control.sock").call(StatusRequest())
    assert ControlClient(sock_dir / "control.sock").available() is False


def test_hung_daemon_times_out(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(path))
    hung.listen()  # accepts (in the kernel) but never answers
    try:
        with pytest.raises(ControlError, match=r"did not answer within 0\.3 s"):
            ControlClient(path, answer_timeout=0.3).call(StatusRequest())
    finally:
        hung.close()


def test_client_skips_answers_it_does_not_know(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newer.bind(str(path))
    newer.listen()

    def serve() -> None:
        conn, _ = newer.accept()
        conn.recv(4096)
        conn.sendall(b'{"v": 1, "type": "hologram"}\n{"v": 1, "type": "ok", "future": 1}\n')
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert isinstance(ControlClient(path).call(PauseRequest()), Ok)
    finally:
        t.join()
        newer.close()


# --- authorization with real credentials ---------------------------------------------------
