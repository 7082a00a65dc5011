"""The reconciler: from rule truth, overrides and apply results over time, to what to apply when.

This module does no I/O at all. It opens no socket or file, reads no clock, starts no thread and
logs nothing. Time is an input: every call carries ``now``, float seconds on a monotonic clock
that the caller chooses (the daemon uses CLOCK_BOOTTIME, so settle and linger count the time a
laptop sleeps; ``simulate`` and the tests use a virtual clock). The caller feeds the inputs of
``_reconciler_events`` to ``Reconciler.handle``, calls ``Reconciler.tick`` when ``next_wakeup``
comes, carries out the actions that both return (start an apply, write the journal) and reports
back with more inputs (``ApplyFinished``). Because nothing here touches the machine, the same code
runs in the daemon, in ``simulate`` and in the tests.

Inputs are level-triggered: ``ConditionsChanged`` and ``OverridesChanged`` carry the whole truth
each time, so a duplicated, reordered or lost event upstream costs nothing once the next one
arrives. docs/reconciler.md draws the rule timeline and the apply cycle.

A misused API (time going backwards, an ``ApplyFinished`` for an apply that is not in flight, an
object that is not an input) raises ``ValueError``, ``RuntimeError`` or ``TypeError`` before any
state changes, so a rejected call leaves the reconciler exactly as it was; there is no half-done
state to guard, hence no error state. Domain outcomes, such as a failed apply or giving up, are
actions, never exceptions.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from ._reconciler_events import (
    Action,
    AppliedKnown,
    ApplyCancelled,
    ApplyFinished,
    ApplyGivenUp,
    ApplyInFlight,
    ApplyScheduled,
    Backoff,
    ConditionsChanged,
    GivenUp,
    Input,
    LastApply,
    ModuleSnapshot,
    Override,
    OverrideExpired,
    OverridesChanged,
    OverrideState,
    Paused,
    PendingApply,
    Phase,
    Reason,
    ReasonKind,
    RebuildRequested,
    ReconcilerStatus,
    ResetRequested,
    RuleActivated,
    RuleDeactivated,
    RuleLingering,
    RuleSettleCancelled,
    RuleSettling,
    RulesLoaded,
    RuleStatus,
    RuleTiming,
    StartApply,
    check_seconds,
    to_json,
)

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_QUIET",
    "Action",
    "AppliedKnown",
    "ApplyCancelled",
    "ApplyFinished",
    "ApplyGivenUp",
    "ApplyInFlight",
    "ApplyScheduled",
    "Backoff",
    "ConditionsChanged",
    "GivenUp",
    "Input",
    "LastApply",
    "ModuleSnapshot",
    "Override",
    "OverrideExpired",
    "OverrideState",
    "OverridesChanged",
    "Paused",
    "PendingApply",
    "Phase",
    "Reason",
    "ReasonKind",
    "RebuildRequested",
    "Reconciler",
    "ReconcilerStatus",
    "ResetRequested",
    "RuleActivated",
    "RuleDeactivated",
    "RuleLingering",
    "RuleSettleCancelled",
    "RuleSettling",
    "RuleStatus",
    "RuleTiming",
    "RulesLoaded",
    "StartApply",
    "to_json",
]

# A dock or an eGPU sends its uevents in bursts of a few hundred ms; half a second of calm after
# the last change of the wanted set catches the burst without making a user wait noticeably.
DEFAULT_QUIET = 0.5
# Retries of a failing apply: 5 s, 10 s, 20 s, 40 s, then give up (5 attempts). The first delay
# outlasts a transient failure (a busy Nix daemon, a store lock); the cap is systemd's common
# RestartSec ceiling for flapping units, and past 5 attempts a failure is not transient.
DEFAULT_BACKOFF = 5.0
DEFAULT_BACKOFF_CAP = 300.0
DEFAULT_MAX_ATTEMPTS = 5


class _Edge(enum.Enum):
    HOLDS = enum.auto()  # the rule's condition holds now, and did not at the last ConditionsChanged
    STOPS = enum.auto()  # ... no longer holds
    DEADLINE = enum.auto()  # the phase's deadline is reached (since + settle, or since + linger)


# The whole per-rule state machine. A missing pair cannot happen (see Reconciler._step); new
# matches while SETTLING or ACTIVE are no transition, only news for the status. The special cases
# are plain code in Reconciler._step: a settle or linger of 0 (the new phase's deadline is already
# due, so the loop takes DEADLINE at once and only the final phase is reported), and the hold of a
# freshly (re)loaded rule (Reconciler._held).
_TRANSITIONS: dict[tuple[Phase, _Edge], Phase] = {
    (Phase.INACTIVE, _Edge.HOLDS): Phase.SETTLING,
    (Phase.SETTLING, _Edge.STOPS): Phase.INACTIVE,
    (Phase.SETTLING, _Edge.DEADLINE): Phase.ACTIVE,
    (Phase.ACTIVE, _Edge.STOPS): Phase.LINGERING,
    (Phase.LINGERING, _Edge.HOLDS): Phase.ACTIVE,
    (Phase.LINGERING, _Edge.DEADLINE): Phase.INACTIVE,
}
_WANTING = frozenset({Phase.ACTIVE, Phase.LINGERING})  # phases whose rule's modules are wanted
_NO_MATCHES: tuple[str, ...] = ()
_EMPTY: frozenset[str] = frozenset()
_NOTHING: Mapping[str, tuple[str, ...]] = MappingProxyType({})


class _Rule:
    """One loaded rule's place on its timeline."""

    __slots__ = ("gen", "matches", "phase", "since", "timing")

    def __init__(self, timing: RuleTiming) -> None:
        self.timing = timing
        self.phase = Phase.INACTIVE
        self.since: float | None = None  # when the current phase began (None while inactive)
        self.matches: tuple[str, ...] = _NO_MATCHES  # last devpaths/ifnames that made it hold
        self.gen = 0  # bumped on each phase change; a timer of an older generation is stale

    def until(self) -> float | None:
        """The deadline, computed from the current timing (a reload may have changed it)."""
        if self.since is None:
            return None
        if self.phase is Phase.SETTLING:
            return self.since + self.timing.settle
        if self.phase is Phase.LINGERING:
            return self.since + self.timing.linger
        return None


class _Flight:
    __slots__ = ("apply_id", "force", "started", "target")

    def __init__(self, apply_id: int, target: frozenset[str], force: bool, started: float) -> None:
        self.apply_id = apply_id
        self.target = target
        self.force = force
        self.started = started


class Reconciler:
    """Decides which module set to apply and when, from inputs and the time.

    Args:
        quiet: seconds the wanted set must stay unchanged before an apply caused by the world
            starts. User actions (overrides, pause, reset, rebuild) skip it: a user is waiting.
        backoff: delay before the first retry of a failed apply; it doubles with each consecutive
            failure, up to ``backoff_cap``.
        backoff_cap: the longest delay between retries.
        max_attempts: failed applies of one target after which it is given up until the target
            changes or a rebuild is requested.
        first_apply_id: the id of the first ``StartApply``; the daemon continues the ids of the
            state file so that journal entries stay unique across restarts.
    """

    def __init__(
        self,
        *,
        quiet: float = DEFAULT_QUIET,
        backoff: float = DEFAULT_BACKOFF,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        first_apply_id: int = 1,
    ) -> None:
        self._quiet = check_seconds(quiet, "quiet")
        self._backoff = check_seconds(backoff, "backoff")
        self._backoff_cap = check_seconds(backoff_cap, "backoff_cap")
        if self._backoff_cap < self._backoff:
            raise ValueError(f"backoff_cap ({backoff_cap}) is shorter than backoff ({backoff})")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int of at least 1, not {max_attempts!r}")
        if isinstance(first_apply_id, bool) or not isinstance(first_apply_id, int):
            raise ValueError(f"first_apply_id must be an int, not {first_apply_id!r}")
        self._max_attempts = max_attempts
        self._next_id = first_apply_id
        self._clock = -math.inf  # the latest `now` seen; time never goes back past it

        # Rules and their timelines.
        self._rules: dict[str, _Rule] = {}
        self._holding: Mapping[str, tuple[str, ...]] = _NOTHING  # the last ConditionsChanged
        self._world_known = False  # no decision before the first ConditionsChanged (coldplug)
        self._timers: list[tuple[float, int, str, int]] = []  # (deadline, seq, rule, gen) heap
        self._seq = 0
        self._wanting: set[str] = set()  # rules in ACTIVE or LINGERING
        self._want_count: dict[str, int] = {}  # module -> number of wanting rules naming it
        # A rule that was just (re)loaded keeps those of its modules that are applied wanted until
        # it first settles or is seen not to hold. Without this, a daemon restart or a rule edit
        # would drop the modules for the length of a settle and bring them back: two rebuilds.
        self._held: set[str] = set()
        self._fresh: set[str] = set()  # loaded rules not yet seen by a ConditionsChanged

        # What the user said.
        self._overrides: dict[str, Override] = {}
        self._override_deadline: float | None = None
        self._frozen: frozenset[str] | None = None  # while paused: the rules' part, kept as is

        # Wanted, applied, and the apply cycle.
        self._wanted: frozenset[str] = _EMPTY
        self._applied: frozenset[str] = _EMPTY
        self._changed_at = -math.inf  # when wanted or applied last changed
        self._urgent = False  # a user changed the wanted set: skip quiet and backoff
        self._rebuild = False  # a rebuild was requested and has not started yet
        self._rebuild_force = False
        self._flight: _Flight | None = None
        self._scheduled: tuple[frozenset[str], float] | None = None  # last ApplyScheduled
        self._failures = 0  # consecutive failed applies, of any target: sets the delay
        self._failing: frozenset[str] | None = None  # the target of the last failure
        self._target_failures = 0  # consecutive failures of that target: counts to give-up
        self._retry_at: float | None = None
        self._given_up: GivenUp | None = None
        self._last: LastApply | None = None
        self._next_wakeup: float | None = None

    # --- public API --------------------------------------------------------------------------

    @property
    def next_wakeup(self) -> float | None:
        """When to call ``tick`` next; None when nothing is pending (no timer at all)."""
        return self._next_wakeup

    def handle(self, event: Input, now: float) -> list[Action]:
        """Take one input at time ``now`` and return what to do, in order.

        Timers due at or before ``now`` fire first (at their own time), then the input is taken,
        then the apply decision is made once, so an apply always sees the input.

        Raises:
            TypeError: ``event`` is not an input.
            ValueError: ``now`` is not finite or is earlier than a time already given.
            RuntimeError: ``ApplyFinished`` for an apply that is not in flight, or
                ``AppliedKnown`` while an apply is in flight.
        """
        if not isinstance(event, _INPUTS):
            raise TypeError(f"not a reconciler input: {event!r}")
        self._check_time(now)
        if isinstance(event, ApplyFinished):
            flight = self._flight
            if flight is None or flight.apply_id != event.apply_id:
                running = "none" if flight is None else f"apply {flight.apply_id}"
                raise RuntimeError(
                    f"ApplyFinished for apply {event.apply_id}, but in flight is {running}"
                )
        elif isinstance(event, AppliedKnown) and self._flight is not None:
            raise RuntimeError(
                f"AppliedKnown while apply {self._flight.apply_id} is in flight; "
                "report its end with ApplyFinished"
            )
        actions: list[Action] = []
        due = self._next_wakeup
        if due is not None and due <= now:
            self._fire_due(now, actions)
        self._clock = now
        if self._take(event, now, actions):
            self._fire_due(now, actions, floor=now)
            self._decide(now, actions)
            self._refresh_wakeup()
        elif due is not None and due <= now:
            self._decide(now, actions)
            self._refresh_wakeup()
        return actions

    def tick(self, now: float) -> list[Action]:
        """Let time pass to ``now``: fire due timers and start a due apply.

        Raises:
            ValueError: ``now`` is not finite or is earlier than a time already given.
        """
        self._check_time(now)
        actions: list[Action] = []
        self._fire_due(now, actions)
        self._clock = now
        self._decide(now, actions)
        self._refresh_wakeup()
        return actions

    def snapshot(self, now: float) -> ReconcilerStatus:
        """Everything ``status``, ``explain`` and the systemd status line show, at ``now``.

        Reading changes nothing; a timer already due at ``now`` shows as due until ``tick``.

        Raises:
            ValueError: ``now`` is not finite or is earlier than a time already given.
        """
        self._check_time(now)
        rules = tuple(
            RuleStatus(
                name=name,
                phase=rule.phase,
                since=rule.since,
                until=rule.until(),
                matches=rule.matches,
                modules=rule.timing.modules,
                held=name in self._held,
            )
            for name, rule in sorted(self._rules.items())
        )
        names = set(self._wanted) | self._applied | self._overrides.keys()
        for rule in self._rules.values():
            names |= rule.timing.modules
        if self._frozen is not None:
            names |= self._frozen
        reasons = self._reasons(names)
        modules = tuple(
            ModuleSnapshot(
                name=name,
                wanted=name in self._wanted,
                applied=name in self._applied,
                reason=reasons[name],
            )
            for name in sorted(names)
        )
        flight = self._flight
        in_flight = None
        pending = None
        if flight is not None:
            in_flight = ApplyInFlight(
                apply_id=flight.apply_id,
                target=flight.target,
                force=flight.force,
                started=flight.started,
            )
            if self._rebuild or self._wanted != flight.target:
                pending = PendingApply(target=self._wanted, at=None, rebuild=self._rebuild)
        elif self._scheduled is not None:
            pending = PendingApply(
                target=self._scheduled[0], at=self._scheduled[1], rebuild=self._rebuild
            )
        backoff = None
        if self._failures:
            backoff = Backoff(
                failures=self._failures,
                target=self._failing or _EMPTY,
                target_failures=self._target_failures,
                retry_at=self._retry_at,
            )
        return ReconcilerStatus(
            now=now,
            world_known=self._world_known,
            rules=rules,
            modules=modules,
            wanted=self._wanted,
            applied=self._applied,
            overrides=tuple(self._overrides[m] for m in sorted(self._overrides)),
            paused=self._frozen is not None,
            paused_modules=self._frozen,
            in_flight=in_flight,
            pending=pending,
            backoff=backoff,
            given_up=self._given_up,
            last_apply=self._last,
            next_wakeup=self._next_wakeup,
        )

    # --- time and timers ---------------------------------------------------------------------

    def _check_time(self, now: float) -> None:
        # Our clocks are monotonic; an earlier time is a caller's bug (two clocks mixed, or a
        # virtual clock stepped back), and would make "held for settle" meaningless. Raise at once.
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise ValueError(f"now must be a finite number of seconds, not {now!r}")
        if now < self._clock:
            raise ValueError(f"time went backwards: now={now!r} after {self._clock!r}")

    def _push_timer(self, name: str, rule: _Rule) -> None:
        deadline = rule.until()
        if deadline is None:
            return
        self._seq += 1
        heapq.heappush(self._timers, (deadline, self._seq, name, rule.gen))
        # Stale entries are dropped lazily at the head; a flapping rule behind a long-lived head
        # would pile them up, so past twice what can be live, keep only the live ones (amortized
        # O(1) per push, and memory stays O(rules) through an event storm).
        if len(self._timers) > 2 * len(self._rules) + 16:
            self._timers = [t for t in self._timers if self._live(t)]
            heapq.heapify(self._timers)

    def _live(self, timer: tuple[float, int, str, int]) -> bool:
        deadline, _, name, gen = timer
        rule = self._rules.get(name)
        return rule is not None and rule.gen == gen and rule.until() == deadline

    def _peek_timer(self) -> float | None:
        timers = self._timers
        while timers:
            if self._live(timers[0]):
                return timers[0][0]
            heapq.heappop(timers)  # stale: the rule moved on, was reloaded or removed
        return None

    def _fire_due(self, now: float, actions: list[Action], *, floor: float = -math.inf) -> None:
        # Fire every timer due by `now`, earliest first, each at its own time, so that a late tick
        # changes nothing but lateness. `floor` is the time of an input that made a timer due in
        # the past (an override that arrives expired, a reload that shortened settle).
        while True:
            rule_at = self._peek_timer()
            override_at = self._override_deadline
            if (
                rule_at is not None
                and rule_at <= now
                and (override_at is None or rule_at <= override_at)
            ):
                _, _, name, _ = heapq.heappop(self._timers)
                at = max(rule_at, floor)
                self._step(name, self._rules[name], _Edge.DEADLINE, at, actions)
                self._recompute(at, urgent=False)
            elif override_at is not None and override_at <= now:
                at = max(override_at, floor)
                for module, override in sorted(self._overrides.items()):
                    if override.until is not None and override.until <= override_at:
                        del self._overrides[module]
                        actions.append(OverrideExpired(module=module))
                self._override_deadline = _earliest_until(self._overrides.values())
                # An expiry is the user's own decision, taken in advance: apply it at once.
                self._recompute(at, urgent=True)
            else:
                return

    def _refresh_wakeup(self) -> None:
        wakeup = self._peek_timer()
        for other in (
            self._override_deadline,
            self._scheduled[1] if self._scheduled is not None else None,
        ):
            if other is not None and (wakeup is None or other < wakeup):
                wakeup = other
        self._next_wakeup = wakeup

    # --- inputs ------------------------------------------------------------------------------

    def _take(self, event: Input, now: float, actions: list[Action]) -> bool:
        """Take the input; False when it changed nothing at all (the common ConditionsChanged)."""
        match event:
            case ConditionsChanged():
                return self._on_conditions(event, now, actions)
            case RulesLoaded():
                self._on_rules(event, now, actions)
            case OverridesChanged():
                self._on_overrides(event)
            case Paused():
                self._on_paused(event)
            case ResetRequested():
                self._on_reset()
            case AppliedKnown():
                self._on_applied(event, now)
            case ApplyFinished():
                self._on_finished(event, now, actions)
            case RebuildRequested():  # pragma: no branch (the inputs are exhausted)
                self._on_rebuild(event)
        self._recompute(now, urgent=isinstance(event, _USER_INPUTS))
        return True

    # --- rules -------------------------------------------------------------------------------

    def _step(self, name: str, rule: _Rule, edge: _Edge, at: float, actions: list[Action]) -> None:
        # Every call is a real transition: a rule is SETTLING or ACTIVE exactly when its name is
        # in the last truth, so HOLDS and STOPS come only where the table has them, and a timer
        # fires only for the deadline of the rule's current phase (_peek_timer drops the others).
        before = rule.phase
        phase = _TRANSITIONS[(before, edge)]
        while True:
            self._enter(name, rule, phase, at)
            deadline = rule.until()
            if deadline is None or deadline > at:
                break
            phase = _TRANSITIONS[(phase, _Edge.DEADLINE)]  # settle or linger of 0
        self._push_timer(name, rule)
        if phase is Phase.SETTLING:
            actions.append(RuleSettling(rule=name, until=_until(rule)))
        elif phase is Phase.ACTIVE:
            resumed = before is Phase.LINGERING
            actions.append(RuleActivated(rule=name, matches=rule.matches, resumed=resumed))
        elif phase is Phase.LINGERING:
            actions.append(RuleLingering(rule=name, until=_until(rule)))
        elif before is Phase.SETTLING:
            actions.append(RuleSettleCancelled(rule=name))
        else:
            actions.append(RuleDeactivated(rule=name))

    def _enter(self, name: str, rule: _Rule, phase: Phase, at: float) -> None:
        was_wanting = rule.phase in _WANTING
        rule.phase = phase
        rule.since = at if phase is not Phase.INACTIVE else None
        rule.gen += 1
        if phase in _WANTING:
            if not was_wanting:
                self._add_wanting(name, rule.timing.modules)
        elif was_wanting:
            self._remove_wanting(name, rule.timing.modules)
        if phase is not Phase.SETTLING:
            self._held.discard(name)  # settled or gone: the hold has done its work

    def _add_wanting(self, name: str, modules: frozenset[str]) -> None:
        self._wanting.add(name)
        count = self._want_count
        for module in modules:
            count[module] = count.get(module, 0) + 1

    def _remove_wanting(self, name: str, modules: frozenset[str]) -> None:
        self._wanting.discard(name)
        count = self._want_count
        for module in modules:
            left = count[module] - 1
            if left:
                count[module] = left
            else:
                del count[module]

    def _on_rules(self, event: RulesLoaded, now: float, actions: list[Action]) -> None:
        new = {timing.name: timing for timing in event.rules}
        holding = dict(self._holding)
        for name in sorted(self._rules.keys() - new.keys()):
            self._forget(name, actions)
            holding.pop(name, None)
        for name, timing in new.items():
            rule = self._rules.get(name)
            if rule is not None and rule.timing.fingerprint == timing.fingerprint:
                # Same condition: keep the timeline, take the new modules, settle and linger.
                if rule.phase in _WANTING and rule.timing.modules != timing.modules:
                    self._remove_wanting(name, rule.timing.modules)
                    self._add_wanting(name, timing.modules)
                old_until = rule.until()
                rule.timing = timing
                if rule.until() != old_until:
                    self._push_timer(name, rule)
                continue
            if rule is not None:
                self._forget(name, actions)  # a new condition: its old truth says nothing
            self._rules[name] = _Rule(timing)
            holding.pop(name, None)
            self._fresh.add(name)
            self._held.add(name)
        self._holding = MappingProxyType(holding)

    def _forget(self, name: str, actions: list[Action]) -> None:
        rule = self._rules.pop(name)
        if rule.phase in _WANTING:
            self._remove_wanting(name, rule.timing.modules)
            actions.append(RuleDeactivated(rule=name))
        elif rule.phase is Phase.SETTLING:
            actions.append(RuleSettleCancelled(rule=name))
        self._held.discard(name)
        self._fresh.discard(name)

    def _on_conditions(self, event: ConditionsChanged, now: float, actions: list[Action]) -> bool:
        # The hot path (every uevent that changes some rule's truth): only the rules that appear
        # in the old or the new truth are visited, never all the loaded rules.
        new = event.holding
        old = self._holding
        if new == old and not self._fresh and self._world_known:
            return False
        rules = self._rules
        stepped = False
        for name, matches in new.items():
            rule = rules.get(name)
            if rule is None:
                continue  # not loaded (disabled, or evaluated against other rules): ignored
            rule.matches = matches
            if name not in old:
                self._step(name, rule, _Edge.HOLDS, now, actions)
                stepped = True
        for name in old:
            if name not in new:
                rule = rules.get(name)
                if rule is not None:
                    self._step(name, rule, _Edge.STOPS, now, actions)
                    stepped = True
        if self._fresh:
            for name in self._fresh:
                if name not in new:
                    self._held.discard(name)  # seen not to hold: nothing to keep for it
            self._fresh.clear()
            stepped = True
        self._holding = new
        if not self._world_known:
            self._world_known = True
            stepped = True
        if stepped:
            self._recompute(now, urgent=False)
        return stepped

    # --- what the user says ------------------------------------------------------------------

    def _on_overrides(self, event: OverridesChanged) -> None:
        self._overrides = dict(event.overrides)
        self._override_deadline = _earliest_until(self._overrides.values())

    def _on_paused(self, event: Paused) -> None:
        if event.paused:
            if event.modules is not None:
                self._frozen = event.modules
            elif self._frozen is None:
                self._frozen = self._rule_part()
        else:
            self._frozen = None

    def _on_reset(self) -> None:
        # Back to the base system, and automation stays paused so that rules do not bring the
        # modules right back; `resume` hands them control again (docs/reconciler.md, "reset").
        self._overrides.clear()
        self._override_deadline = None
        self._frozen = _EMPTY
        self._given_up = None

    def _on_rebuild(self, event: RebuildRequested) -> None:
        self._rebuild = True
        self._rebuild_force = self._rebuild_force or event.force
        # A user asked: a fresh series of attempts, with nothing given up and no delay.
        self._given_up = None
        self._failures = self._target_failures = 0
        self._failing = None
        self._retry_at = None

    # --- applies -----------------------------------------------------------------------------

    def _on_applied(self, event: AppliedKnown, now: float) -> None:
        if event.applied != self._applied:
            self._applied = event.applied
            self._changed_at = now

    def _on_finished(self, event: ApplyFinished, now: float, actions: list[Action]) -> None:
        flight = self._flight
        assert flight is not None  # checked in handle() before any change
        self._flight = None
        self._applied = event.applied
        self._last = LastApply(
            apply_id=event.apply_id,
            ok=event.ok,
            target=flight.target,
            applied=event.applied,
            message=event.message,
            started=flight.started,
            finished=now,
        )
        if event.ok:
            self._failures = self._target_failures = 0
            self._failing = None
            self._retry_at = None
            self._given_up = None
        else:
            self._failures += 1
            if flight.target == self._failing:
                self._target_failures += 1
            else:
                self._failing = flight.target
                self._target_failures = 1
            # The exponent is bounded so that days of failures never overflow a float; 2**30
            # times any sane backoff is far past any cap.
            doublings = min(self._failures - 1, 30)
            delay = min(self._backoff * 2**doublings, self._backoff_cap)
            self._retry_at = now + delay
            if self._target_failures >= self._max_attempts:
                self._given_up = GivenUp(
                    target=flight.target,
                    failures=self._target_failures,
                    message=event.message,
                    at=now,
                )
                actions.append(
                    ApplyGivenUp(
                        target=flight.target,
                        failures=self._target_failures,
                        message=event.message,
                    )
                )

    def _decide(self, now: float, actions: list[Action]) -> None:
        if self._flight is not None or not self._world_known:
            return  # one apply at a time; and nothing is decided before the world is known
        wanted = self._wanted
        given_up = self._given_up
        if not self._rebuild and (
            wanted == self._applied or (given_up is not None and given_up.target == wanted)
        ):
            self._urgent = False
            if self._scheduled is not None:
                actions.append(ApplyCancelled(target=self._scheduled[0]))
                self._scheduled = None
            return
        if self._urgent or self._rebuild:
            due = now
        else:
            due = self._changed_at + self._quiet
            if self._retry_at is not None and self._retry_at > due:
                due = self._retry_at
        if due > now:
            if self._scheduled != (wanted, due):
                self._scheduled = (wanted, due)
                actions.append(ApplyScheduled(target=wanted, at=due))
            return
        attempt = self._target_failures + 1 if wanted == self._failing else 1
        apply_id = self._next_id
        self._next_id += 1
        force = self._rebuild_force
        self._flight = _Flight(apply_id, wanted, force, now)
        self._scheduled = None
        self._urgent = self._rebuild = self._rebuild_force = False
        actions.append(
            StartApply(
                apply_id=apply_id,
                target=wanted,
                reasons=MappingProxyType(self._reasons(wanted | self._applied)),
                force=force,
                attempt=attempt,
            )
        )

    # --- the wanted set and its reasons ------------------------------------------------------

    def _rule_part(self) -> frozenset[str]:
        part = set(self._want_count)
        applied = self._applied
        for name in self._held:
            part |= self._rules[name].timing.modules & applied
        return frozenset(part)

    def _recompute(self, at: float, *, urgent: bool) -> None:
        wanted = set(self._rule_part() if self._frozen is None else self._frozen)
        for module, override in self._overrides.items():
            if override.state is OverrideState.ON:
                wanted.add(module)
            else:
                wanted.discard(module)
        if wanted == self._wanted:
            return
        self._wanted = frozenset(wanted)
        self._changed_at = at
        if urgent:
            self._urgent = True
        if self._given_up is not None and self._given_up.target != self._wanted:
            self._given_up = None  # the target changed: it may be tried again

    def _reasons(self, names: Iterable[str]) -> dict[str, Reason]:
        by_module: dict[str, list[str]] = {}
        for name in sorted(self._wanting):
            for module in self._rules[name].timing.modules:
                by_module.setdefault(module, []).append(name)
        holding: dict[str, list[str]] = {}
        for name in sorted(self._held):
            for module in self._rules[name].timing.modules & self._applied:
                holding.setdefault(module, []).append(name)
        reasons: dict[str, Reason] = {}
        for module in names:
            rules = tuple(by_module.get(module, ()))
            override = self._overrides.get(module)
            if override is not None:
                on = override.state is OverrideState.ON
                kind = ReasonKind.OVERRIDE_ON if on else ReasonKind.OVERRIDE_OFF
                reason = Reason(kind=kind, wanted=on, rules=rules, override=override)
            elif self._frozen is not None:
                kept = module in self._frozen
                reason = Reason(kind=ReasonKind.PAUSED, wanted=kept, rules=rules)
            elif rules:
                reason = Reason(kind=ReasonKind.RULES, wanted=True, rules=rules)
            elif module in holding:
                held = tuple(holding[module])
                reason = Reason(kind=ReasonKind.HELD, wanted=True, rules=held)
            else:
                reason = Reason(kind=ReasonKind.NO_RULE, wanted=False)
            reasons[module] = reason
        return reasons


# Inputs by which a user changes the wanted set: such a change skips quiet and backoff.
_USER_INPUTS = (OverridesChanged, Paused, ResetRequested)
_INPUTS = (
    RulesLoaded,
    ConditionsChanged,
    OverridesChanged,
    Paused,
    ResetRequested,
    AppliedKnown,
    ApplyFinished,
    RebuildRequested,
)


def _until(rule: _Rule) -> float:
    until = rule.until()
    assert until is not None  # only asked of SETTLING and LINGERING rules
    return until


def _earliest_until(overrides: Iterable[Override]) -> float | None:
    times = [o.until for o in overrides if o.until is not None]
    return min(times) if times else None
