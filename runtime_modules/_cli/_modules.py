"""list, status, enable, disable, reset, rebuild: module verbs.

Read verbs print text, or with ``--json`` the stable shapes of docs/applier.md and
docs/control.md. ``status`` asks the daemon when one runs (it can say *why*: which rule, which
device or link, which pin); else it reads the state file and the override store.

The changing verbs go to the daemon when one runs (``route_to_daemon``): it pins, applies and
streams the progress back. With none, they record the pin in the override store (so that a
daemon started later keeps the user's choice) and apply directly, under the same lock, through
``apply_directly``; their target is computed from what is applied *when the apply gets the
lock*, so two concurrent ``enable``s both land.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from .._applier import Applier, ApplyOutcome, Target
from .._control_protocol import (
    EXIT_CODES,
    DisableRequest,
    EnableRequest,
    Request,
    ResetRequest,
    StatusRequest,
    StatusResponse,
)
from .._errors import (
    ConfigError,
    ExitCode,
    NoDaemonError,
    PermissionDeniedError,
    RuntimeModulesError,
    StateError,
)
from .._journal import Journal
from .._registry import load_registry
from .._settings import Settings, parse_seconds
from .._state import load_state
from .._status import JSON_VERSION, local_time, module_brief, status_json
from ._common import add_verb, check_persist_dir, check_state_dir, current_user, print_json
from ._overrides import add_pin_flags, change_request, check_name_shapes, record_change
from ._route import check_request_size, daemon_client, route_to_daemon

__all__ = ["EXIT_CODES", "JSON_VERSION", "apply_directly", "ensure_can_change"]

ENV_SUDO_GUARD = "RUNTIME_MODULES_SUDO_REEXEC"  # set in the re-executed command: never loop


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add this group's subcommands to ``sub``."""

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return add_verb(sub, common, name, help=help_text, description=help_text)

    p = add("list", "List the modules of the registry and their state.")
    p.add_argument("--json", action="store_true", help="print JSON (shape: docs/applier.md)")
    p.set_defaults(func=cmd_list)

    p = add(
        "status",
        "Show what is applied, each module's state and why, the last apply and what comes next.",
    )
    p.add_argument("modules", nargs="*", metavar="MODULE", help="only these modules")
    p.add_argument("--json", action="store_true", help="print JSON (shape: docs/control.md)")
    p.set_defaults(func=cmd_status)

    for name, func, help_text in (
        ("enable", cmd_enable, "Enable modules: pin them on, over the rules, and switch."),
        ("disable", cmd_disable, "Disable modules: pin them off, over the rules, and switch."),
    ):
        p = add(name, help_text)
        p.add_argument("modules", nargs="+", metavar="MODULE")
        add_pin_flags(p)
        _apply_flags(p)
        p.set_defaults(func=func)

    p = add(
        "reset",
        "Back to the base system: every pin removed, automation paused until `resume`.",
    )
    _apply_flags(p)
    p.set_defaults(func=cmd_reset)

    p = add("rebuild", "Rebuild and switch to what is wanted now (always runs nixos-rebuild).")
    # The reference CLI's `rebuild --force` keeps working: rebuild always rebuilds anyway.
    _apply_flags(p, force_help="changes nothing: rebuild always rebuilds (kept for habit)")
    p.set_defaults(func=cmd_rebuild)


def _apply_flags(
    p: argparse.ArgumentParser, *, force_help: str = "rebuild even when nothing changes"
) -> None:
    p.add_argument("--force", action="store_true", help=force_help)
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="with the daemon: return once it took the request; without: fail at once (exit 4) "
        "when another apply is running, instead of waiting",
    )
    p.add_argument(
        "--timeout",
        metavar="DURATION",
        help="without the daemon: kill nixos-rebuild and roll back after this long (e.g. 20m; "
        "default 30m) [RUNTIME_MODULES_APPLY_TIMEOUT]",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="without the daemon: write the flake and say what would be applied; run no "
        "nixos-rebuild and record nothing (no pin, no pause, no state)",
    )
    p.add_argument(
        "--sudo",
        action="store_true",
        help="when not root, run the command again with sudo (the default on a terminal)",
    )


# -- read verbs -----------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    check_state_dir(settings)
    registry = load_registry(settings.registry)
    state = load_state(settings, journal=_journal(settings))
    rows = [module_brief(registry, state, m.name) for m in registry.modules]
    if args.json:
        print_json({"version": JSON_VERSION, "host": registry.host, "modules": rows})
        return int(ExitCode.OK)
    if not rows:
        print(f"the registry {settings.registry} lists no modules")
        return int(ExitCode.OK)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['state']:<8}  {r['description']}".rstrip())
    return int(ExitCode.OK)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    check_name_shapes(args.modules)
    request = StatusRequest(modules=list(dict.fromkeys(args.modules)))
    check_request_size(request)
    try:
        answer = daemon_client(settings).call(request)
    except NoDaemonError:
        data = local_status(settings, args.modules)
    else:
        assert isinstance(answer, StatusResponse)
        data = answer.status
    if args.json:
        print_json(data)
    else:
        _print_status(data, filtered=bool(args.modules))
    return int(ExitCode.OK)


def local_status(settings: Settings, modules: Sequence[str] = ()) -> dict[str, Any]:
    """The status without a daemon: the state file and the override store."""
    from .._overrides import OverrideStore
    from ._overrides import warn

    registry = load_registry(settings.registry)
    registry.check_known(modules)
    state = load_state(settings, journal=_journal(settings))
    overrides = OverrideStore.from_settings(settings, warn=warn).load(time.time())
    return status_json(settings, registry, state, modules, overrides=overrides)


def _print_status(data: dict[str, Any], *, filtered: bool = False) -> None:
    now = time.time()
    print(f"host {data['host']}, running {data['system'] or '(no current system)'}")
    daemon = data.get("daemon")
    if daemon is None:
        print("no daemon is running: rules are not followed, pins are kept for when it starts")
    else:
        since = _at(daemon["since"], now)
        print(
            f"daemon pid {daemon['pid']} since {since}" + (", dry run" if daemon["dry_run"] else "")
        )
    if data.get("paused"):
        kept = daemon["paused_modules"] if daemon is not None else None
        what = f"; the rules' part kept: {' '.join(kept) or 'nothing'}" if kept is not None else ""
        print(f"automation paused until `runtime-modules resume`{what}")
    print(f"applied: {' '.join(data['applied']) or '(none: the base system)'}")
    if daemon is not None and daemon.get("dry_run_applied") is not None:
        would = " ".join(daemon["dry_run_applied"]) or "(none: the base system)"
        print(f"dry run, applied by now if it were not: {would}")
    rows = data["modules"]
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        line = f"  {r['name']:<{width}}  {r['state']:<8}"
        why = r.get("why")
        if why is not None:
            wanted = "wanted" if r.get("wanted") else "not wanted"
            line += f"  {wanted}: {why['text']}"
        if r["message"]:
            line += f"  ({r['message']})"
        print(line.rstrip())
    if not filtered:
        # A pin of a module the registry no longer lists has no row: say it, and how to drop it.
        shown = {r["name"] for r in rows}
        for pin in data["overrides"]:
            if pin["module"] not in shown:
                print(
                    f"  {pin['module']}: pinned {pin['state']}, but the registry has no such "
                    f"module; `runtime-modules auto {pin['module']}` removes the pin"
                )
    if daemon is not None:
        applying = daemon["applying"]
        if applying is not None:
            target = " ".join(applying["target"]) or "(base)"
            since = _at(applying["started"], now)
            print(f"applying now: apply #{applying['apply_id']} -> {target}, since {since}")
        pending = daemon["pending"]
        if pending is not None:
            target = " ".join(pending["target"]) or "(base)"
            when = (
                "after the current apply"
                if pending["at"] is None
                else f"at {_at(pending['at'], now)}"
            )
            notes = ["rebuild"] if pending["rebuild"] else []
            backoff = daemon["backoff"]
            if backoff is not None:
                n = backoff["failures"]
                notes.append(f"held back after {n} failed appl{'y' if n == 1 else 'ies'} in a row")
            note = f" ({', '.join(notes)})" if notes else ""
            print(f"next: {target} {when}{note}")
        given_up = daemon["given_up"]
        if given_up is not None:
            print(
                f"given up on {' '.join(given_up['target']) or '(base)'} after "
                f"{given_up['failures']} failures: {given_up['message']}; "
                "`runtime-modules rebuild` tries again"
            )
    last = data["last_apply"]
    if last is not None:
        print(
            f"last apply {last['apply_id']} at {_at(last['started'], now)}: {last['result']}, "
            f"{last['duration']:.1f} s ({last['reason']})"
        )
        if last["result"] not in ("succeeded", "dry-run"):
            print(f"  {last['message']}")
    if data["lock"] is not None and (daemon is None or daemon["applying"] is None):
        lock = data["lock"]
        print(
            f"applying now: apply {lock['apply_id']} by pid {lock['pid']} ({lock['command']}), "
            f"since {_at(lock['since'], now)}"
        )
    for w in data["warnings"]:
        print(f"warning: {w}")


def _at(iso: str | None, now: float) -> str:
    from datetime import datetime

    if iso is None:
        return "?"
    return local_time(datetime.fromisoformat(iso).timestamp(), now)


# -- changing verbs -------------------------------------------------------------------------


def cmd_enable(args: argparse.Namespace, settings: Settings) -> int:
    names = frozenset(args.modules)
    return _change("enable", args, settings, lambda applied: applied | names)


def cmd_disable(args: argparse.Namespace, settings: Settings) -> int:
    names = frozenset(args.modules)
    return _change("disable", args, settings, lambda applied: applied - names)


def cmd_reset(args: argparse.Namespace, settings: Settings) -> int:
    code = _change("reset", args, settings, frozenset())
    if code == ExitCode.OK and not args.dry_run:
        print(
            "automation is paused: rules bring no module back until `runtime-modules resume`",
            file=sys.stderr,
        )
    return code


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    args.force = True
    return _change("rebuild", args, settings, lambda applied: applied)


def _change(verb: str, args: argparse.Namespace, settings: Settings, target: Target) -> int:
    """A changing verb: to the daemon when one runs, else pinned and applied here."""
    now = time.time()
    names = getattr(args, "modules", [])
    check_name_shapes(names)
    request = change_request(verb, args, now=now)  # a bad --for/--until fails before anything
    timeout = None if args.timeout is None else _timeout(args.timeout)
    if args.dry_run:
        if daemon_client(settings).available():
            raise ConfigError(
                "--dry-run applies without the daemon, and the daemon is running; leave out "
                "--dry-run (or try the rules with `runtime-modules watch --dry-run`)"
            )
    else:
        code = route_to_daemon(settings, request, on_daemon=_daemon_notes(args))
        if code is not None:
            return code
    if names:
        load_registry(settings.registry).check_known(names)
    if timeout is not None:
        settings = settings.with_(apply_timeout=timeout)
    what = verb + "".join(f" {n}" for n in sorted(set(names)))
    reason = f"{what} (runtime-modules by {current_user()})"
    kept = None
    if not args.dry_run:
        # Pinned first, so that a daemon started meanwhile or later keeps it instead of undoing it.
        ensure_can_change(settings, sudo=args.sudo, persist=getattr(args, "persist", False))
        record_change(settings, request, now=now)
        kept = _pin_kept(request)
    try:
        with _cancel_on_signals() as cancel:
            outcome = apply_directly(
                settings,
                target,
                reason,
                force=args.force,
                wait=not args.no_wait,
                dry_run=args.dry_run,
                sudo=args.sudo,
                on_output=_print_output,
                cancel=cancel,
            )
    except RuntimeModulesError as exc:
        if kept:  # the apply could not even start: say that the pin was recorded all the same
            exc.args = (f"{exc}; {kept}",)
        raise
    code = EXIT_CODES[outcome.result]
    if code is ExitCode.OK:
        print(outcome.message + (_dry_run_note(request, now) if args.dry_run else ""))
    else:
        print(
            f"runtime-modules: {outcome.message}" + (f"; {kept}" if kept else ""), file=sys.stderr
        )
    return int(code)


def _pin_kept(request: Request) -> str | None:
    """After a failed direct apply: the pin it recorded stays, and how to drop it."""
    if not isinstance(request, EnableRequest | DisableRequest):
        return None
    names = " ".join(sorted(set(request.modules)))
    return (
        f"the pin of {names} is recorded all the same, for the daemon to apply when it runs; "
        f"`runtime-modules auto {names}` removes it"
    )


def _dry_run_note(request: Request, now: float) -> str:
    """What a dry run leaves out: it records nothing, neither the pins nor the pause of a reset."""
    if isinstance(request, EnableRequest | DisableRequest):
        state = "on" if isinstance(request, EnableRequest) else "off"
        until = (
            "" if request.until is None else f" until {local_time(request.until.timestamp(), now)}"
        )
        layer = " across reboots" if request.persist else ""
        return f"; nothing recorded (would pin {' '.join(request.modules)} {state}{until}{layer})"
    if isinstance(request, ResetRequest):
        return "; nothing recorded (would remove every pin and pause automation)"
    return "; nothing recorded"


def _daemon_notes(args: argparse.Namespace) -> Callable[[], None]:
    def notes() -> None:
        if args.timeout is not None:
            print(
                "runtime-modules: note: --timeout is not used: the daemon applies with its own "
                "timeout (RUNTIME_MODULES_APPLY_TIMEOUT of the service)",
                file=sys.stderr,
            )

    return notes


def apply_directly(
    settings: Settings,
    target: Target,
    reason: str,
    *,
    force: bool = False,
    wait: bool = True,
    dry_run: bool = False,
    sudo: bool = False,
    on_output: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> ApplyOutcome:
    """Apply in this process (no daemon involved): the changing verbs' one way to the applier."""
    ensure_can_change(settings, sudo=sudo)
    registry = load_registry(settings.registry)
    applier = Applier(settings, registry, journal=_journal(settings), dry_run=dry_run)
    return applier.apply(
        target, reason=reason, force=force, wait=wait, on_output=on_output, cancel=cancel
    )


def _print_output(line: str) -> None:
    # nixos-rebuild writes its progress to stderr; so do we, keeping stdout for the result.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@contextmanager
def _cancel_on_signals() -> Iterator[threading.Event]:
    """Ctrl-C or SIGTERM during an apply: stop nixos-rebuild and roll back, do not abandon it."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if not cancel.is_set():
            print(
                "runtime-modules: stopping the apply and rolling back; please wait",
                file=sys.stderr,
            )
        cancel.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield cancel
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _timeout(text: str) -> float:
    return parse_seconds(text, "--timeout", number_is_seconds=False, examples="20m, 1h or 90s")


def _journal(settings: Settings) -> Journal:
    return Journal.for_level(settings.log_level)


# -- needing root ---------------------------------------------------------------------------


def ensure_can_change(settings: Settings, *, sudo: bool, persist: bool = False) -> None:
    """Raise (or re-run under sudo) when this process may not write the state directory (and,
    with ``persist``, the persistent directory of ``--persist``'s pins).

    With ``--sudo``, or on an interactive terminal, the command runs again as
    ``sudo runtime-modules …`` like the reference does; in a script it fails with exit code 3, so
    nothing waits for a password prompt no one sees.
    """
    check_state_dir(settings)
    directories = {settings.state_dir: "the state directory"}
    if persist:
        check_persist_dir(settings)
        directories[settings.persist_dir] = "the persistent directory"
    for directory, name in directories.items():
        where = directory
        while not where.exists() and where != where.parent:
            where = where.parent
        if os.access(where, os.W_OK | os.X_OK):
            continue
        if _read_only(where):
            raise StateError(
                f"{directory}: {name} is on a read-only file system; remount it read-write"
            )
        interactive = sys.stdin.isatty() and sys.stderr.isatty()
        if (sudo or interactive) and not os.environ.get(ENV_SUDO_GUARD):
            _reexec_with_sudo()
        raise PermissionDeniedError(
            f"changing modules needs root ({directory} is not writable by "
            f"{current_user()}); run `sudo runtime-modules …`, or add --sudo"
        )


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _reexec_with_sudo() -> None:
    sudo = shutil.which("sudo")
    if sudo is None:
        raise PermissionDeniedError(
            "changing modules needs root and sudo is not installed; run the command as root"
        )
    keep = sorted(k for k in os.environ if k.startswith("RUNTIME_MODULES_"))
    argv = [sudo]
    if keep:
        argv.append(f"--preserve-env={','.join([*keep, ENV_SUDO_GUARD])}")
    else:
        argv.append(f"--preserve-env={ENV_SUDO_GUARD}")
    argv += ["--", sys.executable, "-m", "runtime_modules", *sys.argv[1:]]
    os.environ[ENV_SUDO_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sudo, argv)
