"""The control socket's server: framing, limits, slow and many clients, authorization.

Through a real Unix socket, with the fake handler and loop of tests/fixtures/control.py; the
clients are ``ControlClient``, raw sockets, or child processes with other credentials (setpriv).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime_modules._control_client import ControlClient
from runtime_modules._control_protocol import (
    MAX_REQUEST_BYTES,
    Accepted,
    Done,
    EnableRequest,
    EventMessage,
    EventsRequest,
    Progress,
    RebuildRequest,
    StatusRequest,
    StatusResponse,
)
from runtime_modules._control_server import ControlServer
from runtime_modules._errors import (
    ControlError,
    ExitCode,
    PermissionDeniedError,
    UnknownModuleError,
)
from tests.fixtures.control import FakeDaemon, Running, eventually, read_answers, status_works
from tests.fixtures.system import REPO

# --- requests and answers ------------------------------------------------------------------


def test_status_round_trip(running: Running) -> None:
    assert status_works(running)
    request, uid, _ = running.daemon.seen[0]
    assert isinstance(request, StatusRequest)
    assert uid == os.getuid()


def test_enable_streams_progress_until_done(running: Running) -> None:
    req = EnableRequest(modules=["gaming"], command="enable gaming --for 2h")
    answers = list(running.client().request(req))
    assert [a.type for a in answers] == ["accepted", "progress", "done"]
    assert isinstance(answers[1], Progress) and answers[1].lines == ["building"]
    done = answers[-1]
    assert isinstance(done, Done) and done.after == ["gaming"] and done.exit_code == ExitCode.OK
    # The override's source is the kernel's word for the uid, and the CLI's command line.
    assert running.daemon.seen[0][2] == "root (uid 0): enable gaming --for 2h"


def test_no_wait_returns_at_accepted_and_late_sends_are_harmless(running: Running) -> None:
    answers = list(running.client().request(EnableRequest(modules=["gaming"], wait=False)))
    assert [a.type for a in answers] == ["accepted"]
    time.sleep(0.2)  # the fake apply's progress and done go to a closed reply: no-ops
    assert running.daemon.replies[0].open is False
    assert status_works(running)


def test_half_closed_client_still_gets_its_answer(running: Running) -> None:
    s = running.raw()
    s.sendall(b'{"v": 1, "op": "enable", "modules": ["vm"]}')  # no newline, then EOF
    s.shutdown(socket.SHUT_WR)
    assert [a["type"] for a in read_answers(s)] == ["accepted", "progress", "done"]


def test_handler_errors_become_answers(running: Running) -> None:
    with pytest.raises(UnknownModuleError, match="did you mean 'gaming'"):
        running.client().call(EnableRequest(modules=["gamin"]))
    with pytest.raises(ControlError, match="the daemon failed on this request"):
        running.client().call(RebuildRequest())
    assert status_works(running)


@pytest.mark.parametrize(
    ("line", "code", "message"),
    [
        (b"{not json\n", "malformed", "not a JSON object"),
        (b"\xff\xfe\x00garbage\n", "malformed", "not a JSON object"),
        (b"[1, 2]\n", "malformed", "one JSON object"),
        (b"[" * 30000 + b"\n", "malformed", "not a JSON object"),  # deeper than json's recursion
        (b'{"op": "status"}\n', "unsupported-version", "is not supported"),
        (b'{"v": 2, "op": "status"}\n', "unsupported-version", "restart the daemon"),
        (b'{"v": 1, "op": "format-disk"}\n', "unknown-op", "one of: auto, disable"),
        (b'{"v": 1, "op": []}\n', "unknown-op", "unknown op []"),  # unhashable: no crash
        (b'{"v": 1, "op": {"a": 1}}\n', "unknown-op", "one of: auto, disable"),
        (b'{"v": 1, "op": "enable"}\n', "invalid", "enable: modules: Field required"),
        (b'{"v": 1, "op": "enable", "modules": ["a\\"${x}"]}\n', "invalid", "modules.0"),
        (b'{"v": 1, "op": "enable", "modules": []}\n', "invalid", "at least 1 item"),
        (b'{"v": 1, "op": "status", "sudo": true}\n', "invalid", "sudo: Extra inputs"),
        (b'{"v": 1, "op": "enable", "modules": ["vm"], "until": "18:00"}\n', "invalid", "until"),
    ],
)
def test_bad_requests_get_an_error_and_a_close(
    running: Running, line: bytes, code: str, message: str
) -> None:
    s = running.raw()
    s.sendall(line)
    answers = read_answers(s)
    assert len(answers) == 1
    assert answers[0]["type"] == "error" and answers[0]["code"] == code
    assert message in answers[0]["message"]
    assert status_works(running)


def test_a_bug_reached_by_one_client_drops_only_that_client(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stands in for any bug the next unchecked input finds (no real input does it now).
    import runtime_modules._control_server as server_module

    def broken(line: bytes) -> object:
        raise TypeError("a bug in parsing")

    monkeypatch.setattr(server_module, "parse_request", broken)
    s = running.raw()
    s.sendall(b'{"v": 1, "op": "status"}\n')
    assert read_answers(s) == []  # dropped without an answer
    monkeypatch.undo()
    assert status_works(running)  # and the loop still serves (the fixture checks it never died)


def test_oversized_line_is_refused(running: Running) -> None:
    s = running.raw()
    payload = b'{"v": 1, "op": "status", "modules": ["' + b"a" * (2 * MAX_REQUEST_BYTES)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(payload)  # the server may stop reading before the end: that is the point
    answers = read_answers(s)
    assert answers[0]["code"] == "too-large"
    assert status_works(running)


# --- slow, silent and many clients ---------------------------------------------------------


def test_silent_client_times_out_without_blocking_others(start: Callable[..., Running]) -> None:
    run = start(request_timeout=0.3)
    silent = run.raw()
    silent.sendall(b'{"v": 1, "op"')  # never finishes its line
    assert status_works(run)  # served while the silent one waits
    t0 = time.monotonic()
    answers = read_answers(silent)
    assert answers[0]["code"] == "timeout"
    assert time.monotonic() - t0 < 2.0
    # It got its answer but never closes: dropped after one more timeout, not kept forever.
    assert eventually(lambda: run.loop.call(lambda: run.server.client_count) == 0)


def test_subscriber_that_never_reads_is_dropped(start: Callable[..., Running]) -> None:
    run = start(max_output=64 * 1024)
    lazy = run.raw()
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.sendall(b'{"v": 1, "op": "events"}\n')
    reader = run.raw()
    reader.sendall(b'{"v": 1, "op": "events"}\n')
    assert json.loads(reader.makefile().readline())["type"] == "accepted"
    assert eventually(lambda: run.loop.call(lambda: run.server.subscribers) == 2)
    big = EventMessage(time=time.time(), kind="device", text="x" * 4000)
    received = [0]

    def read_all() -> None:
        f = reader.makefile("rb")
        while f.readline():
            received[0] += 1

    t = threading.Thread(target=read_all)
    t.start()
    for i in range(1, 401):  # 1.6 MB in all: far past the lazy client's 64 KiB bound
        run.loop.call(lambda: run.server.broadcast(big))
        if i % 10 == 0:
            # The reader keeps up (on a loaded machine its thread may lag: wait for it), so only
            # the lazy one ever has more than 64 KiB waiting.
            assert eventually(lambda n=i: received[0] >= n - 5)
        if i % 100 == 0:
            assert status_works(run)  # the daemon stays responsive meanwhile
    assert run.loop.call(lambda: run.server.subscribers) == 1  # the lazy one is gone
    reader.shutdown(socket.SHUT_WR)  # the reader leaves: its stream ends
    t.join(timeout=5)
    assert received == [400]  # the reading subscriber missed nothing
    reader.close()
    lazy.close()


def test_fifty_clients_at_once(running: Running) -> None:
    socks = [running.raw() for _ in range(50)]
    for s in socks:
        s.sendall(b'{"v": 1, "op": "status"}\n')
    for s in socks:
        answers = read_answers(s)
        assert [a["type"] for a in answers] == ["status"]
    # And fifty concurrent waiting applies, each getting its own stream.
    results: list[list[str]] = []

    def one() -> None:
        answers = running.client().request(EnableRequest(modules=["gaming"]))
        results.append([a.type for a in answers])

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [["accepted", "progress", "done"]] * 50


def test_too_many_clients_get_a_busy_answer(start: Callable[..., Running]) -> None:
    run = start(max_clients=5)
    held = [run.raw() for _ in range(5)]
    for s in held:
        s.sendall(b'{"v": 1, "op": "events"}\n')
    extra = run.raw()
    assert read_answers(extra)[0]["code"] == "server-busy"
    for s in [*held, extra]:
        s.close()
    assert eventually(lambda: run.loop.call(lambda: run.server.client_count) == 0)
    assert status_works(run)


# --- events --------------------------------------------------------------------------------


def test_events_reach_every_subscriber(running: Running) -> None:
    streams = [running.client().request(EventsRequest()) for _ in range(2)]
    firsts = [next(s) for s in streams]
    assert all(isinstance(f, Accepted) for f in firsts)
    event = EventMessage(time=1.0, kind="rule", text="rule dock: active (device /devices/x)")
    assert running.loop.call(lambda: running.server.broadcast(event)) == 2
    for s in streams:
        got = next(s)
        assert isinstance(got, EventMessage) and got.text == event.text
    running.loop.stop()  # the daemon stops: the stream ends with a clear error
    with pytest.raises(ControlError, match="closed the connection before the end of the event"):
        next(streams[0])


def test_broadcast_from_another_thread_is_refused(running: Running) -> None:
    with pytest.raises(RuntimeError, match="thread of its selector loop"):
        running.server.broadcast(EventMessage(time=1.0, kind="x", text="y"))


# --- the socket file and the client's errors -----------------------------------------------


def test_stale_socket_is_replaced_and_a_live_one_is_not(
    sock_dir: Path, start: Callable[..., Running]
) -> None:
    path = sock_dir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    run = start()
    assert status_works(run)
    assert (path.stat().st_mode & 0o777) == 0o666
    with pytest.raises(ControlError, match="another runtime-modules daemon is already running"):
        ControlServer(path, FakeDaemon()).open()
    assert status_works(run)


def test_a_busy_daemon_keeps_its_socket(sock_dir: Path) -> None:
    # A live daemon whose backlog is full (a stuck loop): the probe times out, and a timeout is
    # no proof that nobody listens. Only a refused connection is.
    path = sock_dir / "control.sock"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(path))
    busy.listen(0)
    inode = path.stat().st_ino
    queued = []
    try:
        for _ in range(8):  # fill the backlog (never accepted)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(str(path))
            except BlockingIOError:
                c.close()
                break
            queued.append(c)
        with pytest.raises(ControlError, match="another runtime-modules daemon is already running"):
            ControlServer(path, FakeDaemon()).open()
        assert path.stat().st_ino == inode  # not unlinked (and replaced)
    finally:
        for c in queued:
            c.close()
        busy.close()


def test_a_file_in_the_way_is_not_removed(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(path, FakeDaemon()).open()
    assert path.read_text() == "precious"


def test_watch_as_a_user_who_cannot_create_the_socket_is_told_what_to_do(
    sock_dir: Path,
) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running the daemon as nobody needs root and setpriv")
    rules = sock_dir / "rules.toml"
    rules.write_text("rule = []\n")
    root_owned = sock_dir / "root-owned"
    root_owned.mkdir(mode=0o755)
    stale = root_owned / "stale"
    stale.mkdir(mode=0o755)
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(stale / "control.sock"))  # a killed daemon's socket, that nobody may remove
    os.chmod(stale / "control.sock", 0o666)
    left.close()
    for state_dir in (root_owned / "new", root_owned, stale):
        proc = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
             "-m", "runtime_modules", "watch", "--dry-run", "--state-dir", str(state_dir),
             "--rules", str(rules), "--registry",
             str(REPO / "scripts" / "demo.d" / "registry.json")],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )  # fmt: skip
        assert proc.returncode == ExitCode.PERMISSION, proc.stderr
        assert proc.stderr == (
            f"runtime-modules: {state_dir / 'control.sock'}: cannot create the control socket "
            "(Permission denied): the daemon needs root (run it with sudo), or a state "
            "directory this user can write (--state-dir or RUNTIME_MODULES_STATE_DIR)\n"
        )
    assert sorted(p.name for p in root_owned.iterdir()) == ["stale"]


CLIENT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from runtime_modules._control_client import ControlClient
    from runtime_modules._control_protocol import PauseRequest, StatusRequest
    from runtime_modules._errors import RuntimeModulesError
    client = ControlClient(Path(sys.argv[1]), answer_timeout=5)
    out = {}
    for name, req in (("status", StatusRequest()), ("pause", PauseRequest(command="pause"))):
        try:
            out[name] = client.call(req).type
        except RuntimeModulesError as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
    """
)


def as_user(path: Path, *setpriv_args: str) -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.skip("running a client as another user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed (Debian package util-linux)")
    proc = subprocess.run(
        ["setpriv", *setpriv_args, sys.executable, "-c", CLIENT, str(path)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=30,
    )
    if proc.returncode != 0 and "Permission denied" in proc.stderr and "import" in proc.stderr:
        pytest.skip(f"nobody cannot run this Python: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, str] = json.loads(proc.stdout)
    return result


@pytest.fixture
def control_group() -> Iterator[tuple[str, int]]:
    """A temporary system group, deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("groupadd") is None:
        pytest.skip("creating a group needs root and groupadd (Debian package passwd)")
    name = f"rmt{uuid.uuid4().hex[:8]}"
    subprocess.run(["groupadd", "--system", name], check=True)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], check=False)


NOBODY = ("--reuid=nobody", "--regid=nogroup")


def test_unprivileged_client_reads_but_may_not_change(start: Callable[..., Running]) -> None:
    run = start()
    out = as_user(run.server.path, *NOBODY, "--clear-groups")
    assert out["status"] == "status"
    assert out["pause"].startswith("PermissionDeniedError: nobody (uid 65534) may not pause")
    assert "only root may change runtime modules; run it with sudo" in out["pause"]
    # The handler never saw the refused request.
    assert [type(r).__name__ for r, _, _ in run.daemon.seen] == ["StatusRequest"]


def test_control_group_members_may_change(
    start: Callable[..., Running], control_group: tuple[str, int]
) -> None:
    name, gid = control_group
    run = start(group=name)
    # A supplementary member, and a member by primary group: both allowed.
    out = as_user(run.server.path, *NOBODY, f"--groups={gid}")
    assert out == {"status": "status", "pause": "ok"}
    out = as_user(run.server.path, "--reuid=nobody", f"--regid={gid}", "--clear-groups")
    assert out == {"status": "status", "pause": "ok"}
    assert [uid for _, uid, _ in run.daemon.seen[-2:]] == [65534, 65534]
    assert run.daemon.seen[-1][2] == "nobody (uid 65534): pause"
    # Not a member: refused, and told which group would let them.
    out = as_user(run.server.path, *NOBODY, "--clear-groups")
    assert f"ask to be added to group {name!r}" in out["pause"]


def test_missing_control_group_means_root_only(start: Callable[..., Running]) -> None:
    run = start(group=f"rmt-missing-{uuid.uuid4().hex[:6]}")
    out = as_user(run.server.path, *NOBODY, "--clear-groups")
    assert out["pause"].startswith(PermissionDeniedError.__name__)
    assert "only root may change" in out["pause"]


# --- out of file descriptors ---------------------------------------------------------------

EMFILE_SERVER = textwrap.dedent(
    """
    import resource, selectors, sys, time
    from pathlib import Path
    from runtime_modules._control_protocol import StatusResponse
    from runtime_modules._control_server import ControlServer

    class Handler:
        def handle(self, request, reply):
            reply.send(StatusResponse(status={"modules": {"gaming": "disabled"}}))

    server = ControlServer(Path(sys.argv[1]), Handler())
    server.open()
    selector = selectors.DefaultSelector()
    server.register(selector)
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print("ready", flush=True)
    while True:
        wakeup = server.next_wakeup()
        timeout = None if wakeup is None else max(0.0, wakeup - time.monotonic())
        for key, mask in selector.select(timeout):
            key.data(mask)
        server.expire(time.monotonic())
    """
)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_out_of_descriptors_neither_spins_nor_stops_serving(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    child = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SERVER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    socks: list[socket.socket] = []
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for _ in range(40):  # more than 32 descriptors: accept() fails with EMFILE
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))  # queued by the kernel even when not accepted
            s.sendall(b'{"v": 1, "op": "events"}\n')
            socks.append(s)
        time.sleep(0.3)
        before = _cpu_seconds(child.pid)
        time.sleep(1.0)
        assert _cpu_seconds(child.pid) - before < 0.3  # waiting, not spinning on accept()
        for s in socks:
            s.close()
        answer = ControlClient(path, answer_timeout=5).call(StatusRequest())
        assert isinstance(answer, StatusResponse)
        assert child.poll() is None
    finally:
        for s in socks:
            s.close()
        child.kill()
        _, err = child.communicate()
    assert "cannot accept a client" in err and "Too many open files" in err
