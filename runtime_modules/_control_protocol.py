"""The control socket's protocol: the messages, their limits, and how they cross the wire.

Nothing here does I/O: the server (``_control_server``) and the client (``_control_client``)
both encode and decode through this module, so the two ends cannot drift apart.

A Unix stream socket (``settings.control_socket``); one request per connection, one JSON object
on one line of at most 64 KiB, ``{"v": 1, "op": ...}``. The server answers with JSON lines until
a final one (``done``, ``status``, ``ok``, ``error``; or ``accepted`` for a request with
``"wait": false``) and then closes. ``events`` subscribes to the live stream instead and never
gets a final answer. docs/control.md has every message with an example.

Requests are strict (an unknown field is refused: a typo must not be silently ignored); answers
are lenient (an older client ignores what a newer daemon adds).
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Literal

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
    PermissionDeniedError,
    RuntimeModulesError,
    UnknownModuleError,
)
from ._registry import MODULE_NAME
from ._state import ApplyResult

__all__ = [
    "ALL_OPS",
    "CHANGE_OPS",
    "EXIT_CODES",
    "FINAL_TYPES",
    "MAX_COMMAND",
    "MAX_MODULES",
    "MAX_OUTPUT_LINE",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "PROTOCOL_VERSION",
    "READ_OPS",
    "RESPONSE_TYPES",
    "Accepted",
    "AutoRequest",
    "DisableRequest",
    "Done",
    "EnableRequest",
    "ErrorCode",
    "ErrorResponse",
    "EventMessage",
    "EventsRequest",
    "Ok",
    "PauseRequest",
    "Progress",
    "RebuildRequest",
    "Request",
    "ResetRequest",
    "Response",
    "ResumeRequest",
    "StatusRequest",
    "StatusResponse",
    "encode",
    "error_code_for",
    "error_from",
    "is_final",
    "parse_request",
    "parse_response",
]

PROTOCOL_VERSION: Literal[1] = 1
# A request is a handful of module names and flags (~200 bytes); 64 KiB leaves room for a few
# hundred modules and bounds what an unprivileged peer can make the root daemon buffer.
MAX_REQUEST_BYTES = 64 * 1024
# Answers carry rebuild output; one line of output is cut at 8 KiB, and an answer line is at most
# 1 MiB (the server also buffers at most that much for one client that does not read).
MAX_OUTPUT_LINE = 8 * 1024
MAX_RESPONSE_BYTES = 1024 * 1024
# At most this many module names in one request, and this much of the command line recorded
# with a change (for display: the CLI cuts it).
MAX_MODULES = 1024
MAX_COMMAND = 4096

# --- requests ------------------------------------------------------------------------------

_ModuleName = Annotated[str, StringConstraints(pattern=MODULE_NAME.pattern)]
_Modules = Annotated[list[_ModuleName], Field(min_length=1, max_length=MAX_MODULES)]
_Command = Annotated[str, StringConstraints(max_length=MAX_COMMAND)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = PROTOCOL_VERSION


class _Change(_Request):
    wait: bool = True  # stream progress until the apply is done; else answer `accepted` only
    command: _Command = ""  # the command line the user ran, recorded as the override's source


class StatusRequest(_Request):
    op: Literal["status"] = "status"
    modules: list[_ModuleName] = Field(default_factory=list, max_length=MAX_MODULES)


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

RESPONSE_TYPES = frozenset({"accepted", "progress", "done", "status", "ok", "event", "error"})


def is_final(response: Response, *, wait: bool) -> bool:
    """Whether ``response`` ends its request's answers (then the server closes)."""
    return response.type in FINAL_TYPES or (response.type == "accepted" and not wait)


def encode(model: BaseModel) -> bytes:
    """One message as it goes on the wire: its JSON on one line."""
    return model.model_dump_json().encode() + b"\n"


# --- errors: one table, read one way by the server and the other way by the client -----------

_ERRORS: tuple[tuple[type[RuntimeModulesError], ErrorCode], ...] = (
    # Most specific first: the server answers with the first class the error is an instance of.
    (PermissionDeniedError, ErrorCode.PERMISSION_DENIED),
    (UnknownModuleError, ErrorCode.UNKNOWN_MODULE),
    (LockBusyError, ErrorCode.BUSY),
    (ConfigError, ErrorCode.INVALID),
)


def error_code_for(exc: RuntimeModulesError) -> ErrorCode:
    """The code that answers ``exc`` (``failed`` for every error without one of its own)."""
    for cls, code in _ERRORS:
        if isinstance(exc, cls):
            return code
    return ErrorCode.FAILED


def error_from(response: ErrorResponse) -> RuntimeModulesError:
    """The error to raise for an ``error`` answer: the class it stands for, its message."""
    for cls, code in _ERRORS:
        if response.code == code:
            return cls(response.message)
    return ControlError(response.message)


# --- decoding --------------------------------------------------------------------------------


def parse_request(line: bytes) -> Request | ErrorResponse:
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
    # isinstance first: `[] in ALL_OPS` raises TypeError (a list is unhashable), and any local
    # user may send this line.
    if not isinstance(op, str) or op not in ALL_OPS:
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


def parse_response(raw: bytes) -> Response | None:
    """The answer in ``raw``; None for a kind this client does not know (a newer daemon).

    Raises:
        ControlError: the line is not JSON, or a known kind does not validate.
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ControlError(
            "the daemon sent an answer that is not JSON; is it the same version?"
        ) from None
    if not isinstance(data, dict) or data.get("type") not in RESPONSE_TYPES:
        return None
    try:
        return _RESPONSE.validate_python(data)
    except ValidationError as exc:
        raise ControlError(
            f"the daemon sent an answer this CLI cannot read: {exc.errors()[0]['msg']}"
        ) from None
