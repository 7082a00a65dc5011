"""Evaluation: which rules hold in a world, and which devices and links make them hold.

Pure: rules and a world go in, an ``Evaluation`` comes out; nothing here reads the clock, a file
or a socket. Settle and linger are applied over time by the reconciler: this is the instant
truth it is fed.

Two implementations give the same answer (the tests check it with hypothesis):

- ``evaluate`` computes everything from scratch: the reference, used by ``simulate``, ``explain``
  and at coldplug.
- ``IncrementalEvaluator`` keeps, per atomic condition (one ``device`` or ``link`` table), the
  set of devices or links that match it, and after a world change re-tests only what the change
  can affect: the changed device against the conditions of its subsystem (plus those that name
  no subsystem), and for ``parent`` conditions its descendants, which are found by devpath
  prefix in a sorted list. The daemon calls it on every uevent.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from ._glob import fold
from ._rules import AllOf, Condition, DeviceCondition, LinkCondition, Not, RuleSet
from ._world import (
    AddressAdded,
    AddressRemoved,
    Device,
    DeviceMoved,
    DeviceRemoved,
    DeviceUpsert,
    Link,
    LinkRemoved,
    LinkUpsert,
    World,
    WorldChange,
    WorldReplaced,
)

__all__ = [
    "Evaluation",
    "IncrementalEvaluator",
    "RuleResult",
    "device_matches",
    "evaluate",
    "link_matches",
]

Atom = DeviceCondition | LinkCondition


@dataclass(frozen=True, slots=True)
class RuleResult:
    """Whether a rule's condition holds, and the devpaths / ifnames that make it hold."""

    holds: bool
    matches: tuple[str, ...] = ()


_FALSE = RuleResult(False)


class Evaluation(Mapping[str, RuleResult]):
    """Rule name → ``RuleResult`` for every rule of a rule set (disabled ones included)."""

    __slots__ = ("_results", "rules")

    def __init__(self, rules: RuleSet, results: Mapping[str, RuleResult]) -> None:
        self.rules = rules
        self._results = dict(results)

    def __getitem__(self, name: str) -> RuleResult:
        return self._results[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Evaluation):
            return self._results == other._results
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Evaluation({self._results!r})"

    def active(self, name: str) -> bool:
        """The rule is enabled and its condition holds."""
        return self._results[name].holds and self.rules.rule(name).enabled

    def wanted_modules(self) -> dict[str, tuple[str, ...]]:
        """Module → the enabled, holding rules that want it (modules sorted, rules in order)."""
        wanted: dict[str, list[str]] = {}
        for rule in self.rules.rules:
            if rule.enabled and self._results[rule.name].holds:
                for module in rule.modules:
                    wanted.setdefault(module, []).append(rule.name)
        return {m: tuple(wanted[m]) for m in sorted(wanted)}


# --- matching one device or link ------------------------------------------------------------


def _own_match(c: DeviceCondition, d: Device) -> bool:
    """``d`` matches every key of ``c`` except ``parent``."""
    if c.subsystem is not None and not c.subsystem.match(d.subsystem):
        return False
    if c.devtype is not None and not c.devtype.match(d.devtype):
        return False
    if c.driver is not None and not c.driver.match(d.driver):
        return False
    if c.sysname is not None and not c.sysname.match(d.sysname):
        return False
    if c.devpath is not None and not c.devpath.match(d.devpath):
        return False
    props = d.properties
    for key, pattern in c.properties:
        if not pattern.match(props.get(key)):
            return False
    if c.attributes:
        attrs = d.attributes
        for key, pattern in c.attributes:
            value = attrs.get(key)
            # As udev's ATTR{}: sysfs values end in "\n", and trailing whitespace is ignored.
            if not pattern.match(None if value is None else value.rstrip()):
                return False
    if c.tags:
        folded = [fold(t) for t in d.tags]
        for pattern in c.tags:
            if not any(pattern.match_folded(t) for t in folded):
                return False
    return True


def device_matches(c: DeviceCondition, d: Device, world: World) -> bool:
    """``d`` matches ``c``, and some recorded ancestor of ``d`` matches ``c.parent``."""
    if not _own_match(c, d):
        return False
    if c.parent is None:
        return True
    return any(device_matches(c.parent, a, world) for a in world.ancestors(d))


def link_matches(c: LinkCondition, link: Link) -> bool:
    if c.ifname is not None and not c.ifname.match(link.ifname):
        return False
    if c.kind is not None and not c.kind.match(link.kind):
        return False
    if c.operstate is not None and not c.operstate.match(link.operstate.value):
        return False
    if c.carrier is not None and link.carrier is not c.carrier:
        return False
    if c.mac is not None and not c.mac.match(link.mac):
        return False
    return c.ip is None or c.ip.match(link.addresses)


# --- from atoms to rules --------------------------------------------------------------------
# Atoms (the distinct device and link tables of a rule set) are numbered once; a rule's condition
# becomes a small tree over those numbers, so evaluation never hashes a condition.

_ALL, _ANY, _NOT = "all", "any", "not"
Node = int | tuple[str, tuple["Node", ...]]


class _Plan:
    """The atoms of a rule set and each rule's condition as a tree of atom numbers."""

    __slots__ = ("atoms", "rules_of", "trees")

    def __init__(self, rules: RuleSet) -> None:
        ids: dict[Atom, int] = {}
        self.atoms: list[Atom] = []

        def compile_(c: Condition) -> Node:
            if isinstance(c, DeviceCondition | LinkCondition):
                if c not in ids:
                    ids[c] = len(self.atoms)
                    self.atoms.append(c)
                return ids[c]
            if isinstance(c, Not):
                return (_NOT, (compile_(c.item),))
            return (_ALL if isinstance(c, AllOf) else _ANY, tuple(compile_(i) for i in c.items))

        self.trees: dict[str, Node] = {r.name: compile_(r.when) for r in rules.rules}
        # Which rules each atom feeds, so a change recomputes only those.
        self.rules_of: list[list[str]] = [[] for _ in self.atoms]
        for name, tree in self.trees.items():
            for atom in dict.fromkeys(_leaves(tree)):
                self.rules_of[atom].append(name)


def _leaves(node: Node) -> Iterator[int]:
    if isinstance(node, int):
        yield node
    else:
        for child in node[1]:
            yield from _leaves(child)


def _combine(node: Node, matches: Callable[[int], tuple[str, ...]]) -> RuleResult:
    """The result of a condition tree given the sorted matches of each atom."""
    if isinstance(node, int):
        found = matches(node)
        return RuleResult(True, found) if found else _FALSE
    op, children = node
    if op == _NOT:
        return _FALSE if _combine(children[0], matches).holds else RuleResult(True)
    results = [_combine(child, matches) for child in children]
    if op == _ALL:
        if not all(r.holds for r in results):
            return _FALSE
    elif not any(r.holds for r in results):
        return _FALSE
    merged = dict.fromkeys(m for r in results if r.holds for m in r.matches)
    return RuleResult(True, tuple(merged))


def _subsystem_key(d: Device) -> str:
    return fold(d.subsystem) if d.subsystem is not None else ""


def _literal_subsystems(atom: DeviceCondition) -> frozenset[str] | None:
    return atom.subsystem.literals if atom.subsystem is not None else None


def _index(
    conditions: Iterable[tuple[int, DeviceCondition | None]],
) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
    """Numbered device conditions by the folded subsystem they can match, and the rest.

    The first maps a subsystem to every condition a device of it may match (its own ones and
    those that name no subsystem); the second is for devices of any other subsystem.
    """
    wildcard: list[int] = []
    specific: dict[str, list[int]] = {}
    for i, c in conditions:
        literals = None if c is None else _literal_subsystems(c)
        if literals is None:
            wildcard.append(i)
        else:
            for s in literals:
                specific.setdefault(s, []).append(i)
    return {s: (*ids, *wildcard) for s, ids in specific.items()}, tuple(wildcard)


def _link_order(hits: Iterable[tuple[str, int]]) -> tuple[str, ...]:
    """Matching links as ifnames, ordered by name (then index: recordings may repeat names)."""
    return tuple(name for name, _ in sorted(hits))


def evaluate(rules: RuleSet, world: World) -> Evaluation:
    """Every rule of ``rules`` evaluated on ``world``, from scratch."""
    plan = _Plan(rules)
    by_subsystem: dict[str, list[Device]] = {}
    for d in world.devices.values():
        by_subsystem.setdefault(_subsystem_key(d), []).append(d)
    found: list[tuple[str, ...]] = []
    for atom in plan.atoms:
        if isinstance(atom, LinkCondition):
            links = world.links.values()
            found.append(_link_order((x.ifname, x.index) for x in links if link_matches(atom, x)))
            continue
        literals = _literal_subsystems(atom)
        if literals is None:
            candidates: Iterable[Device] = world.devices.values()
        else:
            candidates = [d for s in literals for d in by_subsystem.get(s, ())]
        found.append(tuple(sorted(d.devpath for d in candidates if device_matches(atom, d, world))))
    return Evaluation(rules, {n: _combine(t, found.__getitem__) for n, t in plan.trees.items()})


# --- incremental ----------------------------------------------------------------------------


class IncrementalEvaluator:
    """``evaluate``'s answer, kept current change by change.

    Call ``reset(world)`` once (coldplug), then ``update(world, change)`` after each
    ``world.apply(change)``: it returns the names of the rules whose ``RuleResult`` changed.
    The world is only read during these calls, never kept.
    """

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self._plan = plan = _Plan(rules)
        self._atoms = plan.atoms
        # Typed views of the atoms by number (None where the atom is of the other kind).
        self._dev: list[DeviceCondition | None] = [
            a if isinstance(a, DeviceCondition) else None for a in plan.atoms
        ]
        self._device_ids = [i for i, a in enumerate(self._dev) if a is not None]
        self._link_ids = [i for i, a in enumerate(plan.atoms) if isinstance(a, LinkCondition)]
        self._link_ids_set = frozenset(self._link_ids)
        self._by_subsystem, self._any_subsystem = _index(
            [(i, self._dev[i]) for i in self._device_ids]
        )
        # The conditions that ancestors are tested against (``parent`` at any depth), numbered
        # apart, with the atoms whose parent chain holds each. A device's change can alter its
        # descendants' matches only where it starts or stops matching one of these by its own
        # keys, so only then are the descendants re-tested, and only for those atoms.
        chain_ids: dict[DeviceCondition, int] = {}
        self._chain: list[DeviceCondition] = []
        self._chain_atoms: list[set[int]] = []
        for i in self._device_ids:
            p = self._dev[i].parent  # type: ignore[union-attr]
            while p is not None:
                if p not in chain_ids:
                    chain_ids[p] = len(self._chain)
                    self._chain.append(p)
                    self._chain_atoms.append(set())
                self._chain_atoms[chain_ids[p]].add(i)
                p = p.parent
        self._chain_by_subsystem, self._chain_any = _index(list(enumerate(self._chain)))
        n = len(plan.atoms)
        # Device atom → the devpaths matching it, kept sorted (matches are reported sorted).
        self._hits: list[list[str]] = [[] for _ in range(n)]
        self._matched_by: dict[str, set[int]] = {}  # devpath → device atoms it matches
        self._anchors: dict[str, frozenset[int]] = {}  # devpath → chain conditions it matches
        self._link_hits: list[dict[int, str]] = [{} for _ in range(n)]  # atom → index → ifname
        self._sorted: list[tuple[str, ...] | None] = [None] * n
        self._results: dict[str, RuleResult] = {}
        self.reset(World())

    # -- public

    def reset(self, world: World) -> None:
        """Forget everything and evaluate ``world`` from scratch."""
        self._reset_devices(world)
        self._reset_links(world)
        self._sorted = [None] * len(self._atoms)
        self._results = {n: _combine(t, self._matches) for n, t in self._plan.trees.items()}

    def update(self, world: World, change: WorldChange) -> frozenset[str]:
        """Take ``change`` (already applied to ``world``) into account.

        Returns:
            The names of the rules whose result changed.
        """
        dirty: set[int] = set()
        match change:
            case DeviceUpsert(device):
                self._sync_devices(world, [device.devpath], dirty)
            case DeviceRemoved(devpath):
                # The world dropped the subtree already; what we hold below it is forgotten.
                self._sync_devices(world, [devpath, *self._known_below(devpath)], dirty)
            case DeviceMoved(old_devpath, device):
                self._sync_devices(world, [old_devpath, device.devpath], dirty)
            case LinkUpsert(link):
                self._sync_link(world, link.index, dirty)
            case LinkRemoved(index) | AddressAdded(index) | AddressRemoved(index):
                self._sync_link(world, index, dirty)
            case WorldReplaced(devices, links):
                if devices is not None:
                    before = [list(h) for h in self._hits]
                    self._reset_devices(world)
                    dirty.update(i for i in self._device_ids if before[i] != self._hits[i])
                if links is not None:
                    before_links = [dict(h) for h in self._link_hits]
                    self._reset_links(world)
                    dirty.update(i for i in self._link_ids if before_links[i] != self._link_hits[i])
        return self._recompute(dirty)

    def results(self) -> Evaluation:
        return Evaluation(self.rules, self._results)

    # -- devices

    def _test(self, world: World, d: Device, ids: Iterable[int]) -> set[int]:
        dev = self._dev
        return {i for i in ids if device_matches(dev[i], d, world)}  # type: ignore[arg-type]

    def _matches_now(self, world: World, d: Device) -> set[int]:
        return self._test(world, d, self._by_subsystem.get(_subsystem_key(d), self._any_subsystem))

    def _anchors_of(self, d: Device) -> frozenset[int]:
        ids = self._chain_by_subsystem.get(_subsystem_key(d), self._chain_any)
        return frozenset(c for c in ids if _own_match(self._chain[c], d))

    def _reset_devices(self, world: World) -> None:
        for i in self._device_ids:
            self._hits[i] = []
        self._matched_by = {}
        self._anchors = {}
        for path in world.devpaths():
            d = world.devices[path]
            found = self._matches_now(world, d)
            if found:
                self._matched_by[path] = found
                for i in found:
                    self._hits[i].append(path)  # paths come in sorted order
            if self._chain and (anchors := self._anchors_of(d)):
                self._anchors[path] = anchors

    def _known_below(self, devpath: str) -> list[str]:
        """The devpaths below ``devpath`` we hold something for (matches or anchors): few."""
        prefix = devpath + "/"
        return sorted(
            p for p in self._matched_by.keys() | self._anchors.keys() if p.startswith(prefix)
        )

    def _set_hits(self, path: str, scope: Iterable[int], new: set[int], dirty: set[int]) -> None:
        """Make ``new`` the atoms among ``scope`` that ``path`` matches."""
        old = self._matched_by.get(path)
        if old is None:
            if not new:
                return
            old = set()
        scope = set(scope)
        for i in (old & scope) - new:
            hits = self._hits[i]
            del hits[bisect.bisect_left(hits, path)]
            dirty.add(i)
        for i in new - old:
            bisect.insort(self._hits[i], path)
            dirty.add(i)
        merged = (old - scope) | new
        if merged:
            self._matched_by[path] = merged
        else:
            self._matched_by.pop(path, None)

    def _sync_devices(self, world: World, paths: list[str], dirty: set[int]) -> None:
        """Bring ``paths`` (and, for parent conditions, their descendants) in line with world."""
        everything = self._device_ids
        affected: set[int] = set()  # parent atoms to re-test below ``paths``
        for path in paths:
            d = world.devices.get(path)
            if d is None:
                self._set_hits(path, everything, set(), dirty)
            else:
                self._set_hits(path, everything, self._matches_now(world, d), dirty)
            if self._chain:
                old = self._anchors.pop(path, frozenset())
                new = frozenset() if d is None else self._anchors_of(d)
                if new:
                    self._anchors[path] = new
                for c in old ^ new:
                    affected |= self._chain_atoms[c]
        if not affected:
            return
        for root in paths:
            for path in world.descendants(root):
                d = world.devices[path]
                candidates = self._by_subsystem.get(_subsystem_key(d), self._any_subsystem)
                ids = [i for i in candidates if i in affected]
                if ids:
                    self._set_hits(path, ids, self._test(world, d, ids), dirty)

    # -- links

    def _reset_links(self, world: World) -> None:
        for i in self._link_ids:
            atom = self._atoms[i]
            assert isinstance(atom, LinkCondition)
            self._link_hits[i] = {
                x.index: x.ifname for x in world.links.values() if link_matches(atom, x)
            }

    def _sync_link(self, world: World, index: int, dirty: set[int]) -> None:
        link = world.links.get(index)
        for i in self._link_ids:
            atom = self._atoms[i]
            assert isinstance(atom, LinkCondition)
            hits = self._link_hits[i]
            old = hits.get(index)
            new = link.ifname if link is not None and link_matches(atom, link) else None
            if old == new:
                continue
            if new is None:
                del hits[index]
            else:
                hits[index] = new
            dirty.add(i)

    # -- results

    def _matches(self, i: int) -> tuple[str, ...]:
        cached = self._sorted[i]
        if cached is None:
            if i in self._link_ids_set:
                cached = _link_order((name, x) for x, name in self._link_hits[i].items())
            else:
                cached = tuple(self._hits[i])
            self._sorted[i] = cached
        return cached

    def _recompute(self, dirty: set[int]) -> frozenset[str]:
        if not dirty:
            return frozenset()
        for i in dirty:
            self._sorted[i] = None
        rules_of = self._plan.rules_of
        trees = self._plan.trees
        changed = []
        for name in dict.fromkeys(n for i in dirty for n in rules_of[i]):
            result = _combine(trees[name], self._matches)
            if result != self._results[name]:
                self._results[name] = result
                changed.append(name)
        return frozenset(changed)
