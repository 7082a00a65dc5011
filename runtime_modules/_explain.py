"""Why a rule does or does not hold, in words and in JSON.

For a condition that holds, the explanation names what matched. For one that does not, it
says what was looked for and the closest near-misses: the devices (or links) that match the
most keys of the condition, with the values that differ::

    rule gaming-on-nvidia-gpu: no device with subsystem=pci and PCI_ID=10DE:*;
      closest: /devices/pci0000:00/0000:00:08.1/0000:c4:00.0 has PCI_ID=1002:15BF

Pure, like evaluation: the world and the evaluation go in, explanations come out. Finding
near-misses looks at every device once per failing condition, which is fine for a command a
person runs; the daemon never calls this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import Any

from ._evaluate import Evaluation, device_matches, link_matches
from ._rules import (
    AllOf,
    AnyOf,
    Condition,
    DeviceCondition,
    LinkCondition,
    Networks,
    Not,
    Pattern,
    RuleSet,
)
from ._world import Device, Link, World

__all__ = ["ConditionReport", "Explanation", "Mismatch", "NearMiss", "describe", "explain"]

# Near-misses kept per condition, and matches named in the one-line form before "and N more".
MAX_CLOSEST = 3
MAX_SHOWN = 3
# Values longer than this are cut in the text form (a MODALIAS, a 64 KiB fuzzed property).
MAX_VALUE = 80


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One key of a condition that a near-miss does not satisfy."""

    key: str  # "subsystem", a property name, "attribute boot_vga", "tag", "parent"
    wanted: str  # the pattern, as written
    actual: str | None  # the value found; None when absent

    def text(self) -> str:
        if self.key == "parent":
            closest = f" (closest: {self.actual})" if self.actual else ""
            return f"no ancestor with {self.wanted}{closest}"
        if self.key == "tag":
            return f"tags {self.actual}" if self.actual else "no tags"
        if self.actual is None:
            return "no IP address" if self.key == "ip" else f"no {self.key}"
        return f"{self.key}={_cut(self.actual)}"


@dataclass(frozen=True, slots=True)
class NearMiss:
    """A device or link that matches ``matched`` of the ``total`` keys of a condition."""

    name: str  # devpath or ifname
    matched: int
    total: int
    mismatches: tuple[Mismatch, ...]

    def text(self) -> str:
        return f"{self.name} has " + " and ".join(m.text() for m in self.mismatches)

    def to_json(self) -> dict[str, Any]:
        return {
            "match": self.name,
            "matched": self.matched,
            "of": self.total,
            "differs": [
                {"key": m.key, "wanted": m.wanted, "actual": m.actual} for m in self.mismatches
            ],
        }


@dataclass(frozen=True, slots=True)
class ConditionReport:
    """One condition of a rule: whether it holds, and why."""

    kind: str  # "device", "link", "all", "any", "not"
    description: str
    holds: bool
    matches: tuple[str, ...] = ()
    closest: tuple[NearMiss, ...] = ()
    children: tuple[ConditionReport, ...] = ()
    note: str | None = None  # why there is no near-miss

    def lines(self) -> list[str]:
        """The text form: the first line, then indented lines for the parts of a combinator."""
        if self.kind in ("device", "link"):
            thing = "device" if self.kind == "device" else "link"
            if self.holds:
                return [f"a {thing} with {self.description}: {_names(self.matches)}"]
            text = f"no {thing} with {self.description}"
            if self.closest:
                text += "; closest: " + self.closest[0].text()
            elif self.note:
                text += f" ({self.note})"
            return [text]
        if self.kind == "not":
            child = self.children[0]
            if self.holds:
                return [f"not ({_first(child)}): it does not hold"]
            return [f"not (…), but it holds: {_first(child)}"]
        word = "all of" if self.kind == "all" else "any of"
        if self.holds:
            head = f"{word}: holds"
        elif self.kind == "all":
            head = "all of: not all hold"
        else:
            head = "any of: none holds"
        out = [head]
        for child in self.children:
            sub = child.lines()
            mark = "✓" if child.holds else "✗"
            out.append(f"  {mark} {sub[0]}")
            out.extend(f"    {line}" for line in sub[1:])
        return out

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "condition": self.description,
            "holds": self.holds,
            "matches": list(self.matches),
        }
        if self.kind in ("device", "link"):
            data["closest"] = [c.to_json() for c in self.closest]
            if self.note:
                data["note"] = self.note
        else:
            data["conditions"] = [c.to_json() for c in self.children]
        return data


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why one rule is or is not active."""

    rule: str
    modules: tuple[str, ...]
    enabled: bool
    condition: ConditionReport
    source: str

    # Read from the report, so the verdict and its reasons come from one computation.
    @property
    def holds(self) -> bool:
        return self.condition.holds

    @property
    def matches(self) -> tuple[str, ...]:
        return self.condition.matches

    @property
    def active(self) -> bool:
        return self.enabled and self.holds

    def text(self) -> str:
        lines = self.condition.lines()
        head = f"rule {self.rule}: "
        if not self.enabled:
            head += "disabled (enabled = false); its condition " + (
                "holds: " if self.holds else "does not hold: "
            )
        out = [head + lines[0], *lines[1:]]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "modules": list(self.modules),
            "enabled": self.enabled,
            "active": self.active,
            "matches": list(self.matches),
            "source": self.source,
            "why": self.text().splitlines(),
            "condition": self.condition.to_json(),
        }


def _cut(text: str) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_SHOWN])
    if len(names) > MAX_SHOWN:
        shown += f" (and {len(names) - MAX_SHOWN} more)"
    return shown


def _first(report: ConditionReport) -> str:
    return report.lines()[0]


# --- describing conditions ------------------------------------------------------------------


def _pattern_text(key: str, p: Pattern) -> str:
    if key == "tag":
        return f"tag {p}"
    return f"{key}={p}"


def describe(c: Condition) -> str:
    """A condition in words: "subsystem=pci and PCI_ID=10DE:*", "ifname=lab0 and …"."""
    if isinstance(c, DeviceCondition):
        text = " and ".join(_pattern_text(k, p) for k, p in c.key_patterns())
        if c.parent is not None:
            text += (" " if text else "") + f"below a device with {describe(c.parent)}"
        return text
    if isinstance(c, LinkCondition):
        return " and ".join(f"{k}={v}" for k, v in _link_keys(c))
    if isinstance(c, Not):
        return f"not ({describe(c.item)})"
    if isinstance(c, AllOf):
        return "(" + " and ".join(describe(i) for i in c.items) + ")"
    # Inside "or", a conjunction of keys gets its own parentheses: "(a and b) or c", not "a and b
    # or c", which reads either way.
    return "(" + " or ".join(_grouped(describe(i)) for i in c.items) + ")"


def _grouped(text: str) -> str:
    return f"({text})" if " and " in text and not text.startswith("(") else text


def _link_keys(c: LinkCondition) -> list[tuple[str, str]]:
    out = [(k, str(getattr(c, k))) for k in ("ifname", "kind", "operstate", "mac") if getattr(c, k)]
    if c.carrier is not None:
        out.append(("carrier", str(c.carrier).lower()))
    if c.ip is not None:
        out.append(("ip", str(c.ip)))
    return out


# --- near-misses ----------------------------------------------------------------------------

Getter = Callable[[Any], str | None]
Check = tuple[str, str, Getter, Callable[[Any], bool]]  # key, wanted, actual value, test


def _test(p: Pattern, get: Getter, item: Any) -> bool:
    return p.match(get(item))


def _has_tag(p: Pattern, d: Device) -> bool:
    return any(p.match(t) for t in d.tags)


def _tags_text(d: Device) -> str | None:
    return ":".join(sorted(d.tags)) or None


def _getter(name: str) -> Getter:
    return attrgetter(name)


def _property(key: str) -> Getter:
    return lambda d: d.properties.get(key)


def _attribute(key: str) -> Getter:
    def get(d: Any) -> str | None:
        value = d.attributes.get(key)
        return None if value is None else str(value).rstrip()

    return get


def _check(key: str, p: Pattern, get: Getter) -> Check:
    return (key, str(p), get, partial(_test, p, get))


def _device_checks(c: DeviceCondition) -> list[Check]:
    """(key, wanted, actual value of a device, test) for every key of ``c`` but ``parent``."""
    checks: list[Check] = [
        _check(name, p, _getter(name))
        for name in ("subsystem", "devtype", "driver", "sysname", "devpath")
        if (p := getattr(c, name)) is not None
    ]
    checks.extend(_check(key, p, _property(key)) for key, p in c.properties)
    checks.extend(_check(f"attribute {key}", p, _attribute(key)) for key, p in c.attributes)
    checks.extend(("tag", str(p), _tags_text, partial(_has_tag, p)) for p in c.tags)
    return checks


def _rank(
    candidates: Iterable[Any], checks: list[Check], name: Callable[[Any], str], minimum: int = 1
) -> list[Any]:
    """The items matching the most checks (at least ``minimum``), best first, then by name."""
    scored = []
    for item in candidates:
        matched = sum(1 for check in checks if check[3](item))
        if matched >= minimum:
            scored.append((-matched, name(item), item))
    scored.sort(key=lambda s: (s[0], s[1]))
    return [item for _, _, item in scored[:MAX_CLOSEST]]


def _device_near_misses(c: DeviceCondition, world: World) -> tuple[NearMiss, ...]:
    checks = _device_checks(c)
    if c.parent is not None:
        parent = c.parent
        checks.append(
            (
                "parent",
                describe(parent),
                partial(_closest_ancestor, parent, world),
                partial(_has_ancestor, parent, world),
            )
        )
    total = len(checks)
    candidates: Iterable[Device] = world.devices.values()
    if c.subsystem is not None:
        # A near-miss of another kind of device (an i2c bus for a Thunderbolt dock) helps no one.
        subsystem = c.subsystem
        candidates = [d for d in candidates if subsystem.match(d.subsystem)]
    out = []
    # Candidates already match the subsystem: one that matches no other key of the device itself
    # is not "close" (the first PCI bridge is no near-miss of a GPU) unless the only other key is
    # `parent`, whose closest ancestor is then the news.
    own_keys = len(checks) - (c.parent is not None)
    minimum = 2 if c.subsystem is not None and own_keys > 1 else 1
    for d in _rank(candidates, checks, attrgetter("devpath"), minimum):
        mismatches = tuple(
            Mismatch(key, wanted, get(d)) for key, wanted, get, test in checks if not test(d)
        )
        out.append(NearMiss(d.devpath, total - len(mismatches), total, mismatches))
    return tuple(out)


def _has_ancestor(c: DeviceCondition, world: World, d: Device) -> bool:
    return any(device_matches(c, a, world) for a in world.ancestors(d))


def _closest_ancestor(c: DeviceCondition, world: World, d: Device) -> str | None:
    checks = _device_checks(c)
    if not checks:
        return None
    best = _rank(world.ancestors(d), checks, attrgetter("devpath"))
    if not best:
        return None
    a = best[0]
    differs = [Mismatch(k, w, get(a)).text() for k, w, get, test in checks if not test(a)]
    return f"{a.devpath} has " + " and ".join(differs) if differs else a.devpath


def _carrier_text(link: Link) -> str | None:
    return None if link.carrier is None else str(link.carrier).lower()


def _carrier(want: bool, link: Link) -> bool:
    return link.carrier is want


def _addresses_text(link: Link) -> str | None:
    return " ".join(sorted(link.addresses)) or None


def _in_networks(networks: Networks, link: Link) -> bool:
    return networks.match(link.addresses)


def _link_near_misses(c: LinkCondition, world: World) -> tuple[NearMiss, ...]:
    checks: list[Check] = [
        _check(key, p, attrgetter("operstate.value") if key == "operstate" else _getter(key))
        for key in ("ifname", "kind", "operstate", "mac")
        if (p := getattr(c, key)) is not None
    ]
    if c.carrier is not None:
        checks.append(
            ("carrier", str(c.carrier).lower(), _carrier_text, partial(_carrier, c.carrier))
        )
    if c.ip is not None:
        checks.append(("ip", str(c.ip), _addresses_text, partial(_in_networks, c.ip)))
    out = []
    for link in _rank(world.links.values(), checks, attrgetter("ifname")):
        mismatches = tuple(Mismatch(k, w, g(link)) for k, w, g, t in checks if not t(link))
        out.append(NearMiss(link.ifname, len(checks) - len(mismatches), len(checks), mismatches))
    return tuple(out)


# --- reports ----------------------------------------------------------------------------------


def _report(c: Condition, world: World) -> ConditionReport:
    if isinstance(c, DeviceCondition):
        found = tuple(
            sorted(d.devpath for d in world.devices.values() if device_matches(c, d, world))
        )
        closest = () if found else _device_near_misses(c, world)
        note = None
        if not found and not closest:
            note = "no device matches any of these keys"
            if c.subsystem is not None:
                subsystem = c.subsystem
                some = any(subsystem.match(d.subsystem) for d in world.devices.values())
                note = (
                    f"no device with subsystem={subsystem} matches any other key"
                    if some
                    else f"there is no device with subsystem={subsystem}"
                )
        return ConditionReport("device", describe(c), bool(found), found, closest, note=note)
    if isinstance(c, LinkCondition):
        links: list[Link] = sorted(
            (x for x in world.links.values() if link_matches(c, x)),
            key=lambda x: (x.ifname, x.index),
        )
        names = tuple(x.ifname for x in links)
        closest = () if names else _link_near_misses(c, world)
        note = None if names or closest else "no link matches any of these keys"
        return ConditionReport("link", describe(c), bool(names), names, closest, note=note)
    if isinstance(c, Not):
        child = _report(c.item, world)
        return ConditionReport("not", describe(c), not child.holds, (), (), (child,))
    children = tuple(_report(i, world) for i in c.items)
    if isinstance(c, AllOf):
        holds = all(ch.holds for ch in children)
    else:
        assert isinstance(c, AnyOf)
        holds = any(ch.holds for ch in children)
    matches = (
        tuple(dict.fromkeys(m for ch in children if ch.holds for m in ch.matches)) if holds else ()
    )
    kind = "all" if isinstance(c, AllOf) else "any"
    return ConditionReport(kind, describe(c), holds, matches, (), children)


def explain(
    rules: RuleSet,
    world: World,
    evaluation: Evaluation | None = None,
    modules: Iterable[str] | None = None,
) -> list[Explanation]:
    """An explanation per rule, in rule order; only rules naming one of ``modules`` if given.

    Each condition is tested here, once, and both the verdict and the reasons come from that
    (the same semantics as ``_evaluate``: same matches, same order). ``evaluation``, when given,
    must agree; it is checked, not trusted, so a disagreement is a bug found rather than an
    explanation that contradicts itself.
    """
    wanted = None if modules is None else frozenset(modules)
    out = []
    for rule in rules.rules:
        if wanted is not None and wanted.isdisjoint(rule.modules):
            continue
        report = _report(rule.when, world)
        if evaluation is not None:
            result = evaluation[rule.name]
            assert (result.holds, result.matches) == (report.holds, report.matches), rule.name
        out.append(
            Explanation(
                rule=rule.name,
                modules=rule.modules,
                enabled=rule.enabled,
                condition=report,
                source=rule.source,
            )
        )
    return out
