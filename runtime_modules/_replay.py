"""Replay: captured events through the same evaluator and reconciler, on a virtual clock.

The daemon's pure core (``_pipeline.Pipeline``) driven from a capture file with the capture's
own timestamps: same code, so a replay shows what the daemon would have done. Free of I/O but for
reading the capture file. Here are:

- Parsers for the captures users can make with stock tools (docs/daemon.md, "Replay"):

  * ``udevadm monitor --udev --property`` (``--property`` is needed but for ``remove``; KERNEL
    blocks are skipped: the daemon listens to udev's events, after its rules ran). Timestamps
    are CLOCK_MONOTONIC seconds.
  * ``ip monitor link``, ``ip -ts monitor link`` (ISO time per line), ``ip -t monitor link``
    (``Timestamp:`` lines); ``ip -d …`` adds the link kind, ``ip monitor link address`` the
    addresses (point-to-point ones too; one that failed DAD is removed, as live); ``ip monitor
    all`` tags its lines ([LINK], [ADDR], [ROUTE]…) and only the first two are read. Without
    timestamps, events count as simultaneous.

  A file may hold blocks of both kinds (two monitors writing to one file). Each kind keeps its
  own clock, so each is placed on the virtual clock relative to its own first event.

A decision is one reconciler action at a virtual time: rule settling, activated, lingering,
deactivated; apply scheduled, would start (with the set), given up. Applies are simulated: each
succeeds after ``apply_time`` seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from ._decision_log import describe, set_text
from ._dumps import tags_of
from ._errors import DumpError
from ._evaluate import IncrementalEvaluator
from ._pipeline import Pipeline
from ._reconciler import Reconciler
from ._reconciler_events import (
    Action,
    ApplyFinished,
    RuleSettling,
    StartApply,
)
from ._rules import RuleSet
from ._world import (
    EVENT_ONLY_PROPERTIES,
    AddressAdded,
    AddressRemoved,
    Device,
    DeviceMoved,
    DeviceRemoved,
    DeviceUpsert,
    Link,
    LinkRemoved,
    LinkUpsert,
    OperState,
    World,
    WorldChange,
)

__all__ = [
    "Decision",
    "TimedChange",
    "add_events_option",
    "parse_events",
    "read_events",
    "replay",
    "replay_changes",
    "run_events",
    "steady_applied",
    "summary",
]

# A capture is text a user made; hundreds of MiB would be a wrong file, not a capture.
MAX_CAPTURE_BYTES = 256 * 1024 * 1024
# After the last event the virtual clock runs on until nothing is pending; this many steps
# bound a pathological case (the reconciler always has an end: linger, quiet, backoff cap).
MAX_IDLE_STEPS = 100_000
_CAPTURE_HELP = (
    "capture one with `udevadm monitor --udev --property > FILE` or `ip -ts monitor link > FILE`"
)


@dataclass(frozen=True, slots=True)
class Decision:
    """One action of the reconciler at ``time`` (seconds on the replay's virtual clock)."""

    time: float
    action: Action
    text: str

    def __str__(self) -> str:
        return f"{self.time:+10.3f}s  {self.text}"


# --- captures ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimedChange:
    """A world change at ``time`` on its source's clock (``clock`` names it)."""

    time: float
    clock: str  # "udev" (CLOCK_MONOTONIC) or "ip" (wall clock)
    change: WorldChange
    line: int  # where in the file, for messages


_UDEV_HEADER = re.compile(
    r"^(?P<src>UDEV|KERNEL)\s*\[\s*(?P<ts>\d+(?:\.\d+)?)\]\s+(?P<action>\S+)\s+(?P<devpath>/\S*)"
    r"(?:\s+\((?P<subsystem>[^)]*)\))?\s*$"
)
_IP_TS = re.compile(r"^\[(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)\]\s*")
_IP_T = re.compile(r"^Timestamp: (?P<date>.+?) (?P<usec>\d+) usec\s*$")
_IP_LINK = re.compile(
    r"^(?P<deleted>Deleted )?(?P<index>\d+): (?P<name>[^:\s]+): <(?P<flags>[^>]*)>(?P<rest>.*)$"
)
_IP_ADDR = re.compile(
    r"^(?P<deleted>Deleted )?(?P<index>\d+): (?P<name>\S+)\s+inet6? "
    r"(?P<address>[0-9a-fA-F.:]+(?:/\d+| peer [0-9a-fA-F.:]+/\d+))(?P<rest>.*)$"
)
_IP_STATE = re.compile(r"\bstate (\S+)")
_IP_ADDRESS = re.compile(r"^\s+link/\S+(?: (?P<mac>[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2})+))?")
# First words of `ip -d` detail lines that are not a link kind (iproute2 ip/ipaddress.c).
_NOT_KINDS = frozenset(
    {"addrgenmode", "numtxqueues", "altname", "alias", "vf", "prop", "link-netnsid", "link-netns"}
)


def _udev_change(
    action: str, devpath: str, subsystem: str | None, props: dict[str, str]
) -> WorldChange:
    if action == "remove":
        return DeviceRemoved(devpath)
    tags = tags_of(props)
    device = Device(
        devpath=devpath,
        subsystem=props.get("SUBSYSTEM", subsystem) or None,
        devtype=props.get("DEVTYPE"),
        driver=props.get("DRIVER"),
        properties={k: v for k, v in props.items() if k not in EVENT_ONLY_PROPERTIES},
        tags=tags,
    )
    old = props.get("DEVPATH_OLD")
    if action == "move" and old:
        return DeviceMoved(old, device)
    return DeviceUpsert(device)


def _wall(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _ip_t(date: str, usec: str) -> float:
    return time.mktime(time.strptime(date, "%a %b %d %H:%M:%S %Y")) + int(usec) / 1e6


def parse_events(text: str, source: str) -> list[TimedChange]:
    """The world changes of a capture, in file order.

    Raises:
        DumpError: a block that looks like an event but cannot be read, naming the line.
    """
    lines = text.splitlines()
    out: list[TimedChange] = []
    ip_time: float | None = None  # from the last `ip -t` Timestamp: line
    i = 0
    while i < len(lines):
        line = lines[i]
        number = i + 1
        i += 1
        if header := _UDEV_HEADER.match(line):
            props: dict[str, str] = {}
            while i < len(lines) and lines[i].strip() and "=" in lines[i]:
                key, _, value = lines[i].partition("=")
                props[key.strip()] = value
                i += 1
            if header["src"] != "UDEV":
                continue
            devpath = props.get("DEVPATH", header["devpath"])
            if not devpath.startswith("/"):
                raise DumpError(f"{source}:{number}: DEVPATH {devpath!r} does not start with '/'")
            if not props and header["action"] != "remove":
                # A header alone would replace what the device is known by with nothing: the
                # replay would decide what the daemon, which gets the properties, never would.
                raise DumpError(
                    f"{source}:{number}: a udev event without its properties; capture with "
                    "`udevadm monitor --udev --property > FILE`"
                )
            change = _udev_change(header["action"], devpath, header["subsystem"], props)
            out.append(TimedChange(float(header["ts"]), "udev", change, number))
            continue
        if stamp := _IP_T.match(line):
            try:
                ip_time = _ip_t(stamp["date"], stamp["usec"])
            except ValueError:
                raise DumpError(f"{source}:{number}: unreadable timestamp {line!r}") from None
            continue
        when = ip_time
        body = line
        if ts := _IP_TS.match(line):
            try:
                when = _wall(ts["ts"])
            except ValueError:
                raise DumpError(f"{source}:{number}: unreadable timestamp {ts['ts']!r}") from None
            body = line[ts.end() :]
        if body.startswith("["):  # `ip monitor all` tags each line: [LINK], [ADDR], [ROUTE]…
            tag, _, rest = body[1:].partition("]")
            if tag not in ("LINK", "ADDR"):
                continue
            body = rest
        if address := _IP_ADDR.match(body):
            change = _address_change(address, source, number)
            out.append(TimedChange(when or 0.0, "ip", change, number))
            continue
        link = _IP_LINK.match(body)
        if link is None:
            continue  # headers, route lines of `ip monitor all`, address details, blank lines
        details: list[str] = []
        while i < len(lines) and lines[i][:1].isspace() and lines[i].strip():
            details.append(lines[i])
            i += 1
        out.append(TimedChange(when or 0.0, "ip", _ip_change(link, details), number))
    return out


def _address_change(match: re.Match[str], source: str, number: int) -> WorldChange:
    index = int(match["index"])
    text = match["address"]
    try:
        if " peer " in text:  # a point-to-point address: "10.0.0.1 peer 10.0.0.2/32"
            local, peer = text.split(" peer ")
            address = f"{ipaddress.ip_address(local)} peer {ipaddress.ip_interface(peer)}"
        else:
            address = str(ipaddress.ip_interface(text))
    except ValueError:
        raise DumpError(f"{source}:{number}: {text!r} is not an IP address") from None
    if match["deleted"] or "dadfailed" in match["rest"].split():
        return AddressRemoved(index, address)
    return AddressAdded(index, address)


def _ip_change(link: re.Match[str], details: list[str]) -> WorldChange:
    index = int(link["index"])
    if link["deleted"]:
        return LinkRemoved(index)
    name = link["name"].split("@", 1)[0]
    flags = set(link["flags"].split(","))
    state = _IP_STATE.search(link["rest"])
    mac: str | None = None
    kind: str | None = None
    for n, detail in enumerate(details):
        if address := _IP_ADDRESS.match(detail):
            mac = address["mac"].lower() if address["mac"] else None
            if n + 1 < len(details):
                word = details[n + 1].split()[0]
                # "bridge_slave …" (iproute2's "%s_slave") is the link's place in a bridge or
                # bond, not its kind: a physical NIC there has none, as netlink says.
                if (
                    word not in _NOT_KINDS
                    and re.fullmatch(r"[a-z][a-z0-9_]*", word)
                    and not word.endswith(("_slave", "_subport"))
                ):
                    kind = word
            break
    return LinkUpsert(
        Link(
            index=index,
            ifname=name,
            kind=kind,
            operstate=OperState.parse(state[1] if state else None),
            carrier="LOWER_UP" in flags,
            mac=mac,
        )
    )


def read_events(path: Path) -> list[TimedChange]:
    """``parse_events`` of the file at ``path``.

    Raises:
        DumpError: the file is missing, unreadable, too big, or holds no event.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CAPTURE_BYTES + 1)
    except OSError as exc:
        raise DumpError(f"{path}: cannot read the event capture: {exc.strerror}") from None
    if len(data) > MAX_CAPTURE_BYTES:
        raise DumpError(f"{path}: over {MAX_CAPTURE_BYTES >> 20} MiB; not an event capture")
    events = parse_events(data.decode("utf-8", "backslashreplace"), str(path))
    if not events:
        raise DumpError(f"{path}: no udev or link event found; {_CAPTURE_HELP}")
    return events


def _on_virtual_clock(events: Sequence[TimedChange]) -> list[tuple[float, WorldChange]]:
    # Each clock starts at 0 with its own first event; the sort is stable, so simultaneous
    # events keep their file order.
    origin: dict[str, float] = {}
    for e in events:
        origin.setdefault(e.clock, e.time)
    timed = [(max(0.0, e.time - origin[e.clock]), e.change) for e in events]
    timed.sort(key=lambda pair: pair[0])
    return timed


# --- replaying --------------------------------------------------------------------------------


def replay(
    events_path: Path | Sequence[Path],
    rules: RuleSet,
    world: World,
    *,
    applied: frozenset[str] | None = None,
    apply_time: float = 0.0,
    reconciler: Reconciler | None = None,
) -> list[Decision]:
    """Every decision the daemon would make on the captured events, from ``world`` on.

    ``world`` is copied, not changed. ``applied`` is what is applied at the start; None means
    what the rules want in ``world``, as a daemon that has been running would have applied (then
    the start itself changes nothing and only the events make decisions). Applies succeed
    ``apply_time`` seconds after they start. The first event of each clock is at 0 s, the time
    of the start.

    Raises:
        DumpError: a capture cannot be read.
    """
    paths = [events_path] if isinstance(events_path, Path) else list(events_path)
    events: list[TimedChange] = []
    for path in paths:
        events.extend(read_events(path))
    return replay_changes(
        _on_virtual_clock(events),
        rules,
        world,
        applied=applied,
        apply_time=apply_time,
        reconciler=reconciler,
    )


def replay_changes(
    timed: Sequence[tuple[float, WorldChange]],
    rules: RuleSet,
    world: World,
    *,
    applied: frozenset[str] | None = None,
    apply_time: float = 0.0,
    reconciler: Reconciler | None = None,
) -> list[Decision]:
    """``replay`` of changes already placed on the virtual clock (sorted by time)."""
    pipeline = Pipeline(rules, reconciler or Reconciler(), world.copy())
    rec = pipeline.reconciler
    start = 0.0
    if applied is None:
        # Steady: the daemon has been running for long in this world. Start it early enough
        # that every rule holding now has settled by 0 s, and show only what happens from 0 s.
        applied = steady_applied(rules, pipeline.world)
        start = -1.0 - max((r.settle for r in rules.rules if r.enabled), default=0.0)
    decisions: list[Decision] = []
    current = applied
    flight: tuple[float, StartApply] | None = None

    def record(actions: list[Action] | None, now: float) -> None:
        nonlocal flight
        for action in actions or ():
            text = describe(action, now, matches=_matches_of(action, pipeline), applied=current)
            decisions.append(Decision(now, action, text))
            if isinstance(action, StartApply):
                flight = (now + apply_time, action)

    def advance(until: float) -> None:
        nonlocal flight, current
        for _ in range(MAX_IDLE_STEPS):
            wake = rec.next_wakeup
            done = flight[0] if flight is not None else None
            due = min((t for t in (wake, done) if t is not None), default=None)
            if due is None or due > until:
                return
            if flight is not None and done == due:
                started = flight[1]
                flight = None
                current = started.target
                record(
                    rec.handle(
                        ApplyFinished(apply_id=started.apply_id, ok=True, applied=current), due
                    ),
                    due,
                )
            else:
                record(rec.tick(due), due)

    record(pipeline.coldplug(applied, start), start)
    advance(0.0)
    for at, change in timed:
        advance(at)
        record(pipeline.feed([change], at), at)
    advance(math.inf)
    return [d for d in decisions if d.time >= 0.0]


def steady_applied(rules: RuleSet, world: World) -> frozenset[str]:
    """The modules of the enabled rules that hold in ``world``: what a running daemon applied."""
    evaluator = IncrementalEvaluator(rules)
    evaluator.reset(world)
    results = evaluator.results()
    return frozenset(
        m for r in rules.rules if r.enabled and results[r.name].holds for m in r.modules
    )


def _matches_of(action: Action, pipeline: Pipeline) -> tuple[str, ...]:
    if isinstance(action, RuleSettling):
        return pipeline.matches(action.rule)
    return ()


# --- the CLI's two lines ----------------------------------------------------------------------


def add_events_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--events FILE`` (repeatable) and ``--apply-time`` to the ``simulate`` parser."""
    parser.add_argument(
        "--events",
        type=Path,
        action="append",
        metavar="FILE",
        help="replay a capture (`udevadm monitor --udev --property`, `ip -ts monitor link`) "
        "on a virtual clock and print each decision with its time",
    )
    parser.add_argument(
        "--from-base",
        action="store_true",
        help="with --events: start from the base system (nothing applied), as after a reboot; "
        "by default what the rules want at the start is taken as applied",
    )
    parser.add_argument(
        "--apply-time",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --events: how long each simulated apply takes (default 0)",
    )


def run_events(
    args: argparse.Namespace,
    rules: RuleSet,
    world: World,
    *,
    applied: frozenset[str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Replay ``args.events`` from ``world`` and print the decisions; returns the exit code.

    ``applied`` defaults to the steady set, or nothing with ``--from-base``.
    """
    out = sys.stdout if out is None else out
    if applied is None and getattr(args, "from_base", False):
        applied = frozenset()
    apply_time = float(getattr(args, "apply_time", 0.0) or 0.0)
    if not math.isfinite(apply_time) or apply_time < 0:
        raise DumpError(f"--apply-time {apply_time!r}: give a number of seconds >= 0")
    decisions = replay(list(args.events), rules, world, applied=applied, apply_time=apply_time)
    enabled = sum(r.enabled for r in rules.rules)
    start = steady_applied(rules, world) if applied is None else applied
    starts = sum(isinstance(d.action, StartApply) for d in decisions)
    if getattr(args, "json", False):
        data = {
            "events": [str(p) for p in args.events],
            "rules": enabled,
            "start": {
                "devices": len(world.devices),
                "links": len(world.links),
                "applied": sorted(start),
            },
            "decisions": [
                {"time": round(d.time, 6), "text": d.text, **d.action.to_json()} for d in decisions
            ],
            "applies": starts,
        }
        json.dump(data, out, indent=2)
        out.write("\n")
        return 0
    out.write(
        f"replaying {', '.join(map(str, args.events))}: {enabled} rules, "
        f"{len(world.devices)} devices and {len(world.links)} links at the start; "
        f"applied: {set_text(start)}\n"
    )
    for decision in decisions:
        out.write(f"{decision}\n")
    out.write(f"{starts} {'apply' if starts == 1 else 'applies'} would run\n")
    return 0


def summary(decisions: Iterable[Decision]) -> Mapping[str, int]:
    """How many decisions of each kind (for tests and benchmarks)."""
    counts: dict[str, int] = {}
    for d in decisions:
        name = type(d.action).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts
