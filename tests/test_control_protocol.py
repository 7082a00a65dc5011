"""The control socket's protocol: its messages, parsing, and the error table, without a socket."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime_modules._control_protocol import (
    EXIT_CODES,
    MAX_OUTPUT_LINE,
    Accepted,
    Done,
    ErrorCode,
    ErrorResponse,
    Ok,
    Progress,
    StatusRequest,
    encode,
    error_code_for,
    error_from,
    is_final,
    parse_request,
    parse_response,
)
from runtime_modules._errors import (
    ApplyError,
    ConfigError,
    ControlError,
    ExitCode,
    LockBusyError,
    PermissionDeniedError,
    RegistryError,
    RuntimeModulesError,
    UnknownModuleError,
)
from runtime_modules._state import ApplyResult


def test_every_apply_result_has_an_exit_code() -> None:
    assert set(EXIT_CODES) == set(ApplyResult)
    assert {r for r, code in EXIT_CODES.items() if code is ExitCode.OK} == {
        r for r in ApplyResult if r.ok
    }


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_request_parser_never_raises(line: bytes) -> None:
    parsed = parse_request(line)  # raising would fail the test
    assert isinstance(parsed, ErrorResponse) or parsed.v == 1


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    op=_JSON | st.sampled_from(["status", "enable", "events", "rebuild"]),
    rest=st.dictionaries(
        st.sampled_from(["modules", "until", "wait", "persist", "reason", "x"]), _JSON
    ),
)
def test_request_parser_never_raises_on_objects(op: object, rest: dict[str, object]) -> None:
    # The random bytes above almost never form {"v": 1, "op": <not a string>}: these do.
    line = json.dumps({"v": 1, "op": op, **rest}, allow_nan=True).encode()
    parsed = parse_request(line)
    assert isinstance(parsed, ErrorResponse) or parsed.op == op


def test_a_request_survives_the_wire() -> None:
    line = encode(StatusRequest(modules=["gaming"]))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_request(line) == StatusRequest(modules=["gaming"])


@pytest.mark.parametrize(
    ("error", "code", "raised"),
    [
        (PermissionDeniedError("x"), ErrorCode.PERMISSION_DENIED, PermissionDeniedError),
        (UnknownModuleError("x"), ErrorCode.UNKNOWN_MODULE, UnknownModuleError),
        (LockBusyError("x"), ErrorCode.BUSY, LockBusyError),
        (ConfigError("x"), ErrorCode.INVALID, ConfigError),
        (RegistryError("x"), ErrorCode.INVALID, ConfigError),  # a subclass: its parent's code
        (ApplyError("x"), ErrorCode.FAILED, ControlError),
    ],
)
def test_errors_cross_the_socket_as_the_same_kind(
    error: RuntimeModulesError, code: ErrorCode, raised: type[RuntimeModulesError]
) -> None:
    # What the client raises keeps the exit code the user would get without a daemon.
    assert error_code_for(error) is code
    back = error_from(ErrorResponse(code=code, message="what and what to do"))
    assert type(back) is raised and str(back) == "what and what to do"


def test_an_error_code_from_a_newer_daemon_is_a_control_error() -> None:
    back = error_from(ErrorResponse(code="quota-exceeded", message="m"))
    assert type(back) is ControlError


def test_which_answers_are_final() -> None:
    done = Done(ok=True, result="succeeded")
    assert is_final(done, wait=True) and is_final(Ok(), wait=True)
    assert not is_final(Progress(), wait=False)
    # `accepted` ends a --no-wait request; a waiting one goes on to the apply's end.
    assert is_final(Accepted(), wait=False) and not is_final(Accepted(), wait=True)


def test_long_output_lines_are_cut() -> None:
    p = Progress(lines=["x" * (MAX_OUTPUT_LINE + 10), "short"])
    assert p.lines[0] == "x" * MAX_OUTPUT_LINE + " [cut]" and p.lines[1] == "short"


def test_answers_of_unknown_kinds_are_skipped_and_bad_ones_named() -> None:
    assert parse_response(b'{"v": 1, "type": "hologram"}') is None
    assert parse_response(b'{"v": 1, "type": "ok", "future": 1}') == Ok()
    with pytest.raises(ControlError, match="not JSON"):
        parse_response(b"{nope")
    with pytest.raises(ControlError, match="cannot read"):
        parse_response(b'{"v": 1, "type": "done"}')  # `ok` and `result` are missing


def test_address_changes_are_link_events_naming_the_link() -> None:
    from runtime_modules._control_events import events_of
    from runtime_modules._daemon_events import WorldChanged
    from runtime_modules._world import AddressAdded, AddressRemoved, Link, World

    world = World.of([], [Link(index=3, ifname="lab0")])
    notice = WorldChanged(
        "netlink", (AddressAdded(3, "10.20.0.5/16"), AddressRemoved(9, "fd00::5/64"))
    )
    added, removed = events_of(notice, world, wall=1.0, to_wall=lambda t: t)
    assert (added.kind, added.text) == ("link", "address 10.20.0.5/16 added to lab0")
    assert added.data == {"source": "netlink", "action": "address-add", "ifname": "lab0",
                          "index": 3, "address": "10.20.0.5/16"}  # fmt: skip
    assert removed.text == "address fd00::5/64 removed from #9"  # a link not known (any more)
    assert removed.data["action"] == "address-remove"
