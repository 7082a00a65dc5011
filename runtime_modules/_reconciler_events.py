"""The reconciler's vocabulary: the inputs it takes, the actions it returns, the status it shows.

All are frozen, slotted, keyword-only dataclasses. Inputs validate their fields when built (a
caller's mistake fails where it is made, with ``ValueError``, not later inside the reconciler);
actions and status are built only by the reconciler and are not checked again. Every one of them
turns into plain JSON with ``to_json()``: sets become sorted lists, enums their values, times stay
float seconds on the caller's clock.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any


def check_seconds(value: object, what: str) -> float:
    """``value`` as float seconds, or ``ValueError`` unless it is a finite number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{what} must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


def _time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite time in seconds, not {value!r}")
    return float(value)


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, not {value!r}")
    return value


def _names(value: object, what: str) -> frozenset[str]:
    # A bare string is an iterable of names too, and a classic slip ("gaming" -> g, a, m…).
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be a set of module names, not {value!r}")
    names = frozenset(value)
    for item in names:
        _name(item, f"each of {what}")
    return names


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, not {value!r}")
    return value


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalizing a field of a frozen dataclass


def to_json(value: Any) -> Any:
    """Plain JSON data for any value of this module (and the str/int/float/None inside)."""
    if isinstance(value, _Json):
        out: dict[str, Any] = {}
        if isinstance(value, _Action):
            out["action"] = type(value).__name__
        for f in fields(value):  # type: ignore[arg-type]
            out[f.name] = to_json(getattr(value, f.name))
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, frozenset | set):
        return sorted(value)
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_json(v) for k, v in sorted(value.items())}
    return value


class _Json:
    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        """This value as plain JSON data (a dict)."""
        data: dict[str, Any] = to_json(self)
        return data


class _Action(_Json):
    __slots__ = ()


# --- states ------------------------------------------------------------------------------------


class Phase(enum.Enum):
    """Where one rule is on its timeline (docs/reconciler.md draws it)."""

    INACTIVE = "inactive"  # the condition does not hold (or stopped holding over linger ago)
    SETTLING = "settling"  # the condition holds, but not yet for `settle`
    ACTIVE = "active"  # the condition has held for `settle`: the rule's modules are wanted
    LINGERING = "lingering"  # stopped holding under `linger` ago: the modules are still wanted


class OverrideState(enum.Enum):
    ON = "on"  # the module is wanted, whatever the rules say
    OFF = "off"  # the module is not wanted, whatever the rules say


class ReasonKind(enum.Enum):
    """Why a module is in the wanted set, or not. Checked in this order."""

    OVERRIDE_ON = "override-on"  # wanted: a user forced it on
    OVERRIDE_OFF = "override-off"  # not wanted: a user forced it off
    PAUSED = "paused"  # automation is paused (or was reset): kept as it was, rules ignored
    RULES = "rules"  # wanted: these rules are active or lingering
    HELD = "held"  # wanted: already applied, kept while these just-loaded rules first settle
    NO_RULE = "no-rule"  # not wanted: no rule wants it and no override


# --- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleTiming(_Json):
    """What the reconciler needs of one enabled rule.

    ``fingerprint`` identifies the rule's condition: on a reload, a rule with the same name and
    fingerprint keeps its timeline (settling since…, lingering until…); any other is reset.
    """

    name: str
    modules: frozenset[str]
    settle: float
    linger: float
    fingerprint: str

    def __post_init__(self) -> None:
        _name(self.name, "RuleTiming.name")
        _set(self, "modules", _names(self.modules, f"modules of rule {self.name}"))
        _set(self, "settle", check_seconds(self.settle, f"settle of rule {self.name}"))
        _set(self, "linger", check_seconds(self.linger, f"linger of rule {self.name}"))
        if not isinstance(self.fingerprint, str):
            raise ValueError(f"fingerprint of rule {self.name} must be a string")


@dataclass(frozen=True, slots=True, kw_only=True)
class RulesLoaded(_Json):
    """The complete set of enabled rules (at start, and after each successful reload).

    Send the ConditionsChanged of these rules right after it, even if it did not change.
    """

    rules: tuple[RuleTiming, ...]

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        seen: set[str] = set()
        for rule in rules:
            if not isinstance(rule, RuleTiming):
                raise ValueError(f"RulesLoaded.rules must hold RuleTiming values, not {rule!r}")
            if rule.name in seen:
                raise ValueError(f"rule {rule.name!r} is loaded twice")
            seen.add(rule.name)
        _set(self, "rules", rules)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConditionsChanged(_Json):
    """The complete set of rules whose condition holds now, with what made each hold.

    Level-triggered: the whole truth each time. Names of rules that are not loaded are ignored.
    """

    holding: Mapping[str, tuple[str, ...]]  # rule -> devpaths / ifnames (may be empty)

    def __post_init__(self) -> None:
        if not isinstance(self.holding, Mapping):
            raise ValueError(f"ConditionsChanged.holding must be a mapping, not {self.holding!r}")
        # A private copy: the reconciler keeps it as the last truth to compare the next one with.
        holding: dict[str, tuple[str, ...]] = {}
        for rule, matches in self.holding.items():
            if type(matches) is tuple:
                holding[rule] = matches
            elif isinstance(matches, str) or not isinstance(matches, Iterable):
                raise ValueError(f"matches of rule {rule!r} must be a tuple of names")
            else:
                holding[rule] = tuple(matches)
        _set(self, "holding", MappingProxyType(holding))


@dataclass(frozen=True, slots=True, kw_only=True)
class Override(_Json):
    """A user's pin of one module, on or off, optionally until a time on the caller's clock."""

    module: str
    state: OverrideState
    until: float | None = None
    source: str = ""  # who or what set it, for `status` ("uid 1000 via enable --for 2h")

    def __post_init__(self) -> None:
        _name(self.module, "Override.module")
        if not isinstance(self.state, OverrideState):
            raise ValueError(f"override of {self.module}: state must be an OverrideState")
        if self.until is not None:
            _set(self, "until", _time(self.until, f"override of {self.module}: until"))
        if not isinstance(self.source, str):
            raise ValueError(f"override of {self.module}: source must be a string")


@dataclass(frozen=True, slots=True, kw_only=True)
class OverridesChanged(_Json):
    """The complete set of overrides, keyed by module. An override already expired is dropped
    at once (with ``OverrideExpired``)."""

    overrides: Mapping[str, Override]

    def __post_init__(self) -> None:
        if not isinstance(self.overrides, Mapping):
            raise ValueError(
                f"OverridesChanged.overrides must be a mapping, not {self.overrides!r}"
            )
        for module, override in self.overrides.items():
            if not isinstance(override, Override) or override.module != module:
                raise ValueError(f"overrides[{module!r}] must be an Override of module {module!r}")
        _set(self, "overrides", MappingProxyType(dict(self.overrides)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Paused(_Json):
    """Pause or resume automation. While paused, the rules' part of the wanted set stays as it
    was (``modules``, by default what the rules wanted when the pause began); overrides still
    apply and rules keep their timelines, so ``resume`` acts on the world as it is then.

    The daemon persists the paused set from ``snapshot().paused_modules`` and passes it back as
    ``modules`` at start, so a restart keeps the pause exact.
    """

    paused: bool
    modules: frozenset[str] | None = None

    def __post_init__(self) -> None:
        _bool(self.paused, "Paused.paused")
        if self.modules is not None:
            if not self.paused:
                raise ValueError("Paused.modules is only meaningful with paused=True")
            _set(self, "modules", _names(self.modules, "Paused.modules"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ResetRequested(_Json):
    """Back to the base system: drop every override and pause with nothing kept (``resume``
    hands the modules back to the rules). The daemon clears its override store as well."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AppliedKnown(_Json):
    """What is applied, learned outside an apply of ours (the state file at start)."""

    applied: frozenset[str]

    def __post_init__(self) -> None:
        _set(self, "applied", _names(self.applied, "AppliedKnown.applied"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyFinished(_Json):
    """The apply ``apply_id`` ended; ``applied`` is what is applied now (the target after a
    success, the previous set after a rollback)."""

    apply_id: int
    ok: bool
    applied: frozenset[str]
    message: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.apply_id, bool) or not isinstance(self.apply_id, int):
            raise ValueError(f"ApplyFinished.apply_id must be an int, not {self.apply_id!r}")
        _bool(self.ok, "ApplyFinished.ok")
        _set(self, "applied", _names(self.applied, "ApplyFinished.applied"))
        if not isinstance(self.message, str):
            raise ValueError("ApplyFinished.message must be a string")


@dataclass(frozen=True, slots=True, kw_only=True)
class RebuildRequested(_Json):
    """Re-apply the current wanted set now, even if it is applied (``rebuild``); it also lifts a
    give-up and restarts the attempts. ``force`` is passed on to the applier."""

    force: bool = False

    def __post_init__(self) -> None:
        _bool(self.force, "RebuildRequested.force")


Input = (
    RulesLoaded
    | ConditionsChanged
    | OverridesChanged
    | Paused
    | ResetRequested
    | AppliedKnown
    | ApplyFinished
    | RebuildRequested
)


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Reason(_Json):
    """Why one module is wanted or not (see ``ReasonKind``); ``rules`` are the rules that want it
    (or hold it), named even when an override or a pause decides."""

    kind: ReasonKind
    wanted: bool
    rules: tuple[str, ...] = ()
    override: Override | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StartApply(_Action):
    """Apply ``target`` now and report back with ``ApplyFinished(apply_id=…)``.

    ``reasons`` covers every module of the target and every applied module that it drops.
    ``attempt`` is 1, or the retry number for a target that failed before.
    """

    apply_id: int
    target: frozenset[str]
    reasons: Mapping[str, Reason]
    force: bool = False
    attempt: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyScheduled(_Action):
    """An apply of ``target`` will start at ``at`` unless the wanted set changes first."""

    target: frozenset[str]
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyCancelled(_Action):
    """The scheduled apply of ``target`` will not happen: the wanted set is applied again."""

    target: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyGivenUp(_Action):
    """``target`` failed ``failures`` times in a row; it is not retried until the wanted set
    changes or a rebuild is requested."""

    target: frozenset[str]
    failures: int
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleSettling(_Action):
    """The rule's condition holds; the rule becomes active at ``until`` if it keeps holding."""

    rule: str
    until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleSettleCancelled(_Action):
    """The condition stopped holding before the rule settled: it never became active."""

    rule: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleActivated(_Action):
    """The rule is active; ``resumed`` when its condition came back while it lingered."""

    rule: str
    matches: tuple[str, ...]
    resumed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleLingering(_Action):
    """The condition stopped holding; the rule stays active until ``until`` unless it returns."""

    rule: str
    until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleDeactivated(_Action):
    """The rule is no longer active (lingered out, or unloaded or changed by a reload)."""

    rule: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OverrideExpired(_Action):
    """The override of ``module`` reached its ``until``: the module is the rules' again. The
    daemon drops it from its override store."""

    module: str


Action = (
    StartApply
    | ApplyScheduled
    | ApplyCancelled
    | ApplyGivenUp
    | RuleSettling
    | RuleSettleCancelled
    | RuleActivated
    | RuleLingering
    | RuleDeactivated
    | OverrideExpired
)


# --- status ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleStatus(_Json):
    name: str
    phase: Phase
    since: float | None  # when the phase began (None while inactive)
    until: float | None  # when settling or lingering ends
    matches: tuple[str, ...]  # what made it hold last (kept while it lingers)
    modules: frozenset[str]
    held: bool  # just loaded: keeps its applied modules wanted while it first settles


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleSnapshot(_Json):
    """One module in the reconciler's snapshot (not ``_state.ModuleStatus``, the applied state)."""

    name: str
    wanted: bool
    applied: bool
    reason: Reason


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyInFlight(_Json):
    apply_id: int
    target: frozenset[str]
    force: bool
    started: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingApply(_Json):
    target: frozenset[str]
    at: float | None  # None: right after the apply in flight (or as soon as the world is known)
    rebuild: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff(_Json):
    failures: int  # consecutive failed applies, of any target: sets the delay
    target: frozenset[str]  # the target that failed last
    target_failures: int  # consecutive failures of that target: counts towards giving up
    retry_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class GivenUp(_Json):
    target: frozenset[str]
    failures: int
    message: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LastApply(_Json):
    apply_id: int
    ok: bool
    target: frozenset[str]
    applied: frozenset[str]
    message: str
    started: float
    finished: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcilerStatus(_Json):
    """The reconciler's whole state at ``now``: what ``status`` and ``explain`` print."""

    now: float
    world_known: bool  # False until the first ConditionsChanged (coldplug)
    rules: tuple[RuleStatus, ...]  # sorted by name
    modules: tuple[ModuleSnapshot, ...]  # every module wanted, applied, overridden or in a rule
    wanted: frozenset[str]
    applied: frozenset[str]
    overrides: tuple[Override, ...]
    paused: bool
    paused_modules: frozenset[str] | None  # the rules' part kept while paused
    in_flight: ApplyInFlight | None
    pending: PendingApply | None
    backoff: Backoff | None
    given_up: GivenUp | None
    last_apply: LastApply | None
    next_wakeup: float | None

    def summary(self) -> str:
        """One line for systemd's ``STATUS=``: rules, applied set, and what happens next."""
        active = sum(r.phase is not Phase.INACTIVE for r in self.rules)
        parts = [f"{len(self.rules)} rules ({active} not inactive)"]
        parts.append("applied: " + (",".join(sorted(self.applied)) or "base system"))
        if self.paused:
            parts.append("paused")
        if self.in_flight is not None:
            parts.append(f"applying #{self.in_flight.apply_id}")
        if self.pending is not None:
            target = ",".join(sorted(self.pending.target)) or "base system"
            when = (
                "after the current apply"
                if self.pending.at is None
                else f"in {self.pending.at - self.now:.1f}s"
            )
            parts.append(f"next: {target} {when}")
        if self.given_up is not None:
            parts.append(f"gave up after {self.given_up.failures} failures")
        return "; ".join(parts)
