"""The daemon's pure core: world → evaluator → reconciler, on whatever clock it is given.

A ``World``, the ``IncrementalEvaluator`` kept current by world changes, and the ``Reconciler``
fed with the resulting rule truth. The daemon wraps it in its event loop (sources, clock,
applier, journal); ``_replay`` drives it from a capture file with the capture's own timestamps.
Same code, so a replay shows what the daemon would have done.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ._evaluate import IncrementalEvaluator
from ._reconciler import Reconciler
from ._reconciler_events import (
    Action,
    AppliedKnown,
    ConditionsChanged,
    RulesLoaded,
    RuleTiming,
)
from ._rules import RuleSet
from ._world import World, WorldChange

__all__ = ["Pipeline", "rules_loaded"]


def _fingerprint(when: object) -> str:
    # Conditions are frozen dataclasses of globs whose repr is their text: equal conditions
    # give equal reprs, so an unchanged rule keeps its timeline across a reload.
    return hashlib.sha256(repr(when).encode()).hexdigest()[:16]


def rules_loaded(rules: RuleSet) -> RulesLoaded:
    """The reconciler's view of the enabled rules of ``rules``."""
    return RulesLoaded(
        rules=tuple(
            RuleTiming(
                name=r.name,
                modules=frozenset(r.modules),
                settle=r.settle,
                linger=r.linger,
                fingerprint=_fingerprint(r.when),
            )
            for r in rules.rules
            if r.enabled
        )
    )


class Pipeline:
    """World → evaluator → reconciler, on whatever clock the caller passes as ``now``."""

    def __init__(self, rules: RuleSet, reconciler: Reconciler, world: World | None = None) -> None:
        self.rules = rules
        self.reconciler = reconciler
        self.world = World() if world is None else world
        self.evaluator = IncrementalEvaluator(rules)
        self.holding: dict[str, tuple[str, ...]] = {}

    def _truth(self) -> dict[str, tuple[str, ...]]:
        return {name: r.matches for name, r in self.evaluator.results().items() if r.holds}

    def coldplug(self, applied: frozenset[str], now: float) -> list[Action]:
        """Start: the world as enumerated, what is applied, and the rules' truth in it."""
        self.evaluator.reset(self.world)
        self.holding = self._truth()
        actions = self.reconciler.handle(rules_loaded(self.rules), now)
        actions += self.reconciler.handle(AppliedKnown(applied=applied), now)
        actions += self.reconciler.handle(ConditionsChanged(holding=self.holding), now)
        return actions

    def feed(self, changes: Iterable[WorldChange], now: float) -> list[Action] | None:
        """Apply a batch of changes; None when no rule's truth changed (the reconciler was not
        asked), else the actions of the one ``ConditionsChanged`` fed for the whole batch."""
        world, evaluator = self.world, self.evaluator
        changed = False
        for change in changes:
            world.apply(change)
            if evaluator.update(world, change):
                changed = True
        if not changed:
            return None
        truth = self._truth()
        if truth == self.holding:
            return None  # some rule's matches moved back and forth within the batch
        self.holding = truth
        return self.reconciler.handle(ConditionsChanged(holding=truth), now)

    def reload(self, rules: RuleSet, now: float) -> list[Action]:
        """New rules on the same world: re-evaluate from scratch and tell the reconciler."""
        self.rules = rules
        self.evaluator = IncrementalEvaluator(rules)
        self.evaluator.reset(self.world)
        self.holding = self._truth()
        actions = self.reconciler.handle(rules_loaded(rules), now)
        actions += self.reconciler.handle(ConditionsChanged(holding=self.holding), now)
        return actions

    def matches(self, rule: str) -> tuple[str, ...]:
        """What makes ``rule`` hold now (devpaths and interface names), or ()."""
        return self.holding.get(rule, ())
