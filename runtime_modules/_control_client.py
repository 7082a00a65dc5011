"""The control socket's client: what the CLI uses to talk to the running daemon.

One connection per request: send the request line, read answer lines until the final one
(``_control_protocol`` says which), and turn an ``error`` answer into the error it stands for.
Blocking, with timeouts, so that a hung daemon is reported instead of waited on forever.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path

from ._control_protocol import (
    MAX_RESPONSE_BYTES,
    ErrorResponse,
    Request,
    Response,
    error_from,
    is_final,
    parse_response,
)
from ._errors import ControlError, NoDaemonError

__all__ = ["ControlClient"]


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
                    f"{self.path}: cannot send the request: {exc.strerror}; did the daemon stop? "
                    "(see `journalctl -u runtime-modules`)"
                ) from None
            wait = getattr(request, "wait", True)
            sock.settimeout(self.answer_timeout)
            for raw in self._lines(sock):
                response = parse_response(raw)
                if response is None:
                    continue  # a kind of answer this client does not know (a newer daemon)
                if isinstance(response, ErrorResponse):
                    raise error_from(response)
                sock.settimeout(self.idle_timeout)
                yield response
                if is_final(response, wait=wait):
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
                    f"{self.path}: an answer line is over {MAX_RESPONSE_BYTES} bytes; "
                    "restart the daemon if it is older than this command"
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
                raise ControlError(
                    f"{self.path}: {exc.strerror} while reading the answer "
                    "(see `journalctl -u runtime-modules`)"
                ) from None
            if not chunk:
                return
            buf += chunk
