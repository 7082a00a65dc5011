"""The live stream of ``runtime-modules events``: the daemon's notices as event messages.

Like ``udevadm monitor``, one line per thing that happened, as it happens: normalized device and
link events (what the rules see, after udev ran its rules), rule transitions and applies
(scheduled, started, each output line, ended). ``kind`` is one of ``device``, ``link``, ``rule``,
``override``, ``apply``, ``daemon``; ``data`` carries the structured details, its times as
wall-clock Unix time (docs/control.md, "events"). Pins set, cleared or ended are said by the
control handler, which changes the override store.

A device event shows the udev action the source read (``add``, ``change``, ``bind``, ``unbind``,
``online``, ``offline``); an ancestor the source inserts along with a device had no event and is
not shown. ``World`` is read *before* a batch is applied to it (``WorldChanged`` is sent before
the world moves): a link (and a device from a source without actions) already known is a
``change``, and a removed link still has its name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ._control_protocol import EventMessage
from ._daemon_events import ActionTaken, ApplyDone, ApplyOutput, Notice, WorldChanged
from ._reconciler_events import (
    ApplyCancelled,
    ApplyGivenUp,
    ApplyScheduled,
    OverrideExpired,
    RuleActivated,
    RuleDeactivated,
    RuleLingering,
    RuleSettleCancelled,
    RuleSettling,
    StartApply,
)
from ._world import (
    AddressAdded,
    AddressRemoved,
    DeviceMoved,
    DeviceRemoved,
    DeviceUpsert,
    LinkRemoved,
    LinkUpsert,
    World,
    WorldChange,
    WorldReplaced,
)

__all__ = ["events_of"]


def events_of(
    notice: Notice, world: World | None, *, wall: float, to_wall: Callable[[float], float]
) -> Iterator[EventMessage]:
    """The event messages ``notice`` makes: one per change, action, output line or apply end.

    ``wall`` is the time of the events; ``to_wall`` converts the daemon's clock.
    """
    match notice:
        case WorldChanged(source=source, changes=changes):
            for change in changes:
                if isinstance(change, DeviceUpsert) and change.ancestor:
                    continue  # no event of its own: inserted for the rules' parent conditions
                kind, text, facts = _change(change, world)
                yield EventMessage(
                    time=wall, kind=kind, text=text, data={"source": source, **facts}
                )
        case ActionTaken(action=OverrideExpired()):
            pass  # said by the control handler, which removes the pin from the store
        case ActionTaken(action=action, text=text):
            kind, details = _action(action, to_wall)
            yield EventMessage(time=wall, kind=kind, text=text, data=details)
        case ApplyOutput(apply_id=apply_id, line=line):
            yield EventMessage(
                time=wall,
                kind="apply",
                text=f"apply #{apply_id} | {line}",
                data={"apply_id": apply_id, "line": line},
            )
        case ApplyDone(apply_id=apply_id, ok=ok, applied=applied, message=message, outcome=out):
            result = out.result.value if out is not None else "failed"
            data: dict[str, Any] = {
                "apply_id": apply_id,
                "ok": ok,
                "result": result,
                "after": sorted(applied),
                "message": message,
            }
            if out is not None:
                data |= {
                    "before": sorted(out.before),
                    "duration": round(out.duration, 3),
                    "journal_id": out.apply_id,
                }
            yield EventMessage(
                time=wall, kind="apply", text=f"apply #{apply_id} {result}: {message}", data=data
            )


def _set(names: frozenset[str]) -> list[str]:
    return sorted(names)


def _action(action: object, to_wall: Callable[[float], float]) -> tuple[str, dict[str, Any]]:
    match action:
        case RuleSettling(rule=rule, until=until):
            return "rule", {"rule": rule, "phase": "settling", "until": to_wall(until)}
        case RuleSettleCancelled(rule=rule):
            return "rule", {"rule": rule, "phase": "inactive"}
        case RuleActivated(rule=rule, matches=matches, resumed=resumed):
            return "rule", {
                "rule": rule,
                "phase": "active",
                "matches": list(matches),
                "resumed": resumed,
            }
        case RuleLingering(rule=rule, until=until):
            return "rule", {"rule": rule, "phase": "lingering", "until": to_wall(until)}
        case RuleDeactivated(rule=rule):
            return "rule", {"rule": rule, "phase": "inactive"}
        case ApplyScheduled(target=target, at=at):
            return "apply", {"step": "scheduled", "target": _set(target), "at": to_wall(at)}
        case ApplyCancelled(target=target):
            return "apply", {"step": "cancelled", "target": _set(target)}
        case StartApply(apply_id=apply_id, target=target, attempt=attempt, force=force):
            return "apply", {
                "step": "started",
                "apply_id": apply_id,
                "target": _set(target),
                "attempt": attempt,
                "force": force,
            }
        case ApplyGivenUp(target=target, failures=failures, message=message):
            return "apply", {
                "step": "given-up",
                "target": _set(target),
                "failures": failures,
                "message": message,
            }
    return "daemon", {}


def _change(change: WorldChange, world: World | None) -> tuple[str, str, dict[str, Any]]:
    devices = world.devices if world is not None else {}
    links = world.links if world is not None else {}
    match change:
        case DeviceUpsert(device=d, action=told):
            action = told or ("change" if d.devpath in devices else "add")
            about = ", ".join(x for x in (d.subsystem, d.driver and f"driver {d.driver}") if x)
            return (
                "device",
                f"{action} {d.devpath}" + (f" ({about})" if about else ""),
                {
                    "action": action,
                    "devpath": d.devpath,
                    "subsystem": d.subsystem,
                    "devtype": d.devtype,
                    "driver": d.driver,
                },
            )
        case DeviceRemoved(devpath=devpath):
            return "device", f"remove {devpath}", {"action": "remove", "devpath": devpath}
        case DeviceMoved(old_devpath=old, device=d):
            return (
                "device",
                f"move {old} -> {d.devpath}",
                {"action": "move", "devpath": d.devpath, "old_devpath": old},
            )
        case LinkUpsert(link=link):
            action = "change" if link.index in links else "add"
            state = link.operstate.value + (", carrier" if link.carrier else "")
            kind = f" ({link.kind})" if link.kind else ""
            return (
                "link",
                f"{action} {link.ifname}{kind}: {state}",
                {
                    "action": action,
                    "ifname": link.ifname,
                    "index": link.index,
                    "kind": link.kind,
                    "operstate": link.operstate.value,
                    "carrier": link.carrier,
                },
            )
        case (
            AddressAdded(index=index, address=address)
            | AddressRemoved(index=index, address=address)
        ):
            action = "address-add" if isinstance(change, AddressAdded) else "address-remove"
            known = links.get(index)
            name = known.ifname if known is not None else f"#{index}"
            verb = "added to" if isinstance(change, AddressAdded) else "removed from"
            return (
                "link",
                f"address {address} {verb} {name}",
                {"action": action, "ifname": name, "index": index, "address": address},
            )
        case LinkRemoved(index=index):
            gone = links.get(index)
            name = gone.ifname if gone is not None else f"#{index}"
            return "link", f"remove {name}", {"action": "remove", "ifname": name, "index": index}
        case WorldReplaced(devices=devs, links=lks):
            parts = [f"{len(devs)} devices" if devs is not None else "", ""]
            parts[1] = f"{len(lks)} links" if lks is not None else ""
            what = " and ".join(p for p in parts if p)
            return (
                "daemon",
                f"re-enumerated {what} (events were lost, or the rules need other facts)",
                {"action": "resync"},
            )
    return "daemon", repr(change), {}
