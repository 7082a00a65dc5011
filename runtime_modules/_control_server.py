"""The control socket's server: a non-blocking listener the daemon's loop drives.

The server does no blocking I/O: the daemon's ``selectors`` loop calls it when a socket is ready.
Each client has its own input and output buffer; a client that sends too much, too slowly, or
never reads its answers is dropped, and the daemon never waits for one. It is not thread-safe:
call it from the loop's thread only (a misuse raises ``RuntimeError``).

Authorization: the socket is mode 0666 so anyone may read ``status`` and ``events``; every other
op needs the peer (``SO_PEERCRED``, checked by the kernel at connect time) to be root or a member
of ``settings.control_group``.

What goes on the wire is ``_control_protocol``'s; what to do with a request is the ``Handler``'s
(the daemon's ``_control_handler``).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Protocol

from ._control_protocol import (
    CHANGE_OPS,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    Accepted,
    ErrorCode,
    ErrorResponse,
    EventMessage,
    EventsRequest,
    Request,
    Response,
    encode,
    error_code_for,
    is_final,
    parse_request,
)
from ._errors import ControlError, PermissionDeniedError, RuntimeModulesError
from ._overrides import OverrideSource

__all__ = ["ControlServer", "Handler", "Peer", "Reply"]

log = logging.getLogger("runtime_modules.control")

# The most the server buffers for one client that does not read: one whole answer line.
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
        return _user_name(self.uid)

    def source(self, command: str = "") -> OverrideSource:
        return OverrideSource(uid=self.uid, user=self.user, command=command)


@functools.lru_cache(maxsize=64)
def _user_name(uid: int) -> str:
    """The name of ``uid``, looked up once: an NSS lookup (LDAP, sssd) may block the loop."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


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
        final = is_final(response, wait=getattr(self.request, "wait", True))
        self._server._queue(self._client, encode(response), final=final)
        return True

    def fail(self, exc: RuntimeModulesError) -> bool:
        """Answer with the error a ``RuntimeModulesError`` stands for."""
        return self.send(ErrorResponse(code=error_code_for(exc), message=str(exc)))


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
            PermissionDeniedError: this user may not create the socket (or its directory).
        """
        try:
            self._clear_stale()
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        except PermissionError as exc:
            raise self._cannot_create(exc) from None
        except OSError as exc:
            raise ControlError(
                f"{self.path.parent}: cannot create the directory of the control socket: "
                f"{exc.strerror}"
            ) from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            # 0666: anyone may connect and read; changes are checked per peer (SO_PEERCRED).
            os.chmod(self.path, 0o666)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except PermissionError as exc:
            sock.close()
            raise self._cannot_create(exc) from None
        except OSError as exc:
            sock.close()
            raise ControlError(f"{self.path}: cannot listen on the control socket: {exc}") from None
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._sock = sock

    def _cannot_create(self, exc: OSError) -> PermissionDeniedError:
        return PermissionDeniedError(
            f"{self.path}: cannot create the control socket ({exc.strerror}): the daemon needs "
            "root (run it with sudo), or a state directory this user can write (--state-dir or "
            "RUNTIME_MODULES_STATE_DIR)"
        )

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
        except ConnectionRefusedError:
            os.unlink(self.path)  # nobody listens: left behind by a daemon that was killed
            return
        except FileNotFoundError:
            return  # gone meanwhile
        except OSError:
            pass  # a timeout (a full backlog) or anything else: someone may listen; keep it
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
        data = encode(event)
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
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(client)
            if not client.closed and mask & selectors.EVENT_READ:
                self._read(client)
        except Exception:
            # A bug reached by one client's bytes must cost that client, never the daemon's
            # loop (any local user may connect).
            log.exception("control client pid %d dropped: serving it failed", client.peer.pid)
            self._drop(client)

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
        parsed = parse_request(line)
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
            self._queue(client, encode(Accepted(message="subscribed; events follow")), final=False)
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
        self._queue(client, encode(ErrorResponse(code=code, message=message)), final=True)

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
