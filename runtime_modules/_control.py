"""The control socket: the protocol, a non-blocking server the daemon drives, and the client.

Protocol (docs/control.md has every message with an example): a Unix stream socket at
``settings.control_socket``; one request per connection, one JSON object on one line of at most
64 KiB, ``{"v": 1, "op": ...}``; the server answers with JSON lines until a final one (``done``,
``status``, ``ok``, ``error``; or ``accepted`` for a request with ``"wait": false``) and then
closes. ``events`` subscribes to the live stream instead and never gets a final answer.

Authorization: the socket is mode 0666 so anyone may read ``status`` and ``events``; every other
op needs the peer (``SO_PEERCRED``, checked by the kernel at connect time) to be root or a member
of ``settings.control_group``.

The server does no blocking I/O: the daemon's ``selectors`` loop calls it when a socket is ready.
Each client has its own input and output buffer; a client that sends too much, too slowly, or
never reads its answers is dropped, and the daemon never waits for one. It is not thread-safe:
call it from the loop's thread only (a misuse raises ``RuntimeError``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from ._errors import (
    ConfigError,
    ControlError,
    ExitCode,
    LockBusyError,
    NoDaemonError,
    PermissionDeniedError,
    RuntimeModulesError,
    UnknownModuleError,
)
from ._overrides import OverrideSource
from ._registry import MODULE_NAME
from ._state import ApplyResult

__all__ = [
    "CHANGE_OPS",
    "EXIT_CODES",
    "MAX_REQUEST_BYTES",
    "PROTOCOL_VERSION",
    "Accepted",
    "ControlClient",
    "ControlServer",
    "Done",
    "ErrorCode",
    "ErrorResponse",
    "EventMessage",
    "Handler",
    "Ok",
    "Peer",
    "Progress",
    "Reply",
    "Request",
    "Response",
    "StatusResponse",
]

log = logging.getLogger("runtime_modules.control")

PROTOCOL_VERSION: Literal[1] = 1
# A request is a handful of module names and flags (~200 bytes); 64 KiB leaves room for a few
# hundred modules and bounds what an unprivileged peer can make the root daemon buffer.
MAX_REQUEST_BYTES = 64 * 1024
# Answers carry rebuild output; one line of output is cut at 8 KiB, and an answer line is at most
# 1 MiB, which is also the most the server buffers for one client that does not read.
MAX_OUTPUT_LINE = 8 * 1024
MAX_RESPONSE_BYTES = 1024 * 1024
MAX_CLIENT_OUTPUT = MAX_RESPONSE_BYTES
MAX_CLIENTS = 256
# Slots kept free for peers that may change state, so unprivileged readers cannot lock root out.
RESERVED_FOR_CHANGE = 32
# A local client writes its one request line at once; 10 s is generous even on a loaded machine.
REQUEST_TIMEOUT = 10.0
ACCEPT_RETRY = 1.0  # after accept() failed (out of descriptors), when to try again
# Linux socket option (asm-generic/socket.h); Python does not name it. Kernel >= 4.13.
SO_PEERGROUPS = 59
_GID_BUF = 1024  # socket.getsockopt caps the buffer at 1024 bytes: 256 groups, else /proc


# --- requests ------------------------------------------------------------------------------

_ModuleName = Annotated[str, StringConstraints(pattern=MODULE_NAME.pattern)]
_Modules = Annotated[list[_ModuleName], Field(min_length=1, max_length=1024)]
_Command = Annotated[str, StringConstraints(max_length=4096)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = PROTOCOL_VERSION


class _Change(_Request):
    wait: bool = True  # stream progress until the apply is done; else answer `accepted` only
    command: _Command = ""  # the command line the user ran, recorded as the override's source


class StatusRequest(_Request):
    op: Literal["status"] = "status"
    modules: list[_ModuleName] = Field(default_factory=list, max_length=1024)


class EventsRequest(_Request):
    op: Literal["events"] = "events"


class EnableRequest(_Change):
    op: Literal["enable"] = "enable"
    modules: _Modules
    until: AwareDatetime | None = None  # the CLI turns --for/--until into this moment
    persist: bool = False
    force: bool = False


class DisableRequest(_Change):
    op: Literal["disable"] = "disable"
    modules: _Modules
    until: AwareDatetime | None = None
    persist: bool = False
    force: bool = False


class AutoRequest(_Change):
    op: Literal["auto"] = "auto"
    modules: _Modules


class ResetRequest(_Change):
    op: Literal["reset"] = "reset"
    force: bool = False


class PauseRequest(_Change):
    op: Literal["pause"] = "pause"


class ResumeRequest(_Change):
    op: Literal["resume"] = "resume"


class RebuildRequest(_Change):
    op: Literal["rebuild"] = "rebuild"
    force: bool = False


Request = Annotated[
    StatusRequest
    | EventsRequest
    | EnableRequest
    | DisableRequest
    | AutoRequest
    | ResetRequest
    | PauseRequest
    | ResumeRequest
    | RebuildRequest,
    Field(discriminator="op"),
]
_REQUEST: TypeAdapter[Request] = TypeAdapter(Request)
READ_OPS = frozenset({"status", "events"})
CHANGE_OPS = frozenset({"enable", "disable", "auto", "reset", "pause", "resume", "rebuild"})
ALL_OPS = READ_OPS | CHANGE_OPS


# --- responses -----------------------------------------------------------------------------


class _Response(BaseModel):
    # Unknown fields from a newer daemon are ignored by an older client.
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = PROTOCOL_VERSION


class Accepted(_Response):
    """The change is taken; ``apply_id`` names the apply to follow (None: no apply needed)."""

    type: Literal["accepted"] = "accepted"
    apply_id: str | None = None
    message: str = ""


class Progress(_Response):
    """Output of the running apply, and how long it has been running (seconds)."""

    type: Literal["progress"] = "progress"
    apply_id: str | None = None
    lines: list[str] = Field(default_factory=list)
    elapsed: float = 0.0

    @field_validator("lines")
    @classmethod
    def _cut(cls, v: list[str]) -> list[str]:
        return [s if len(s) <= MAX_OUTPUT_LINE else s[:MAX_OUTPUT_LINE] + " [cut]" for s in v]


class Done(_Response):
    """How the apply ended: ``exit_code`` is what the CLI exits with (``ExitCode``).

    ``apply_id`` is the daemon's number of the apply (as in ``accepted`` and ``progress``);
    ``journal_id`` the applier's id of it, as the journal and ``history`` show it.
    """

    type: Literal["done"] = "done"
    apply_id: str | None = None
    ok: bool
    result: str  # succeeded, unchanged, failed, … (docs/applier.md), or given-up
    before: list[str] = Field(default_factory=list)
    after: list[str] = Field(default_factory=list)
    message: str = ""
    duration: float | None = None
    exit_code: int = int(ExitCode.OK)
    journal_id: str | None = None


# What the CLI exits with after an apply ended so (docs/applier.md, "Exit codes").
EXIT_CODES: dict[ApplyResult, ExitCode] = {
    ApplyResult.SUCCEEDED: ExitCode.OK,
    ApplyResult.UNCHANGED: ExitCode.OK,
    ApplyResult.DRY_RUN: ExitCode.OK,
    ApplyResult.FAILED: ExitCode.FAILURE,
    ApplyResult.TIMED_OUT: ExitCode.FAILURE,
    ApplyResult.CANCELLED: ExitCode.FAILURE,
    ApplyResult.ROLLBACK_FAILED: ExitCode.ROLLBACK_FAILED,
    ApplyResult.VETOED: ExitCode.VETOED,
}


class StatusResponse(_Response):
    type: Literal["status"] = "status"
    status: dict[str, Any]


class Ok(_Response):
    """A request that needs no apply was done (pause)."""

    type: Literal["ok"] = "ok"
    message: str = ""


class EventMessage(_Response):
    """One line of the live stream: a normalized event, a rule transition, an apply step."""

    type: Literal["event"] = "event"
    time: float  # wall clock, Unix time
    kind: str  # device, link, rule, override, apply, daemon, …
    text: str  # the line `runtime-modules events` prints
    data: dict[str, Any] = Field(default_factory=dict)


class ErrorCode(enum.StrEnum):
    MALFORMED = "malformed"  # not UTF-8 JSON, not an object
    TOO_LARGE = "too-large"  # a request line over MAX_REQUEST_BYTES
    UNSUPPORTED_VERSION = "unsupported-version"
    UNKNOWN_OP = "unknown-op"
    INVALID = "invalid"  # a field is missing or wrong
    TIMEOUT = "timeout"  # the request line did not arrive in time
    SERVER_BUSY = "server-busy"  # too many clients
    PERMISSION_DENIED = "permission-denied"
    UNKNOWN_MODULE = "unknown-module"
    BUSY = "busy"  # another apply holds the lock and the request asked not to wait
    FAILED = "failed"  # the handler refused with a user-facing error
    INTERNAL = "internal"  # a bug in the daemon; it logged the details


class ErrorResponse(_Response):
    type: Literal["error"] = "error"
    code: str  # an ErrorCode; kept a str so that a newer daemon's codes still parse
    message: str


Response = Annotated[
    Accepted | Progress | Done | StatusResponse | Ok | EventMessage | ErrorResponse,
    Field(discriminator="type"),
]
_RESPONSE: TypeAdapter[Response] = TypeAdapter(Response)
FINAL_TYPES = frozenset({"done", "status", "ok", "error"})


def _line(model: BaseModel) -> bytes:
    return model.model_dump_json().encode() + b"\n"


# --- peers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The process at the other end, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    may_change: bool

    @cached_property
    def user(self) -> str:
        import pwd

        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def source(self, command: str = "") -> OverrideSource:
        return OverrideSource(uid=self.uid, user=self.user, command=command)


def _peer_groups(sock: socket.socket, pid: int, uid: int, gid: int) -> set[int]:
    """The peer's supplementary groups: from the kernel, else /proc, else the group database."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GID_BUF)
        return {g for (g,) in struct.iter_unpack("=I", raw[: len(raw) // 4 * 4])}
    except OSError:
        pass  # ERANGE (more than 256 groups) or an old kernel
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    import pwd

    try:
        return set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        return set()


# --- the server ----------------------------------------------------------------------------


class Handler(Protocol):
    """What the daemon implements: take a request, answer through ``reply`` (now or later).

    Requests reaching ``handle`` are valid and authorized; ``events`` never reaches it. Raising a
    ``RuntimeModulesError`` answers with an ``error`` naming it; any other exception is logged
    and answered as an internal error, and the server goes on.
    """

    def handle(self, request: Request, reply: Reply) -> None: ...


class _Phase(enum.Enum):
    READING = "reading"  # waiting for the request line
    ANSWERING = "answering"  # the handler holds the reply
    SUBSCRIBED = "subscribed"  # an `events` client
    CLOSING = "closing"  # flushing the final answer
    # Answer sent and our side shut: reading what the client still sends until it closes, because
    # closing a Unix socket with unread input resets it and the client would lose the answer.
    DRAINING = "draining"


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    peer: Peer
    deadline: float
    phase: _Phase = _Phase.READING
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    reading: bool = True  # False after the peer shut down its side
    closed: bool = False
    events: int = 0  # the selector mask currently registered


class Reply:
    """One client's answer channel. The handler may keep it to stream progress and the result.

    ``send`` after the final answer, or after the client went away, is a no-op returning False,
    so the daemon can send to every reply it holds without tracking who left.
    """

    def __init__(self, server: ControlServer, client: _Client, request: Request) -> None:
        self._server = server
        self._client = client
        self.request = request

    @property
    def peer(self) -> Peer:
        return self._client.peer

    @property
    def open(self) -> bool:
        return not self._client.closed and self._client.phase is _Phase.ANSWERING

    def source(self) -> OverrideSource:
        """Who asked, for the override's record."""
        return self.peer.source(getattr(self.request, "command", ""))

    def send(self, response: Response) -> bool:
        self._server._check_thread()
        if not self.open:
            return False
        final = response.type in FINAL_TYPES or (
            response.type == "accepted" and not getattr(self.request, "wait", True)
        )
        self._server._queue(self._client, _line(response), final=final)
        return True

    def fail(self, exc: RuntimeModulesError) -> bool:
        """Answer with the error a ``RuntimeModulesError`` stands for."""
        return self.send(ErrorResponse(code=_code_for(exc), message=str(exc)))


def _code_for(exc: RuntimeModulesError) -> ErrorCode:
    if isinstance(exc, PermissionDeniedError):
        return ErrorCode.PERMISSION_DENIED
    if isinstance(exc, UnknownModuleError):
        return ErrorCode.UNKNOWN_MODULE
    if isinstance(exc, LockBusyError):
        return ErrorCode.BUSY
    if isinstance(exc, ConfigError):
        return ErrorCode.INVALID
    return ErrorCode.FAILED


class ControlServer:
    """The listening socket and its clients, driven by a ``selectors`` loop.

    Use::

        server = ControlServer(settings.control_socket, handler, group=settings.control_group)
        server.open()
        server.register(selector)
        while True:
            for key, mask in selector.select(timeout_from(server.next_wakeup(), ...)):
                key.data(mask)          # every key the server registers has a callable as data
            server.expire(time.monotonic())

    ``broadcast`` sends one event to every ``events`` subscriber.
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        group: str | None = None,
        max_clients: int = MAX_CLIENTS,
        max_output: int = MAX_CLIENT_OUTPUT,
        request_timeout: float = REQUEST_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.handler = handler
        self.group = group
        self.max_clients = max_clients
        self.max_output = max_output
        self.request_timeout = request_timeout
        self._clock = clock
        self._gid = self._resolve_group(group)
        self._sock: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._clients: dict[int, _Client] = {}  # by fd
        self._thread: int | None = None
        self._inode: tuple[int, int] | None = None
        self._accept_resume: float | None = None  # set while accepting is paused (EMFILE)

    # -- life

    @staticmethod
    def _resolve_group(group: str | None) -> int | None:
        if group is None:
            return None
        import grp

        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            log.warning(
                "control group %r does not exist: only root may change runtime modules "
                "(create the group or fix services.runtimeModules.controlGroup)",
                group,
            )
            return None

    def open(self) -> None:
        """Bind and listen; a stale socket left by a killed daemon is replaced.

        Raises:
            ControlError: another daemon listens there, or the path is not a socket.
        """
        self._clear_stale()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            # 0666: anyone may connect and read; changes are checked per peer (SO_PEERCRED).
            os.chmod(self.path, 0o666)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ControlError(f"{self.path}: cannot listen on the control socket: {exc}") from None
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._sock = sock

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(
                f"{self.path}: exists and is not a socket; remove it, then start the daemon again"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except OSError:
            os.unlink(self.path)  # nobody listens: left behind by a daemon that was killed
            return
        finally:
            probe.close()
        raise ControlError(
            f"{self.path}: another runtime-modules daemon is already running "
            "(see `systemctl status runtime-modules`)"
        )

    def fileno(self) -> int:
        if self._sock is None:
            raise RuntimeError("ControlServer.open() was not called")
        return self._sock.fileno()

    def register(self, selector: selectors.BaseSelector) -> None:
        """Register the listening socket; clients are (un)registered as they come and go."""
        self._selector = selector
        self._thread = threading.get_ident()
        selector.register(self.fileno(), selectors.EVENT_READ, self._on_listen)

    def close(self) -> None:
        """Drop every client, stop listening, and remove the socket file if it is still ours."""
        for client in list(self._clients.values()):
            self._drop(client)
        if self._sock is not None:
            if self._selector is not None and self._accept_resume is None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(self._sock.fileno())
            self._sock.close()
            self._sock = None
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # -- loop hooks

    def next_wakeup(self) -> float | None:
        """When ``expire`` has work (a client's request deadline), on the server's clock."""
        deadlines = [c.deadline for c in self._clients.values() if c.phase in _TIMED]
        if self._accept_resume is not None:
            deadlines.append(self._accept_resume)
        return min(deadlines, default=None)

    def expire(self, now: float) -> None:
        """Answer clients that did not send their request in time, and drop stuck ones."""
        if self._accept_resume is not None and self._accept_resume <= now:
            self._resume_accepting()
        for client in list(self._clients.values()):
            if client.phase in _TIMED and client.deadline <= now:
                if client.phase is _Phase.READING:
                    self._refuse(
                        client,
                        ErrorCode.TIMEOUT,
                        f"no request line within {self.request_timeout:g} s",
                    )
                else:
                    log.info(
                        "control client pid %d neither read its answer nor closed; dropped",
                        client.peer.pid,
                    )
                    self._drop(client)

    def broadcast(self, event: EventMessage) -> int:
        """Send ``event`` to every subscriber; returns how many got it queued."""
        self._check_thread()
        data = _line(event)
        sent = 0
        for client in list(self._clients.values()):
            if client.phase is _Phase.SUBSCRIBED and not client.closed:
                self._queue(client, data, final=False)
                sent += not client.closed
        return sent

    @property
    def subscribers(self) -> int:
        return sum(c.phase is _Phase.SUBSCRIBED for c in self._clients.values())

    # -- accepting

    def _on_listen(self, mask: int) -> None:
        assert self._sock is not None
        # A bounded batch per wakeup, so a connection storm cannot starve the rest of the loop.
        for _ in range(64):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the clients we have
                log.warning("control socket: cannot accept a client: %s", exc)
                self._pause_accepting()
                return
            self._admit(conn)

    def _pause_accepting(self) -> None:
        # The pending connection stays queued and the socket stays readable: listening on would
        # spin the loop. Resume when a client leaves (a descriptor is free) or a second later.
        if self._selector is None or self._sock is None or self._accept_resume is not None:
            return
        self._selector.unregister(self._sock.fileno())
        self._accept_resume = self._clock() + ACCEPT_RETRY

    def _resume_accepting(self) -> None:
        if self._accept_resume is None or self._selector is None or self._sock is None:
            return
        self._accept_resume = None
        self._selector.register(self._sock.fileno(), selectors.EVENT_READ, self._on_listen)

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        pid, uid, gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
        peer = Peer(pid=pid, uid=uid, gid=gid, may_change=self._may_change(conn, pid, uid, gid))
        client = _Client(sock=conn, peer=peer, deadline=self._clock() + self.request_timeout)
        self._clients[conn.fileno()] = client
        self._watch(client)
        unprivileged = sum(not c.peer.may_change for c in self._clients.values())
        if len(self._clients) > self.max_clients or (
            not peer.may_change and unprivileged > self.max_clients - RESERVED_FOR_CHANGE
        ):
            log.warning("control socket: too many clients; refusing pid %d (uid %d)", pid, uid)
            self._refuse(client, ErrorCode.SERVER_BUSY, "the daemon has too many clients; retry")

    def _may_change(self, conn: socket.socket, pid: int, uid: int, gid: int) -> bool:
        if uid == 0:
            return True
        if self._gid is None:
            return False
        return gid == self._gid or self._gid in _peer_groups(conn, pid, uid, gid)

    # -- reading

    def _on_client(self, client: _Client, mask: int) -> None:
        if client.closed:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(client)
        if not client.closed and mask & selectors.EVENT_READ:
            self._read(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(MAX_REQUEST_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._on_eof(client)
            return
        if client.phase is not _Phase.READING:
            return  # one request per connection: anything after it is ignored
        client.inbuf += data
        end = client.inbuf.find(b"\n")
        if end < 0:
            if len(client.inbuf) > MAX_REQUEST_BYTES:
                self._refuse(
                    client,
                    ErrorCode.TOO_LARGE,
                    f"request line over {MAX_REQUEST_BYTES} bytes; send one JSON object per line",
                )
            return
        line = bytes(client.inbuf[:end])
        client.inbuf.clear()
        if len(line) > MAX_REQUEST_BYTES:
            self._refuse(
                client, ErrorCode.TOO_LARGE, f"request line over {MAX_REQUEST_BYTES} bytes"
            )
            return
        self._dispatch(client, line)

    def _on_eof(self, client: _Client) -> None:
        client.reading = False
        if client.phase is _Phase.READING and client.inbuf:
            # A last line without its newline (`printf … | nc -NU`): still a request.
            line = bytes(client.inbuf)
            client.inbuf.clear()
            self._dispatch(client, line)
        if client.phase in (_Phase.READING, _Phase.SUBSCRIBED, _Phase.DRAINING):
            self._drop(client)
        else:
            self._watch(client)  # half-closed: stop reading, go on writing the answer

    def _dispatch(self, client: _Client, line: bytes) -> None:
        client.phase = _Phase.ANSWERING
        parsed = _parse_request(line)
        if isinstance(parsed, ErrorResponse):
            self._refuse(client, ErrorCode(parsed.code), parsed.message)
            return
        request = parsed
        peer = client.peer
        if request.op in CHANGE_OPS and not peer.may_change:
            self._refuse(client, ErrorCode.PERMISSION_DENIED, self._denied(request.op, peer))
            return
        if isinstance(request, EventsRequest):
            client.phase = _Phase.SUBSCRIBED
            self._queue(client, _line(Accepted(message="subscribed; events follow")), final=False)
            return
        reply = Reply(self, client, request)
        try:
            self.handler.handle(request, reply)
        except RuntimeModulesError as exc:
            reply.fail(exc)
        except Exception:
            log.exception("control socket: the handler failed on %s", request.op)
            reply.send(
                ErrorResponse(
                    code=ErrorCode.INTERNAL,
                    message="the daemon failed on this request; "
                    "see `journalctl -u runtime-modules`",
                )
            )

    def _denied(self, op: str, peer: Peer) -> str:
        who = f"{peer.user} (uid {peer.uid})"
        if self._gid is not None:
            allowed = f"root or members of group {self.group!r}"
            how = f"run it with sudo, or ask to be added to group {self.group!r}"
        else:
            allowed = "root"
            how = "run it with sudo"
        return f"{who} may not {op}: only {allowed} may change runtime modules; {how}"

    # -- writing

    def _queue(self, client: _Client, data: bytes, *, final: bool) -> None:
        if client.closed or client.phase in (_Phase.CLOSING, _Phase.DRAINING):
            return
        if final:
            client.phase = _Phase.CLOSING
            client.deadline = self._clock() + self.request_timeout
        client.outbuf += data
        self._flush(client)
        if not client.closed and len(client.outbuf) > self.max_output:
            log.warning(
                "control client pid %d (uid %d) dropped: it does not read its answers",
                client.peer.pid,
                client.peer.uid,
            )
            self._drop(client)

    def _refuse(self, client: _Client, code: ErrorCode, message: str) -> None:
        if code is not ErrorCode.SERVER_BUSY:
            log.info("control client pid %d refused: %s: %s", client.peer.pid, code, message)
        client.phase = _Phase.ANSWERING  # so that the error is queued even before a request
        self._queue(client, _line(ErrorResponse(code=code, message=message)), final=True)

    def _flush(self, client: _Client) -> None:
        while client.outbuf:
            try:
                n = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # EPIPE, ECONNRESET: the client went away
                self._drop(client)
                return
            del client.outbuf[:n]
        if not client.outbuf and client.phase is _Phase.CLOSING:
            if not client.reading:
                self._drop(client)
                return
            client.phase = _Phase.DRAINING
            client.deadline = self._clock() + self.request_timeout
            try:
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._drop(client)
                return
        self._watch(client)

    def _watch(self, client: _Client) -> None:
        if self._selector is None or client.closed:
            return
        mask = (selectors.EVENT_READ if client.reading else 0) | (
            selectors.EVENT_WRITE if client.outbuf else 0
        )
        if mask == client.events:
            return
        fd = client.sock.fileno()
        if client.events == 0:
            self._selector.register(fd, mask, partial(self._on_client, client))
        elif mask == 0:
            self._selector.unregister(fd)
        else:
            self._selector.modify(fd, mask, partial(self._on_client, client))
        client.events = mask

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        fd = client.sock.fileno()
        if self._selector is not None and client.events:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)
        self._clients.pop(fd, None)
        client.sock.close()
        self._resume_accepting()

    def _check_thread(self) -> None:
        if self._thread is not None and threading.get_ident() != self._thread:
            raise RuntimeError("ControlServer must be used from the thread of its selector loop")


_TIMED = (_Phase.READING, _Phase.CLOSING, _Phase.DRAINING)


def _parse_request(line: bytes) -> Request | ErrorResponse:
    """The request in ``line``, or the error that answers it; never raises."""

    def error(code: ErrorCode, message: str) -> ErrorResponse:
        return ErrorResponse(code=code, message=message)

    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return error(ErrorCode.MALFORMED, "not a JSON object on one line of UTF-8")
    if not isinstance(data, dict):
        return error(
            ErrorCode.MALFORMED, 'a request is one JSON object, e.g. {"v": 1, "op": "status"}'
        )
    if data.get("v") != PROTOCOL_VERSION:
        return error(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {data.get('v')!r} is not supported; this daemon speaks "
            f'{{"v": {PROTOCOL_VERSION}}} (the CLI and the daemon come from one package: '
            "restart the daemon after an upgrade)",
        )
    op = data.get("op")
    if op not in ALL_OPS:
        return error(
            ErrorCode.UNKNOWN_OP, f"unknown op {op!r}; one of: {', '.join(sorted(ALL_OPS))}"
        )
    try:
        return _REQUEST.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]][1:]  # the first part is the op's tag
        where = ".".join(loc) or "(request)"
        return error(ErrorCode.INVALID, f"{op}: {where}: {first['msg']}")


# --- the client ----------------------------------------------------------------------------

_CLIENT_ERRORS: dict[str, type[RuntimeModulesError]] = {
    ErrorCode.PERMISSION_DENIED: PermissionDeniedError,
    ErrorCode.UNKNOWN_MODULE: UnknownModuleError,
    ErrorCode.BUSY: LockBusyError,
    ErrorCode.INVALID: ConfigError,
}


class ControlClient:
    """Talks to the daemon: one connection per request.

    ``answer_timeout`` bounds the wait for the first answer (a daemon that accepts but does not
    answer is hung); ``idle_timeout`` bounds each later wait (None: as long as it takes, which
    is what ``events`` and a waiting apply want; the daemon itself times applies out).
    """

    def __init__(
        self,
        path: Path,
        *,
        connect_timeout: float = 5.0,
        answer_timeout: float = 30.0,
        idle_timeout: float | None = None,
    ) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self.answer_timeout = answer_timeout
        self.idle_timeout = idle_timeout

    def available(self) -> bool:
        """True when a daemon listens (cheap: one connect, no request)."""
        try:
            self._connect().close()
        except ControlError:
            return False
        return True

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise NoDaemonError(
                f"no daemon is running: {self.path} does not exist; start it with "
                "`systemctl start runtime-modules` (or run `runtime-modules watch`)"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise NoDaemonError(
                f"no daemon is running: nothing listens on {self.path}; start it with "
                "`systemctl start runtime-modules` (or run `runtime-modules watch`)"
            ) from None
        except PermissionError:
            sock.close()
            raise ControlError(
                f"{self.path}: permission denied; the control socket's directory must be "
                "readable (mode 0755) and the socket mode 0666"
            ) from None
        except TimeoutError:
            sock.close()
            raise ControlError(
                f"{self.path}: the daemon did not accept the connection within "
                f"{self.connect_timeout:g} s; it may be hung (see `journalctl -u runtime-modules`)"
            ) from None
        except OSError as exc:
            sock.close()
            raise ControlError(
                f"{self.path}: cannot connect to the daemon: {exc.strerror}"
            ) from None
        return sock

    def request(self, request: Request) -> Iterator[Response]:
        """Send ``request``; yield each answer up to the final one.

        Raises:
            NoDaemonError: no daemon listens.
            PermissionDeniedError, UnknownModuleError, LockBusyError, ConfigError, ControlError:
                the daemon answered with an ``error`` (its message says what to do).
        """
        sock = self._connect()
        with sock:
            try:
                sock.sendall(request.model_dump_json().encode() + b"\n")
            except OSError as exc:
                raise ControlError(
                    f"{self.path}: cannot send the request: {exc.strerror}"
                ) from None
            wait = getattr(request, "wait", True)
            sock.settimeout(self.answer_timeout)
            for raw in self._lines(sock):
                response = _parse_response(raw)
                if response is None:
                    continue  # a kind of answer this client does not know (a newer daemon)
                if isinstance(response, ErrorResponse):
                    cls = _CLIENT_ERRORS.get(response.code, ControlError)
                    raise cls(response.message)
                sock.settimeout(self.idle_timeout)
                yield response
                if response.type in FINAL_TYPES or (response.type == "accepted" and not wait):
                    return
        what = "the event stream" if request.op == "events" else "the answer"
        raise ControlError(
            f"the daemon closed the connection before the end of {what} (did it stop? "
            "see `journalctl -u runtime-modules`)"
        )

    def call(self, request: Request) -> Response:
        """The final answer to ``request`` (progress is discarded)."""
        last: Response | None = None
        for last in self.request(request):  # noqa: B007 - only the last one matters
            pass
        assert last is not None  # request() raises when no final answer came
        return last

    def _lines(self, sock: socket.socket) -> Iterator[bytes]:
        buf = bytearray()
        while True:
            end = buf.find(b"\n")
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 1]
                yield line
                continue
            if len(buf) > MAX_RESPONSE_BYTES:
                raise ControlError(
                    f"{self.path}: an answer line is over {MAX_RESPONSE_BYTES} bytes"
                )
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise ControlError(
                    f"{self.path}: the daemon did not answer within {sock.gettimeout():g} s; "
                    "it may be "
                    "hung (see `journalctl -u runtime-modules`)"
                ) from None
            except OSError as exc:
                if exc.errno == errno.ECONNRESET:
                    return
                raise ControlError(f"{self.path}: {exc.strerror}") from None
            if not chunk:
                return
            buf += chunk


def _parse_response(raw: bytes) -> Response | None:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ControlError(
            "the daemon sent an answer that is not JSON; is it the same version?"
        ) from None
    if not isinstance(data, dict) or data.get("type") not in _RESPONSE_TYPES:
        return None
    try:
        return _RESPONSE.validate_python(data)
    except ValidationError as exc:
        raise ControlError(
            f"the daemon sent an answer this CLI cannot read: {exc.errors()[0]['msg']}"
        ) from None


_RESPONSE_TYPES = frozenset({"accepted", "progress", "done", "status", "ok", "event", "error"})
