"""The control socket: a real Unix socket, a fake handler, and a tiny selector loop of our own.

The loop runs in a thread (as the daemon's would), the clients in the test's thread or in child
processes with other credentials (setpriv), so every byte crosses a real socket.
"""

from __future__ import annotations

import contextlib
import grp
import heapq
import itertools
import json
import os
import queue
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime_modules._control import (
    MAX_REQUEST_BYTES,
    Accepted,
    AutoRequest,
    ControlClient,
    ControlServer,
    DisableRequest,
    Done,
    EnableRequest,
    ErrorResponse,
    EventMessage,
    EventsRequest,
    Ok,
    PauseRequest,
    Progress,
    RebuildRequest,
    Reply,
    Request,
    ResumeRequest,
    StatusRequest,
    StatusResponse,
    _parse_request,
)
from runtime_modules._errors import (
    ControlError,
    ExitCode,
    NoDaemonError,
    PermissionDeniedError,
    UnknownModuleError,
)

REPO = Path(__file__).resolve().parents[1]
KNOWN = {"gaming", "vm", "failing"}


# --- harness -------------------------------------------------------------------------------


class Loop:
    """A minimal daemon loop: the selector, timers, and calls posted from other threads."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.selector = selectors.DefaultSelector()
        self._posted: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[BaseException] = []

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop after ``delay`` seconds (call from the loop thread)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop soon (call from any thread)."""
        self._posted.put(fn)
        os.write(self._w, b"x")

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the loop and return its result."""
        done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.post(lambda: done.put(fn()))
        return done.get(timeout=5)

    def _run(self) -> None:
        self.server.register(self.selector)
        self.selector.register(self._r, selectors.EVENT_READ, self._drain)
        try:
            while not self._stop:
                now = time.monotonic()
                wakeups = [w for w in (self.server.next_wakeup(),) if w is not None]
                if self._timers:
                    wakeups.append(self._timers[0][0])
                timeout = max(0.0, min(wakeups) - now) if wakeups else None
                for key, mask in self.selector.select(timeout):
                    key.data(mask)
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    heapq.heappop(self._timers)[2]()
                self.server.expire(now)
        except BaseException as exc:  # surfaced by the fixture: a loop crash fails the test
            self.errors.append(exc)
            raise

    def _drain(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        while True:
            try:
                fn = self._posted.get_nowait()
            except queue.Empty:
                return
            fn()

    def stop(self) -> None:
        if self._stop:
            return

        def halt() -> None:
            self._stop = True

        self.post(halt)
        self.thread.join(timeout=5)
        self._stop = True
        self.server.close()
        os.close(self._r)
        os.close(self._w)


@dataclass
class FakeDaemon:
    """The handler: answers the way the daemon will, on a timer instead of a real apply."""

    loop: Loop | None = None
    seen: list[tuple[Request, int, str]] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    apply_delay: float = 0.05

    def handle(self, request: Request, reply: Reply) -> None:
        self.seen.append((request, reply.peer.uid, str(reply.source())))
        if isinstance(request, StatusRequest):
            reply.send(StatusResponse(status={"modules": {m: "disabled" for m in sorted(KNOWN)}}))
        elif isinstance(request, EnableRequest | DisableRequest | AutoRequest | ResumeRequest):
            modules = getattr(request, "modules", [])
            for name in modules:
                if name not in KNOWN:
                    raise UnknownModuleError(f"unknown module {name!r}; did you mean 'gaming'?")
            self.replies.append(reply)
            reply.send(Accepted(apply_id="apply-1", message="applying"))
            assert self.loop is not None
            self.loop.later(
                self.apply_delay,
                lambda: reply.send(Progress(apply_id="apply-1", lines=["building"], elapsed=0.05)),
            )
            failing = "failing" in modules
            done = Done(
                apply_id="apply-1",
                ok=not failing,
                result="rolled-back" if failing else "succeeded",
                before=[],
                after=[] if failing else list(modules),
                message="nixos-rebuild failed; rolled back" if failing else "gaming is on",
                duration=0.1,
                exit_code=ExitCode.FAILURE if failing else ExitCode.OK,
            )
            self.loop.later(2 * self.apply_delay, lambda: reply.send(done))
        elif isinstance(request, PauseRequest):
            reply.send(Ok(message="automation paused"))
        elif isinstance(request, RebuildRequest):
            raise ZeroDivisionError("a bug in the daemon")


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is 0700), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="rmctl-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with public_dir() as d:
        yield d


@dataclass
class Running:
    server: ControlServer
    loop: Loop
    daemon: FakeDaemon
    socks: list[socket.socket] = field(default_factory=list)

    def client(self, **kw: Any) -> ControlClient:
        return ControlClient(self.server.path, answer_timeout=5.0, idle_timeout=5.0, **kw)

    def raw(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(self.server.path))
        self.socks.append(s)  # closed at teardown
        return s


@contextlib.contextmanager
def servers(directory: Path) -> Iterator[Callable[..., Running]]:
    """Start fake daemons on ``directory/control.sock``; all are stopped on exit."""
    started: list[Running] = []

    def _start(**kw: Any) -> Running:
        daemon = FakeDaemon()
        server = ControlServer(directory / "control.sock", daemon, **kw)
        server.open()
        loop = Loop(server)
        daemon.loop = loop
        loop.thread.start()
        run = Running(server, loop, daemon)
        started.append(run)
        return run

    yield _start
    for run in started:
        for s in run.socks:
            s.close()
        run.loop.stop()
        assert run.loop.errors == []


@pytest.fixture
def start(sock_dir: Path) -> Iterator[Callable[..., Running]]:
    with servers(sock_dir) as _start:
        yield _start


@pytest.fixture
def running(start: Callable[..., Running]) -> Running:
    return start()


def read_answers(s: socket.socket) -> list[dict[str, Any]]:
    """Every JSON line until the server closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def status_works(run: Running) -> bool:
    answer = run.client().call(StatusRequest())
    return isinstance(answer, StatusResponse) and "gaming" in answer.status["modules"]


# --- requests and answers ------------------------------------------------------------------


def test_every_apply_result_has_an_exit_code() -> None:
    from runtime_modules._control import EXIT_CODES
    from runtime_modules._state import ApplyResult

    assert set(EXIT_CODES) == set(ApplyResult)
    assert {r for r, code in EXIT_CODES.items() if code is ExitCode.OK} == {
        r for r in ApplyResult if r.ok
    }


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


def test_oversized_line_is_refused(running: Running) -> None:
    s = running.raw()
    payload = b'{"v": 1, "op": "status", "modules": ["' + b"a" * (2 * MAX_REQUEST_BYTES)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(payload)  # the server may stop reading before the end: that is the point
    answers = read_answers(s)
    assert answers[0]["code"] == "too-large"
    assert status_works(running)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_request_parser_never_raises(line: bytes) -> None:
    parsed = _parse_request(line)  # raising would fail the test
    assert isinstance(parsed, ErrorResponse) or parsed.v == 1


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


def test_a_file_in_the_way_is_not_removed(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(path, FakeDaemon()).open()
    assert path.read_text() == "precious"


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

CLIENT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from runtime_modules._control import ControlClient, PauseRequest, StatusRequest
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
    from runtime_modules._control import ControlServer, StatusResponse

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
