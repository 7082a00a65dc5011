"""Sending a change to the running daemon, and showing its answers as the apply goes.

Shared by the verbs of ``_modules`` (enable, disable, reset, rebuild) and ``_overrides`` (auto,
pause, resume): with a daemon, they all go through it; ``route_to_daemon`` returns None when
none runs, and the caller then acts directly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._control_client import ControlClient
from .._control_protocol import (
    MAX_REQUEST_BYTES,
    Accepted,
    Done,
    Ok,
    Progress,
    Request,
    StatusResponse,
)
from .._errors import ConfigError, ExitCode, NoDaemonError
from .._settings import Settings
from ._common import check_state_dir, format_duration, print_json

# Past the daemon's own apply timeout, silence means it is gone or hung; a minute of slack covers
# the rollback after a timeout.
_IDLE_SLACK = 60.0


def daemon_client(settings: Settings) -> ControlClient:
    check_state_dir(settings)  # its control socket is there
    return ControlClient(settings.control_socket, idle_timeout=settings.apply_timeout + _IDLE_SLACK)


def check_request_size(request: Request) -> None:
    """Refuse a request the daemon would refuse for its size (many long module names)."""
    size = len(request.model_dump_json().encode()) + 1
    if size > MAX_REQUEST_BYTES:
        raise ConfigError(
            f"the module names make a request of {size} bytes, over the {MAX_REQUEST_BYTES} "
            "the control socket takes; name fewer modules at once"
        )


def route_to_daemon(
    settings: Settings, request: Request, *, on_daemon: Callable[[], None] | None = None
) -> int | None:
    """Send a change to the running daemon and show it through; None when no daemon runs.

    The caller applies directly on None (under the same lock the daemon uses). Errors the
    daemon answers with are raised as ``RuntimeModulesError``s. ``on_daemon`` runs once the
    daemon answered, before its answers are shown (for notes about flags it does not use).
    """
    check_request_size(request)
    try:
        stream = daemon_client(settings).request(request)
        first = next(stream)
    except NoDaemonError:
        return None
    if on_daemon is not None:
        on_daemon()
    return show_answers(_chain(first, stream))


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def show_answers(answers: Iterable[Any]) -> int:
    """Print a change's answers: progress lines (with elapsed time) on stderr, the end on stdout."""
    code = int(ExitCode.OK)
    for answer in answers:
        if isinstance(answer, Accepted):
            if answer.message:  # what will happen: "apply #3 starts: {gaming} (+gaming)"
                print(answer.message, file=sys.stderr)
        elif isinstance(answer, Progress):
            stamp = f"[{format_duration(answer.elapsed):>6}]"
            for line in answer.lines:
                print(f"{stamp} {line}", file=sys.stderr)
            if not answer.lines:
                print(f"{stamp} still applying", file=sys.stderr)
            sys.stderr.flush()
        elif isinstance(answer, Done):
            code = answer.exit_code
            took = f" in {format_duration(answer.duration)}" if answer.duration else ""
            if answer.ok:
                print(f"{answer.message or answer.result}{took}")
            else:
                print(f"runtime-modules: {answer.message or answer.result}", file=sys.stderr)
        elif isinstance(answer, Ok):
            print(answer.message)
        elif isinstance(answer, StatusResponse):
            print_json(answer.status)
    return code
