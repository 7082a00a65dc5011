"""auto, pause, resume, events, history: override and live-view verbs.

With a daemon running, ``auto``/``pause``/``resume`` go to it over the control socket and this
command shows its progress until the apply is done (or returns at once with ``--no-wait``).
With none, they change the override store directly, which the daemon reads when it starts: no
rule runs without the daemon, so there is nothing to apply now. ``events`` needs the daemon.
``history`` reads the journal and needs nothing else (``_history``).

``enable``/``disable``/``reset``/``rebuild`` (in ``_modules``) use from here: the
``--for``/``--until``/``--persist`` flags (``add_pin_flags``), ``change_request`` to build their
request and ``_route.route_to_daemon`` to send it when a daemon runs; with none, ``record_change``
writes the override store before they apply directly, so that a daemon started later keeps the
user's choice instead of undoing it. The verbs without and with a daemon: docs/control.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from .._control_client import ControlClient
from .._control_protocol import (
    MAX_COMMAND,
    MAX_MODULES,
    Accepted,
    AutoRequest,
    DisableRequest,
    EnableRequest,
    EventMessage,
    EventsRequest,
    PauseRequest,
    RebuildRequest,
    Request,
    ResetRequest,
    ResumeRequest,
)
from .._errors import ConfigError, ExitCode, UnknownModuleError
from .._registry import MODULE_NAME
from .._settings import Settings
from . import _history
from ._common import add_verb, check_state_dir, common_parser, current_user
from ._route import route_to_daemon


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add this group's subcommands to ``sub``."""

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return add_verb(sub, common, name, **kw)

    p = add_parser(
        "auto",
        help="hand modules back to the rules (remove their overrides)",
        description="Remove the overrides of MODULEs, runtime and persistent: the rules decide "
        "again. With the daemon running, waits until the resulting apply is done.",
    )
    p.add_argument("modules", nargs="+", metavar="MODULE")
    _no_wait(p)
    _sudo(p)
    p.set_defaults(func=cmd_auto)

    p = add_parser(
        "pause",
        help="pause automation: rules stop changing modules until `resume` (or reboot)",
        description="Pause automation: the modules the rules want now stay as they are, "
        "overrides still apply. Ends with `resume` or at reboot.",
    )
    _sudo(p)
    p.set_defaults(func=cmd_pause)

    p = add_parser(
        "resume",
        help="resume automation after `pause` or `reset`",
        description="Resume automation: the rules decide again, for the world as it is now.",
    )
    _no_wait(p)
    _sudo(p)
    p.set_defaults(func=cmd_resume)

    p = add_parser(
        "events",
        help="stream device, link, rule and apply events from the daemon (like udevadm monitor)",
        description="Print the daemon's events as they happen until interrupted.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    # Its own copy of the common flags: their help is hidden below, and the other verbs share
    # theirs (argparse's parents share Action objects).
    p = add_verb(
        sub,
        common_parser(),
        "history",
        help="past applies, from the journal",
        description="List past applies from the journal: time, before -> after, why, result, "
        "duration. Every apply of this machine's journal is listed, whatever its state "
        "directory or registry. Root or a member of systemd-journal sees the daemon's entries.",
    )
    p.add_argument("--json", action="store_true", help="a JSON list (shape in docs/control.md)")
    p.add_argument("-n", "--limit", type=int, default=20, help="the newest N applies (default 20)")
    p.add_argument("--since", help="as journalctl --since: '2026-05-01', 'yesterday', '-2h'")
    p.add_argument(
        "--identifier",
        default="runtime-modules",
        help="the SYSLOG_IDENTIFIER of the entries (default runtime-modules)",
    )
    # The journal is one for the machine: the settings select nothing in it. Still accepted (every
    # verb takes them), but not offered, and a note says so when given (cmd_history).
    for action in p._actions:
        if action.dest in _history.IGNORED_SETTINGS:
            action.help = argparse.SUPPRESS
    p.set_defaults(func=_history.cmd_history)


def _no_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="return once the daemon has taken the request; do not wait for the apply",
    )


def _sudo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sudo",
        action="store_true",
        help="without the daemon, when not root: run the command again with sudo (the default "
        "on a terminal)",
    )


def _ensure_can_change(settings: Settings, args: argparse.Namespace) -> None:
    """Without a daemon: the store is changed here, which needs what a direct apply needs."""
    from ._modules import ensure_can_change  # _modules imports this module

    ensure_can_change(settings, sudo=args.sudo)


def add_pin_flags(p: argparse.ArgumentParser) -> None:
    """``--for``, ``--until`` and ``--persist``, for ``enable`` and ``disable``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--for", dest="pin_for", metavar="DURATION", help="only for this long: 2h, 90m, 1h30m"
    )
    g.add_argument(
        "--until",
        dest="pin_until",
        metavar="TIME",
        help="only until then: 18:00 (today, or tomorrow if past) or 2026-05-01T18:00",
    )
    p.add_argument(
        "--persist",
        action="store_true",
        help="keep the override across reboots (in the persistent directory)",
    )


def check_name_shapes(names: Sequence[str]) -> None:
    """Refuse what cannot be a module name, or more names than a request carries, before they
    reach a request (which would refuse them less clearly)."""
    count = len(set(names))
    if count > MAX_MODULES:
        raise ConfigError(
            f"{count} modules named; at most {MAX_MODULES} fit in one command: name them in "
            "several commands"
        )
    for name in names:
        if not MODULE_NAME.match(name):
            raise UnknownModuleError(
                f"unknown module {name!r}: module names are letters, digits and _ . + - "
                "(see `runtime-modules list`)"
            )


def change_request(verb: str, args: argparse.Namespace, *, now: float) -> Request:
    """The control request for a changing verb of ``_modules`` and its parsed flags.

    Reads ``modules``, ``force``, ``no_wait`` and the flags of ``add_pin_flags`` when present.
    """
    from .._overrides import until_from_flags

    check_name_shapes(getattr(args, "modules", []))
    wait = not getattr(args, "no_wait", False)
    force = bool(getattr(args, "force", False))
    if verb in ("enable", "disable"):
        modules = list(dict.fromkeys(args.modules))
        pin_for, pin_until = getattr(args, "pin_for", None), getattr(args, "pin_until", None)
        until = until_from_flags(pin_for, pin_until, now=now)
        persist = bool(getattr(args, "persist", False))
        flags = [f"--for {pin_for}"] * bool(pin_for) + [f"--until {pin_until}"] * bool(pin_until)
        flags += ["--persist"] * persist + ["--force"] * force
        cls = EnableRequest if verb == "enable" else DisableRequest
        return cls(
            modules=modules,
            until=None if until is None else datetime.fromtimestamp(until, UTC),
            persist=persist,
            force=force,
            wait=wait,
            command=_command(verb, *modules, *flags),
        )
    if verb == "reset":
        return ResetRequest(force=force, wait=wait, command=_command("reset"))
    if verb == "rebuild":
        return RebuildRequest(force=force, wait=wait, command=_command("rebuild"))
    raise ValueError(f"{verb!r} is not a changing verb")


def record_change(settings: Settings, request: Request, *, now: float) -> None:
    """With no daemon: record an ``enable``/``disable``/``reset`` in the override store.

    Nothing to record for other requests. The caller then applies directly.
    """
    from .._overrides import OverrideSource, OverrideState, OverrideStore

    store = OverrideStore.from_settings(settings, warn=warn)
    if isinstance(request, EnableRequest | DisableRequest):
        source = OverrideSource(uid=os.getuid(), user=current_user(), command=request.command)
        store.pin(
            request.modules,
            OverrideState.ON if isinstance(request, EnableRequest) else OverrideState.OFF,
            until=None if request.until is None else request.until.timestamp(),
            source=source,
            persist=request.persist,
            now=now,
        )
    elif isinstance(request, ResetRequest):
        store.reset(now=now)


def _command(verb: str, *parts: str) -> str:
    """The command line recorded with a change, for display: cut to what a request carries."""
    text = " ".join((verb, *parts))
    return text if len(text) <= MAX_COMMAND else text[: MAX_COMMAND - 1] + "…"


def _no_daemon_note(settings: Settings) -> None:
    print(
        f"no daemon is running ({settings.control_socket} is absent); the change is stored and "
        "takes effect when it starts (`systemctl start runtime-modules`)",
        file=sys.stderr,
    )


# --- verbs ---------------------------------------------------------------------------------


def cmd_auto(args: argparse.Namespace, settings: Settings) -> int:
    check_name_shapes(args.modules)
    modules = list(dict.fromkeys(args.modules))
    request = AutoRequest(modules=modules, wait=args.wait, command=_command("auto", *modules))
    code = route_to_daemon(settings, request)
    if code is not None:
        return code
    from .._overrides import OverrideStore

    now = time.time()
    store = OverrideStore.from_settings(settings, warn=warn)
    pinned = store.load(now).pins
    _check_names([m for m in modules if m not in pinned], settings)
    _ensure_can_change(settings, args)
    store.unpin(modules, now=now)
    for name in modules:
        print(f"{name}: handed back to the rules" if name in pinned else f"{name}: had no override")
    _no_daemon_note(settings)
    return int(ExitCode.OK)


def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    code = route_to_daemon(settings, PauseRequest(command="pause"))
    if code is not None:
        return code
    from .._overrides import OverrideStore
    from .._state import load_state

    _ensure_can_change(settings, args)
    # Keep what is applied now, as the daemon's pause keeps what the rules want at that moment.
    applied = load_state(settings).applied
    OverrideStore.from_settings(settings, warn=warn).set_paused(
        True, now=time.time(), modules=applied
    )
    kept = ", ".join(sorted(applied)) or "the base system"
    print(f"automation paused; keeping {kept}")
    _no_daemon_note(settings)
    return int(ExitCode.OK)


def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    code = route_to_daemon(settings, ResumeRequest(wait=args.wait, command="resume"))
    if code is not None:
        return code
    from .._overrides import OverrideStore

    _ensure_can_change(settings, args)
    OverrideStore.from_settings(settings, warn=warn).set_paused(False, now=time.time())
    print("automation resumed")
    _no_daemon_note(settings)
    return int(ExitCode.OK)


def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    check_state_dir(settings)
    client = ControlClient(settings.control_socket, idle_timeout=None)
    for answer in client.request(EventsRequest()):
        if isinstance(answer, Accepted):
            print(f"listening to {settings.control_socket} (Ctrl-C to stop)", file=sys.stderr)
        elif isinstance(answer, EventMessage):
            if args.json:
                print(answer.model_dump_json(exclude={"v", "type"}), flush=True)
            else:
                stamp = datetime.fromtimestamp(answer.time).strftime("%H:%M:%S.%f")[:-3]
                print(f"{stamp} {answer.kind.upper():<8} {answer.text}", flush=True)
    return int(ExitCode.OK)  # not reached: the stream ends with the daemon (an error) or ^C


def warn(message: str) -> None:
    """A warning of the override store, on stderr."""
    print(f"runtime-modules: warning: {message}", file=sys.stderr)


def _check_names(names: Sequence[str], settings: Settings) -> None:
    if not names:
        return
    from .._registry import load_registry, unknown_module_message

    known = load_registry(settings.registry).names
    for name in names:
        if name not in known:
            raise UnknownModuleError(unknown_module_message(name, known))
