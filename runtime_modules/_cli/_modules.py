"""list, status, enable, disable, reset, rebuild: module verbs.

Read verbs print text, or with ``--json`` the stable shapes documented in docs/applier.md. The
changing verbs compute their target from what is applied *when their apply gets the lock* (so two
concurrent `enable`s both land) and go through ``apply_directly``: the one place where a route
through the daemon's control socket can later be put in front.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from .._applier import Applier, ApplyOutcome, ApplyResult, Target, current_system, drift
from .._errors import ConfigError, ExitCode, PermissionDeniedError, StateError
from .._journal import Journal
from .._lock import lock_holder
from .._registry import Registry, load_registry
from .._settings import Settings
from .._state import ApplyRecord, State, load_state
from ._common import print_json

JSON_VERSION = 1  # of the --json shapes; bumped only on an incompatible change
ENV_SUDO_GUARD = "RUNTIME_MODULES_SUDO_REEXEC"  # set in the re-executed command: never loop

EXIT_CODES = {
    ApplyResult.SUCCEEDED: ExitCode.OK,
    ApplyResult.UNCHANGED: ExitCode.OK,
    ApplyResult.DRY_RUN: ExitCode.OK,
    ApplyResult.FAILED: ExitCode.FAILURE,
    ApplyResult.TIMED_OUT: ExitCode.FAILURE,
    ApplyResult.CANCELLED: ExitCode.FAILURE,
    ApplyResult.ROLLBACK_FAILED: ExitCode.ROLLBACK_FAILED,
    ApplyResult.VETOED: ExitCode.VETOED,
}


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add this group's subcommands to ``sub``."""

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, parents=[common], help=help_text, description=help_text
        )
        # A subparser's defaults would overwrite the same flags given before the verb.
        shared = {a.dest for a in common._actions}
        for action in p._actions:
            if action.dest in shared:
                action.default = argparse.SUPPRESS
        return p

    p = add("list", "List the modules of the registry and their state.")
    p.add_argument("--json", action="store_true", help="print JSON (shape: docs/applier.md)")
    p.set_defaults(func=cmd_list)

    p = add("status", "Show what is applied, each module's state, and the last apply.")
    p.add_argument("modules", nargs="*", metavar="MODULE", help="only these modules")
    p.add_argument("--json", action="store_true", help="print JSON (shape: docs/applier.md)")
    p.set_defaults(func=cmd_status)

    for name, func, help_text in (
        ("enable", cmd_enable, "Enable modules (added to what is applied) and switch."),
        ("disable", cmd_disable, "Disable modules (removed from what is applied) and switch."),
    ):
        p = add(name, help_text)
        p.add_argument("modules", nargs="+", metavar="MODULE")
        _apply_flags(p)
        p.set_defaults(func=func)

    p = add("reset", "Disable every module: switch back to the base system.")
    _apply_flags(p)
    p.set_defaults(func=cmd_reset)

    p = add("rebuild", "Rebuild and switch to what is applied now (always runs nixos-rebuild).")
    _apply_flags(p, force=False)
    p.set_defaults(func=cmd_rebuild)


def _apply_flags(p: argparse.ArgumentParser, *, force: bool = True) -> None:
    if force:
        p.add_argument("--force", action="store_true", help="rebuild even when nothing changes")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="fail at once (exit 4) when another apply is running, instead of waiting",
    )
    p.add_argument(
        "--timeout",
        metavar="DURATION",
        help="kill nixos-rebuild and roll back after this long (e.g. 20m; default 30m) "
        "[RUNTIME_MODULES_APPLY_TIMEOUT]",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="write the flake and record the result, but run no nixos-rebuild",
    )
    p.add_argument(
        "--sudo",
        action="store_true",
        help="when not root, run the command again with sudo (the default on a terminal)",
    )


# -- read verbs -----------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    registry = load_registry(settings.registry)
    state = load_state(settings, journal=_journal(settings))
    rows = [_module_json(registry, state, m.name, brief=True) for m in registry.modules]
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
    registry = load_registry(settings.registry)
    registry.check_known(args.modules)
    state = load_state(settings, journal=_journal(settings))
    data = status_json(settings, registry, state, args.modules)
    if args.json:
        print_json(data)
    else:
        _print_status(data)
    return int(ExitCode.OK)


def status_json(
    settings: Settings, registry: Registry, state: State, only: Sequence[str] = ()
) -> dict[str, Any]:
    """The ``status --json`` shape (docs/applier.md); also what a daemon can answer with."""
    names = list(only) or [m.name for m in registry.modules]
    holder = lock_holder(settings.lock_file)
    ip = state.in_progress
    warnings = [w for w in (state.uncertain, drift(settings, state)) if w]
    for name in sorted(state.applied & registry.names):
        changes = registry.module(name).kernel_changes
        if changes:
            warnings.append(
                f"{name} changes {', '.join(changes)}, which take no effect under "
                "`nixos-rebuild test`: the running kernel keeps its modules and parameters "
                "until a reboot into a system that has them"
            )
    unknown = sorted(state.applied - registry.names)
    if unknown:
        warnings.append(
            f"applied but no longer in the registry: {', '.join(unknown)}; "
            "the next apply removes them"
        )
    return {
        "version": JSON_VERSION,
        "host": registry.host,
        "system": current_system(settings),
        "applied": sorted(state.applied),
        "modules": [_module_json(registry, state, n) for n in names],
        "last_apply": _record_json(state.last_apply),
        "in_progress": None
        if ip is None
        else {
            "apply_id": ip.apply_id,
            "pid": ip.pid,
            "started": _time(ip.started),
            "reason": ip.reason,
            "before": sorted(ip.before),
            "target": sorted(ip.target),
            "log_path": ip.log_path,
        },
        "lock": None
        if holder is None
        else {
            "pid": holder.pid,
            "command": holder.command,
            "apply_id": holder.apply_id,
            "since": _time(holder.since),
        },
        "uncertain": state.uncertain,
        "warnings": warnings,
    }


def _module_json(
    registry: Registry, state: State, name: str, *, brief: bool = False
) -> dict[str, Any]:
    info = registry.module(name)
    ms = state.module_status(name)
    row: dict[str, Any] = {
        "name": name,
        "description": info.description,
        "state": ms.status.value,
        "applied": name in state.applied,
    }
    if not brief:
        row["message"] = ms.message
        row["since"] = _time(ms.since)
        row["kernel_changes"] = list(info.kernel_changes)
    return row


def _record_json(record: ApplyRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "apply_id": record.apply_id,
        "started": _time(record.started),
        "duration": round(record.duration, 3),
        "result": record.result.value,
        "reason": record.reason,
        "before": sorted(record.before),
        "after": sorted(record.after),
        "target": sorted(record.target),
        "system_before": record.system_before,
        "system_after": record.system_after,
        "log_path": record.log_path,
        "message": record.message,
    }


def _time(ts: float | None) -> str | None:
    """ISO 8601 in UTC, as JSON consumers parse it."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _local(iso: str | None) -> str:
    if iso is None:
        return "?"
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _print_status(data: dict[str, Any]) -> None:
    print(f"host {data['host']}, running {data['system'] or '(no current system)'}")
    print(f"applied: {' '.join(data['applied']) or '(none: the base system)'}")
    rows = data["modules"]
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        line = f"  {r['name']:<{width}}  {r['state']}"
        if r["message"]:
            line += f"  {r['message']}"
        print(line)
    last = data["last_apply"]
    if last is not None:
        print(
            f"last apply {last['apply_id']} at {_local(last['started'])}: {last['result']}, "
            f"{last['duration']:.1f} s ({last['reason']})"
        )
        if last["result"] not in ("succeeded", "dry-run"):
            print(f"  {last['message']}")
    if data["lock"] is not None:
        lock = data["lock"]
        print(
            f"applying now: apply {lock['apply_id']} by pid {lock['pid']} ({lock['command']}), "
            f"since {_local(lock['since'])}"
        )
    for w in data["warnings"]:
        print(f"warning: {w}")


# -- changing verbs -------------------------------------------------------------------------


def cmd_enable(args: argparse.Namespace, settings: Settings) -> int:
    names = frozenset(args.modules)
    load_registry(settings.registry).check_known(args.modules)
    return _change(args, settings, lambda applied: applied | names, f"enable {_join(names)}")


def cmd_disable(args: argparse.Namespace, settings: Settings) -> int:
    names = frozenset(args.modules)
    load_registry(settings.registry).check_known(args.modules)
    return _change(args, settings, lambda applied: applied - names, f"disable {_join(names)}")


def cmd_reset(args: argparse.Namespace, settings: Settings) -> int:
    return _change(args, settings, frozenset(), "reset")


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    args.force = True
    return _change(args, settings, lambda applied: applied, "rebuild")


def _join(names: frozenset[str]) -> str:
    return " ".join(sorted(names))


def _change(args: argparse.Namespace, settings: Settings, target: Target, what: str) -> int:
    if args.timeout is not None:
        settings = settings.with_(apply_timeout=_timeout(args.timeout))
    reason = f"{what} (runtime-modules by {_user()})"
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
    code = EXIT_CODES[outcome.result]
    if code is ExitCode.OK:
        print(outcome.message)
    else:
        print(f"runtime-modules: {outcome.message}", file=sys.stderr)
    return int(code)


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
    from .._rules import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"--timeout: {exc}") from None
    if seconds <= 0:
        raise ConfigError("--timeout must be longer than 0 s")
    return seconds


def _user() -> str:
    user = os.environ.get("SUDO_USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _journal(settings: Settings) -> Journal:
    return Journal.for_level(settings.log_level)


# -- needing root ---------------------------------------------------------------------------


def ensure_can_change(settings: Settings, *, sudo: bool) -> None:
    """Raise (or re-run under sudo) when this process may not write the state directory.

    With ``--sudo``, or on an interactive terminal, the command runs again as
    ``sudo runtime-modules …`` like the reference does; in a script it fails with exit code 3, so
    nothing waits for a password prompt no one sees.
    """
    where = settings.state_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    if os.access(where, os.W_OK | os.X_OK):
        return
    if _read_only(where):
        raise StateError(
            f"{settings.state_dir}: the state directory is on a read-only file system; "
            "remount it read-write"
        )
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    if (sudo or interactive) and not os.environ.get(ENV_SUDO_GUARD):
        _reexec_with_sudo()
    raise PermissionDeniedError(
        f"changing modules needs root ({settings.state_dir} is not writable by "
        f"{_user()}); run `sudo runtime-modules …`, or add --sudo"
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
