"""The status object: what runs, and why (``status --json``, and the daemon's ``status`` answer).

One builder for both places, so that the shape is the same with a daemon or without: the state
file says what is applied, how each module's last change went and how the last apply ended; the
override store says what is pinned and whether automation is paused; and when a daemon runs, its
reconciler says what is wanted and why (which rule, and which device or link made it hold),
what it is applying and what comes next. The shape is documented in docs/control.md, "Status
JSON", and is stable: keys are only ever added (``version`` changes on an incompatible change).

Pure but for reading the lock file and the current-system link; times go out as ISO 8601 in UTC.
The daemon's times are on its monotonic clock and are converted to wall-clock moments here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ._applier import current_system, drift
from ._lock import lock_holder
from ._overrides import Overrides, StoredOverride
from ._reconciler_events import (
    OverrideState,
    Phase,
    Reason,
    ReasonKind,
    ReconcilerStatus,
    RuleStatus,
)
from ._registry import Registry
from ._settings import Settings
from ._state import ApplyRecord, State

__all__ = ["JSON_VERSION", "DaemonView", "pin_json", "status_json", "to_iso"]

JSON_VERSION = 1  # of the --json shapes; bumped only on an incompatible change


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonView:
    """What a running daemon adds to the status: its reconciler's snapshot and who it is.

    ``wall_now`` and ``snapshot.now`` are the same moment on the wall clock and on the daemon's
    clock, to convert the snapshot's times.
    """

    snapshot: ReconcilerStatus
    wall_now: float
    pid: int
    started: float | None  # wall clock
    dry_run: bool = False
    rejected: tuple[float, str] | None = None  # the last rejected reload (wall clock, why)

    def wall(self, t: float | None) -> float | None:
        return None if t is None else self.wall_now + (t - self.snapshot.now)


def to_iso(ts: float | None) -> str | None:
    """ISO 8601 in UTC, as JSON consumers parse it."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def status_json(
    settings: Settings,
    registry: Registry,
    state: State,
    only: Sequence[str] = (),
    *,
    overrides: Overrides | None = None,
    daemon: DaemonView | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The status object (docs/control.md, "Status JSON"); ``only`` limits ``modules``.

    ``now`` (wall clock) decides whether a time in a sentence needs its date.
    """
    now = daemon.wall_now if daemon is not None else time.time() if now is None else now
    names = list(only) or [m.name for m in registry.modules]
    holder = lock_holder(settings.lock_file)
    ip = state.in_progress
    pins = {} if overrides is None else dict(overrides.pins)
    paused = daemon.snapshot.paused if daemon is not None else bool(overrides and overrides.paused)
    warnings = [w for w in (state.uncertain, drift(settings, state)) if w]
    if daemon is not None and daemon.rejected is not None:
        at, why = daemon.rejected
        warnings.append(
            f"a reload at {local_time(at, now)} was rejected, so the daemon still follows the "
            f"rules it loaded before: {why}; fix it, then reload again "
            "(`systemctl reload runtime-modules`)"
        )
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
        "modules": [
            _module_json(registry, state, n, pin=pins.get(n), daemon=daemon, now=now) for n in names
        ],
        "last_apply": _record_json(state.last_apply),
        "in_progress": None
        if ip is None
        else {
            "apply_id": ip.apply_id,
            "pid": ip.pid,
            "started": to_iso(ip.started),
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
            "since": to_iso(holder.since),
        },
        "uncertain": state.uncertain,
        "warnings": warnings,
        "paused": paused,
        "overrides": [pin_json(p) for _, p in sorted(pins.items())],
        "daemon": None if daemon is None else _daemon_json(daemon),
    }


def module_brief(registry: Registry, state: State, name: str) -> dict[str, Any]:
    """A module as ``list --json`` shows it."""
    info = registry.module(name)
    return {
        "name": name,
        "description": info.description,
        "state": state.module_status(name).status.value,
        "applied": name in state.applied,
    }


def _module_json(
    registry: Registry,
    state: State,
    name: str,
    *,
    pin: StoredOverride | None,
    daemon: DaemonView | None,
    now: float,
) -> dict[str, Any]:
    ms = state.module_status(name)
    row = module_brief(registry, state, name)
    row["message"] = ms.message
    row["since"] = to_iso(ms.since)
    row["kernel_changes"] = list(registry.module(name).kernel_changes)
    if daemon is None:
        row["wanted"] = None if pin is None else pin.state is OverrideState.ON
        row["why"] = None if pin is None else _pin_why(pin, now)
        return row
    snap = daemon.snapshot
    reason = next((m.reason for m in snap.modules if m.name == name), None)
    if reason is None:  # no rule names it, nothing pins or applies it
        reason = Reason(kind=ReasonKind.NO_RULE, wanted=False)
    rules = [r for r in snap.rules if name in r.modules and r.phase is not Phase.INACTIVE]
    row["wanted"] = name in snap.wanted
    row["why"] = _why(reason, pin, rules, daemon.wall, now)
    return row


def pin_json(pin: StoredOverride) -> dict[str, Any]:
    return {
        "module": pin.module,
        "state": pin.state.value,
        "until": to_iso(pin.until),
        "persistent": pin.persistent,
        "source": {"uid": pin.source.uid, "user": pin.source.user, "command": pin.source.command},
        "created": to_iso(pin.created),
    }


# --- why -------------------------------------------------------------------------------------


def local_time(ts: float, now: float) -> str:
    """A moment as a user reads it: "18:00:00" on the day of ``now``, else "2026-05-02 18:00"."""
    moment = datetime.fromtimestamp(ts).astimezone()
    if moment.date() == datetime.fromtimestamp(now).astimezone().date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M")


def _pin_text(pin: StoredOverride, now: float) -> str:
    text = f"pinned {pin.state.value} by {pin.source.user}"
    if pin.until is not None:
        text += f" until {local_time(pin.until, now)}"
    if pin.persistent:
        text += ", across reboots"
    if pin.source.command:
        text += f" ({pin.source.command})"
    return text


def _pin_why(pin: StoredOverride, now: float) -> dict[str, Any]:
    kind = ReasonKind.OVERRIDE_ON if pin.state is OverrideState.ON else ReasonKind.OVERRIDE_OFF
    return {"kind": kind.value, "text": _pin_text(pin, now), "rules": [], "override": pin_json(pin)}


def _matched(matches: Sequence[str]) -> str:
    # Devices are named by devpath ("/devices/…"), links by interface name.
    parts = [f"device {m}" if m.startswith("/") else f"link {m}" for m in matches[:3]]
    if len(matches) > 3:
        parts.append(f"{len(matches) - 3} more")
    return f" ({', '.join(parts)})" if parts else ""


def _rule_text(rule: RuleStatus, wall: Callable[[float | None], float | None], now: float) -> str:
    until = wall(rule.until)
    at = "" if until is None else local_time(until, now)
    if rule.phase is Phase.ACTIVE:
        return f"rule {rule.name} active{_matched(rule.matches)}"
    if rule.phase is Phase.LINGERING:
        return f"rule {rule.name} lingering until {at}: it no longer holds"
    return f"rule {rule.name} holds{_matched(rule.matches)}, active at {at} if it stays"


def _why(
    reason: Reason,
    pin: StoredOverride | None,
    rules: Sequence[RuleStatus],
    wall: Callable[[float | None], float | None],
    now: float,
) -> dict[str, Any]:
    wanting = [r for r in rules if r.phase in (Phase.ACTIVE, Phase.LINGERING)]
    settling = [r for r in rules if r.phase is Phase.SETTLING]
    rules_text = "; ".join(_rule_text(r, wall, now) for r in [*wanting, *settling])
    kind = reason.kind
    if kind in (ReasonKind.OVERRIDE_ON, ReasonKind.OVERRIDE_OFF):
        if pin is not None:
            text = _pin_text(pin, now)
        else:
            assert reason.override is not None
            text = f"pinned {reason.override.state.value} by {reason.override.source}"
        if rules_text:
            text += f"; the rules alone: {rules_text}"
    elif kind is ReasonKind.PAUSED:
        text = f"automation paused: kept {'on' if reason.wanted else 'off'}"
        if rules_text:
            text += f"; the rules alone: {rules_text}"
    elif kind is ReasonKind.RULES:
        text = rules_text or "wanted by " + ", ".join(reason.rules)
    elif kind is ReasonKind.HELD:
        text = (
            f"kept while rule {', '.join(reason.rules)} first settles "
            "(the daemon started or the rules were reloaded)"
        )
    else:
        text = "no rule wants it" + (f"; {rules_text}" if rules_text else "")
    return {
        "kind": kind.value,
        "text": text,
        "rules": [
            {
                "name": r.name,
                "phase": r.phase.value,
                "matches": list(r.matches),
                "until": to_iso(wall(r.until)),
            }
            for r in rules
        ],
        "override": None if pin is None else pin_json(pin),
    }


# --- the daemon ------------------------------------------------------------------------------


def _daemon_json(view: DaemonView) -> dict[str, Any]:
    snap = view.snapshot
    iso = _iso_from(view)
    return {
        "pid": view.pid,
        "since": to_iso(view.started),
        "dry_run": view.dry_run,
        # A dry run writes no state: what it would have applied by now lives only in the daemon.
        "dry_run_applied": sorted(snap.applied) if view.dry_run else None,
        "wanted": sorted(snap.wanted),
        "paused_modules": None if snap.paused_modules is None else sorted(snap.paused_modules),
        "rules": [
            {
                "name": r.name,
                "phase": r.phase.value,
                "since": iso(r.since),
                "until": iso(r.until),
                "matches": list(r.matches),
                "modules": sorted(r.modules),
                "held": r.held,
            }
            for r in snap.rules
        ],
        "applying": None
        if snap.in_flight is None
        else {
            "apply_id": snap.in_flight.apply_id,
            "target": sorted(snap.in_flight.target),
            "started": iso(snap.in_flight.started),
        },
        "pending": None
        if snap.pending is None
        else {
            "target": sorted(snap.pending.target),
            "at": iso(snap.pending.at),  # null: right after the apply in flight
            "rebuild": snap.pending.rebuild,
        },
        "backoff": None
        if snap.backoff is None
        else {
            "failures": snap.backoff.failures,
            "target": sorted(snap.backoff.target),
            "retry_at": iso(snap.backoff.retry_at),
        },
        "given_up": None
        if snap.given_up is None
        else {
            "target": sorted(snap.given_up.target),
            "failures": snap.given_up.failures,
            "message": snap.given_up.message,
            "at": iso(snap.given_up.at),
        },
    }


def _iso_from(view: DaemonView) -> Callable[[float | None], str | None]:
    return lambda t: to_iso(view.wall(t))


def _record_json(record: ApplyRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "apply_id": record.apply_id,
        "started": to_iso(record.started),
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
