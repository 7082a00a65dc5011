"""The reconciler on a virtual clock: scripted inputs in, the complete list of actions out."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence

import pytest

from runtime_modules._reconciler import (
    DEFAULT_MAX_ATTEMPTS,
    Action,
    AppliedKnown,
    ApplyCancelled,
    ApplyFinished,
    ApplyGivenUp,
    ApplyScheduled,
    ConditionsChanged,
    Input,
    Override,
    OverrideExpired,
    OverridesChanged,
    OverrideState,
    Paused,
    Phase,
    Reason,
    ReasonKind,
    RebuildRequested,
    Reconciler,
    ResetRequested,
    RuleActivated,
    RuleDeactivated,
    RuleLingering,
    RuleSettleCancelled,
    RuleSettling,
    RulesLoaded,
    RuleTiming,
    StartApply,
    to_json,
)

# --- harness -------------------------------------------------------------------------------------

Step = tuple[float, Input | None]  # None: a bare tick at that time
Log = list[tuple[float, Action]]


def play(rec: Reconciler, script: Iterable[Step], *, until: float | None = None) -> Log:
    """Feed ``script`` as the daemon would: tick at every wakeup before each input, and at the
    end keep ticking through ``until``. Returns every action with the time it was returned."""
    log: Log = []

    def ticks_before(t: float) -> None:
        while (wake := rec.next_wakeup) is not None and wake < t:
            log.extend((wake, a) for a in rec.tick(wake))

    for t, event in script:
        ticks_before(t)
        log.extend((t, a) for a in (rec.tick(t) if event is None else rec.handle(event, t)))
    if until is not None:
        ticks_before(until)
        while (wake := rec.next_wakeup) is not None and wake == until:
            log.extend((wake, a) for a in rec.tick(wake))
    return log


def rule(
    name: str,
    *modules: str,
    settle: float = 3.0,
    linger: float = 30.0,
    fingerprint: str = "v1",
) -> RuleTiming:
    return RuleTiming(
        name=name,
        modules=frozenset(modules or (name,)),
        settle=settle,
        linger=linger,
        fingerprint=fingerprint,
    )


def loaded(*rules: RuleTiming) -> RulesLoaded:
    return RulesLoaded(rules=rules)


def holding(**rules: Sequence[str]) -> ConditionsChanged:
    return ConditionsChanged(holding={name: tuple(m) for name, m in rules.items()})


def s(*modules: str) -> frozenset[str]:
    return frozenset(modules)


def on(module: str, until: float | None = None, source: str = "cli") -> Override:
    return Override(module=module, state=OverrideState.ON, until=until, source=source)


def off(module: str, until: float | None = None, source: str = "cli") -> Override:
    return Override(module=module, state=OverrideState.OFF, until=until, source=source)


def overrides(*items: Override) -> OverridesChanged:
    return OverridesChanged(overrides={o.module: o for o in items})


def by_rules(*rules: str) -> Reason:
    return Reason(kind=ReasonKind.RULES, wanted=True, rules=rules)


NO_RULE = Reason(kind=ReasonKind.NO_RULE, wanted=False)


def start(
    apply_id: int,
    target: frozenset[str],
    reasons: Mapping[str, Reason],
    *,
    force: bool = False,
    attempt: int = 1,
) -> StartApply:
    return StartApply(
        apply_id=apply_id, target=target, reasons=reasons, force=force, attempt=attempt
    )


def ok(apply_id: int, *applied: str) -> ApplyFinished:
    return ApplyFinished(apply_id=apply_id, ok=True, applied=s(*applied), message="done")


def failed(apply_id: int, *applied: str, message: str = "build failed") -> ApplyFinished:
    return ApplyFinished(apply_id=apply_id, ok=False, applied=s(*applied), message=message)


def started(*rules: RuleTiming, applied: Iterable[str] = (), **hold: Sequence[str]) -> Reconciler:
    """A reconciler after the daemon's start sequence at t=0, asserting it decided nothing yet
    beyond rule phases."""
    rec = Reconciler()
    log = play(
        rec,
        [(0, loaded(*rules)), (0, AppliedKnown(applied=s(*applied))), (0, holding(**hold))],
    )
    assert not [a for _, a in log if isinstance(a, StartApply)]
    return rec


GPU = rule("gpu", "gaming")
DOCK = rule("dock", "virt")


# --- the rule timeline (the state table, one transition each) ------------------------------------


def test_settle_activates_exactly_after_the_condition_held_for_settle() -> None:
    rec = started(GPU)
    log = play(rec, [(10, holding(gpu=["/pci/gpu"]))], until=20)
    assert log == [
        (10, RuleSettling(rule="gpu", until=13.0)),
        (13, RuleActivated(rule="gpu", matches=("/pci/gpu",))),
        (13, ApplyScheduled(target=s("gaming"), at=13.5)),
        (13.5, start(1, s("gaming"), {"gaming": by_rules("gpu")})),
    ]
    assert rec.next_wakeup is None  # an apply in flight is no timer: its end is an input


def test_settle_zero_activates_at_once_without_a_settling_step() -> None:
    rec = started(rule("gpu", "gaming", settle=0))
    log = play(rec, [(1, holding(gpu=["/pci/gpu"]))])
    assert log == [
        (1, RuleActivated(rule="gpu", matches=("/pci/gpu",))),
        (1, ApplyScheduled(target=s("gaming"), at=1.5)),
    ]


def test_condition_stopping_while_settling_cancels_without_any_apply() -> None:
    rec = started(GPU)
    log = play(rec, [(1, holding(gpu=["/pci/gpu"])), (3.9, holding())], until=60)
    assert log == [
        (1, RuleSettling(rule="gpu", until=4.0)),
        (3.9, RuleSettleCancelled(rule="gpu")),
    ]
    assert rec.next_wakeup is None


def test_settle_restarts_from_the_last_rise() -> None:
    rec = started(GPU)
    log = play(
        rec,
        [(1, holding(gpu=["a"])), (2, holding()), (2.5, holding(gpu=["a"]))],
        until=5.9,
    )
    assert log == [
        (1, RuleSettling(rule="gpu", until=4.0)),
        (2, RuleSettleCancelled(rule="gpu")),
        (2.5, RuleSettling(rule="gpu", until=5.5)),
        (5.5, RuleActivated(rule="gpu", matches=("a",))),
        (5.5, ApplyScheduled(target=s("gaming"), at=6.0)),
    ]


def test_a_deadline_and_a_fall_at_the_same_instant_count_as_settled() -> None:
    # Timers due at `now` fire before the input at `now`: the condition held for all of settle.
    rec = started(GPU)
    log = play(rec, [(0, holding(gpu=["a"])), (3, holding())])
    assert log == [
        (0, RuleSettling(rule="gpu", until=3.0)),
        (3, RuleActivated(rule="gpu", matches=("a",))),
        (3, RuleLingering(rule="gpu", until=33.0)),
        (3, ApplyScheduled(target=s("gaming"), at=3.5)),  # one decision, after the input
    ]


def _active(*rules: RuleTiming, at: float = 0, **hold: Sequence[str]) -> Reconciler:
    """Rules active and their modules applied, nothing pending."""
    rec = started(*rules)
    log = play(rec, [(at, holding(**hold))], until=at + 100)
    starts = [a for _, a in log if isinstance(a, StartApply)]
    assert len(starts) == 1
    play(rec, [(at + 100, ok(starts[0].apply_id, *starts[0].target))])
    assert rec.next_wakeup is None
    return rec


def test_linger_keeps_the_rule_active_then_deactivates_at_exactly_linger() -> None:
    rec = _active(DOCK, dock=["/usb/dock"])
    log = play(rec, [(200, holding())], until=300)
    assert log == [
        (200, RuleLingering(rule="dock", until=230.0)),
        (230, RuleDeactivated(rule="dock")),
        (230, ApplyScheduled(target=s(), at=230.5)),
        (230.5, start(2, s(), {"virt": NO_RULE})),
    ]


def test_condition_returning_within_linger_resumes_with_no_apply() -> None:
    rec = _active(DOCK, dock=["/usb/dock"])
    log = play(rec, [(200, holding()), (229.9, holding(dock=["/usb/dock2"]))], until=400)
    assert log == [
        (200, RuleLingering(rule="dock", until=230.0)),
        (229.9, RuleActivated(rule="dock", matches=("/usb/dock2",), resumed=True)),
    ]
    assert rec.next_wakeup is None


def test_linger_zero_deactivates_at_once() -> None:
    rec = _active(rule("nic", "lab", linger=0), nic=["enp1s0"])
    log = play(rec, [(200, holding())])
    assert log == [
        (200, RuleDeactivated(rule="nic")),
        (200, ApplyScheduled(target=s(), at=200.5)),
    ]


def test_other_matches_while_active_change_nothing_but_the_status() -> None:
    rec = _active(DOCK, dock=["/usb/a"])
    assert play(rec, [(200, holding(dock=["/usb/a", "/usb/b"]))]) == []
    (status,) = rec.snapshot(200).rules
    assert status.phase is Phase.ACTIVE
    assert status.matches == ("/usb/a", "/usb/b")


def test_the_same_truth_again_returns_nothing() -> None:
    rec = started(GPU, DOCK)
    play(rec, [(1, holding(gpu=["a"]))])
    for t in (1.1, 1.2, 1.3):
        assert rec.handle(holding(gpu=["a"]), t) == []
    assert rec.next_wakeup == 4.0


def test_rules_that_are_not_loaded_are_ignored() -> None:
    rec = started(GPU)
    assert play(rec, [(1, holding(disabled=["x"]))]) == []
    assert rec.next_wakeup is None


def test_a_rule_that_is_not_loaded_stopping_is_ignored_too() -> None:
    rec = started(GPU)
    assert play(rec, [(1, holding(disabled=["x"], gpu=["a"])), (2, holding())]) == [
        (1, RuleSettling(rule="gpu", until=4.0)),
        (2, RuleSettleCancelled(rule="gpu")),
    ]


def test_an_unchanged_truth_after_a_missed_deadline_still_fires_it() -> None:
    rec = started(GPU)
    rec.handle(holding(gpu=["a"]), 1)
    assert rec.handle(holding(gpu=["a"]), 4.2) == [
        RuleActivated(rule="gpu", matches=("a",)),
        ApplyScheduled(target=s("gaming"), at=4.5),
    ]
    assert rec.handle(holding(gpu=["a"]), 4.6) == [
        start(1, s("gaming"), {"gaming": by_rules("gpu")})
    ]


def test_a_storm_behind_a_long_timer_keeps_memory_bounded() -> None:
    # White-box on purpose: the timer heap drops stale entries lazily, and must not grow with the
    # number of events while a far-off deadline sits at its head.
    rec = started(rule("slow", "a", settle=1000), rule("flappy", "b", settle=2000))
    rec.handle(holding(slow=[]), 0)
    for i in range(1, 10_000):
        rec.handle(holding(slow=[], flappy=[]) if i % 2 else holding(slow=[]), i * 0.01)
    assert len(rec._timers) <= 2 * 2 + 16
    assert rec.next_wakeup == 1000
    assert rec.tick(1000) == [
        RuleActivated(rule="slow", matches=()),
        ApplyScheduled(target=s("a"), at=1000.5),
    ]


def test_a_late_tick_fires_each_timer_at_its_own_time() -> None:
    # The daemon may wake late (a loaded machine); settle and quiet still count from the deadline.
    rec = started(GPU, DOCK)
    rec.handle(holding(gpu=["a"]), 1)
    rec.handle(holding(gpu=["a"], dock=["b"]), 2)
    assert rec.tick(50) == [
        RuleActivated(rule="gpu", matches=("a",)),
        RuleActivated(rule="dock", matches=("b",)),
        start(1, s("gaming", "virt"), {"gaming": by_rules("gpu"), "virt": by_rules("dock")}),
    ]
    assert [(r.name, r.since) for r in rec.snapshot(50).rules] == [("dock", 5.0), ("gpu", 4.0)]


# --- applies: quiet, coalescing, one at a time ---------------------------------------------------


def test_flapping_nic_50_times_in_5_seconds_makes_at_most_one_apply() -> None:
    rec = started(rule("nic", "lab", settle=3, linger=30))
    script: list[Step] = []
    for i in range(50):  # up 50 ms, down 50 ms, ten times a second, ending up
        script.append((1 + i * 0.1, holding(nic=["enp1s0"])))
        if i < 49:
            script.append((1.05 + i * 0.1, holding()))
    log = play(rec, script, until=20)
    starts = [a for _, a in log if isinstance(a, StartApply)]
    assert starts == [start(1, s("lab"), {"lab": by_rules("nic")})]
    # the last rise at 5.9, settled at 8.9, quiet until 9.4
    assert [t for t, a in log if isinstance(a, StartApply)] == [pytest.approx(9.4)]


def test_flapping_with_no_settle_nor_linger_is_still_one_apply_thanks_to_quiet() -> None:
    rec = started(rule("nic", "lab", settle=0, linger=0))
    script: list[Step] = []
    for i in range(50):
        script.append((1 + i * 0.1, holding(nic=["enp1s0"])))
        script.append((1.05 + i * 0.1, holding()))
    script.append((6, holding(nic=["enp1s0"])))
    log = play(rec, script, until=10)
    assert [(t, a) for t, a in log if isinstance(a, StartApply)] == [
        (6.5, start(1, s("lab"), {"lab": by_rules("nic")}))
    ]


def test_a_flap_that_ends_where_it_began_cancels_the_scheduled_apply() -> None:
    rec = _active(rule("nic", "lab", settle=0, linger=0), nic=["enp1s0"])
    log = play(rec, [(200, holding()), (200.2, holding(nic=["enp1s0"]))], until=300)
    assert log == [
        (200, RuleDeactivated(rule="nic")),
        (200, ApplyScheduled(target=s(), at=200.5)),
        (200.2, RuleActivated(rule="nic", matches=("enp1s0",))),
        (200.2, ApplyCancelled(target=s())),
    ]
    assert rec.next_wakeup is None


def test_changes_during_an_apply_coalesce_into_one_follow_up_with_the_latest_set() -> None:
    rules = [rule(n, n, settle=0, linger=0) for n in ("a", "b", "c")]
    rec = started(*rules)
    log = play(
        rec,
        [
            (1, holding(a=[])),
            (1.5, None),  # apply 1 {a} starts
            (2, holding(a=[], b=[])),
            (3, holding(a=[], b=[], c=[])),
            (4, holding(a=[], c=[])),
            (9, ok(1, "a")),
        ],
        until=20,
    )
    starts = [(t, a) for t, a in log if isinstance(a, StartApply)]
    assert starts == [
        (1.5, start(1, s("a"), {"a": by_rules("a")})),
        # the last change was at 4.0, so quiet had passed when apply 1 ended: at once
        (9, start(2, s("a", "c"), {"a": by_rules("a"), "c": by_rules("c")})),
    ]
    assert not [a for _, a in log if isinstance(a, ApplyScheduled) and _ > 1.5]


def test_no_follow_up_when_the_world_came_back_during_the_apply() -> None:
    rec = started(rule("a", "a", settle=0, linger=0))
    log = play(
        rec,
        [(1, holding(a=[])), (1.5, None), (2, holding()), (3, holding(a=[])), (9, ok(1, "a"))],
        until=20,
    )
    assert [a for _, a in log if isinstance(a, StartApply)] == [
        start(1, s("a"), {"a": by_rules("a")})
    ]
    assert rec.next_wakeup is None
    assert rec.snapshot(20).applied == s("a")


def test_follow_up_waits_for_quiet_after_a_change_late_in_the_apply() -> None:
    rec = started(rule("a", "a", settle=0, linger=0), rule("b", "b", settle=0, linger=0))
    log = play(rec, [(1, holding(a=[])), (1.5, None), (8.9, holding(a=[], b=[])), (9, ok(1, "a"))])
    assert log[-1] == (9, ApplyScheduled(target=s("a", "b"), at=9.4))


def test_an_apply_that_lands_elsewhere_than_its_target_is_followed_up() -> None:
    rec = started(GPU)
    play(rec, [(0, holding(gpu=["a"]))], until=4)
    assert play(rec, [(10, ok(1))]) == [
        (10, start(2, s("gaming"), {"gaming": by_rules("gpu")})),
    ]


# --- failures: backoff and giving up -------------------------------------------------------------


def test_failing_apply_backs_off_exponentially_then_gives_up() -> None:
    rec = started(GPU)
    play(rec, [(0, holding(gpu=["a"]))], until=3.5)  # apply 1 starts at 3.5
    log: Log = []
    t = 3.5
    for apply_id in range(1, DEFAULT_MAX_ATTEMPTS + 1):
        t += 1  # each attempt takes a second to fail
        log += play(rec, [(t, failed(apply_id))], until=t + 1000)
        t = next((when for when, a in log[-2:] if isinstance(a, StartApply)), t)
    target = s("gaming")
    assert log == [
        (4.5, ApplyScheduled(target=target, at=9.5)),
        (9.5, start(2, target, {"gaming": by_rules("gpu")}, attempt=2)),
        (10.5, ApplyScheduled(target=target, at=20.5)),
        (20.5, start(3, target, {"gaming": by_rules("gpu")}, attempt=3)),
        (21.5, ApplyScheduled(target=target, at=41.5)),
        (41.5, start(4, target, {"gaming": by_rules("gpu")}, attempt=4)),
        (42.5, ApplyScheduled(target=target, at=82.5)),
        (82.5, start(5, target, {"gaming": by_rules("gpu")}, attempt=5)),
        (83.5, ApplyGivenUp(target=target, failures=5, message="build failed")),
    ]
    assert rec.next_wakeup is None  # given up: no timer at all
    status = rec.snapshot(90)
    assert status.given_up is not None and status.given_up.target == target
    assert status.pending is None


def test_backoff_is_capped() -> None:
    rec = Reconciler(backoff=100, backoff_cap=150, max_attempts=3)
    play(rec, [(0, loaded(GPU)), (0, holding(gpu=["a"]))], until=3.5)
    assert play(rec, [(4, failed(1))]) == [(4, ApplyScheduled(target=s("gaming"), at=104.0))]
    play(rec, [], until=104)
    assert play(rec, [(105, failed(2))]) == [(105, ApplyScheduled(target=s("gaming"), at=255.0))]


def test_days_of_failures_stay_at_the_cap() -> None:
    # 1,200 failures in a row: far past where 5 * 2**n would overflow a float.
    rec = Reconciler(max_attempts=10_000)
    play(rec, [(0, loaded(GPU)), (0, holding(gpu=["a"]))], until=3.5)  # apply 1 at 3.5
    t = 3.5
    for n in range(1, 1200):
        delay = min(5.0 * 2 ** min(n - 1, 10), 300.0)
        retry = t + 1 + delay
        assert rec.handle(failed(n), t + 1) == [ApplyScheduled(target=s("gaming"), at=retry)]
        assert rec.tick(retry) == [
            start(n + 1, s("gaming"), {"gaming": by_rules("gpu")}, attempt=n + 1)
        ]
        t = retry


def test_a_change_of_the_world_lifts_the_give_up_but_keeps_the_backoff_delay() -> None:
    rec = Reconciler(max_attempts=1)
    play(rec, [(0, loaded(GPU, rule("dock", "virt", settle=0))), (0, holding(gpu=["a"]))])
    play(rec, [], until=3.5)
    assert play(rec, [(4, failed(1))]) == [
        (4, ApplyGivenUp(target=s("gaming"), failures=1, message="build failed"))
    ]
    log = play(rec, [(5, holding(gpu=["a"], dock=["d"]))], until=100)
    assert log == [
        (5, RuleActivated(rule="dock", matches=("d",))),
        # the target changed, so it is tried, but not before the failure's delay (4 + 5 s)
        (5, ApplyScheduled(target=s("gaming", "virt"), at=9.0)),
        (9, start(2, s("gaming", "virt"), {"gaming": by_rules("gpu"), "virt": by_rules("dock")})),
    ]


def test_a_target_given_up_is_tried_afresh_once_the_world_moved_away_and_back() -> None:
    # Unplugging and replugging the device is a natural way to say "try again".
    rec = Reconciler(max_attempts=1)
    dock = rule("dock", "virt", settle=0, linger=0)
    play(rec, [(0, loaded(GPU, dock)), (0, holding(gpu=["a"]))])
    play(rec, [(3.5, None), (4, failed(1))])
    log = play(rec, [(20, holding(gpu=["a"], dock=["d"])), (20.2, holding(gpu=["a"]))], until=21)
    assert rec.snapshot(21).given_up is None
    # quiet after the last change (20.2); the count of failures of this target goes on, so one
    # more failure gives it up again: one attempt per change, never a loop
    assert log[-1] == (20.7, start(2, s("gaming"), {"gaming": by_rules("gpu")}, attempt=2))
    assert play(rec, [(21, failed(2))]) == [
        (21, ApplyGivenUp(target=s("gaming"), failures=2, message="build failed"))
    ]


def test_rebuild_lifts_a_give_up_and_starts_at_once() -> None:
    rec = Reconciler(max_attempts=1)
    play(rec, [(0, loaded(GPU)), (0, holding(gpu=["a"]))], until=3.5)
    play(rec, [(4, failed(1))])
    log = play(rec, [(5, RebuildRequested(force=True))])
    assert log == [(5, start(2, s("gaming"), {"gaming": by_rules("gpu")}, force=True))]
    assert rec.snapshot(5).given_up is None


def test_success_resets_the_backoff() -> None:
    rec = started(GPU, rule("dock", "virt", settle=0))
    play(rec, [(0, holding(gpu=["a"]))], until=3.5)
    play(rec, [(4, failed(1))], until=9)
    play(rec, [(10, ok(2, "gaming"))])
    assert rec.snapshot(10).backoff is None
    log = play(rec, [(11, holding(gpu=["a"], dock=["d"]))], until=12)
    assert log[-2:] == [
        (11, ApplyScheduled(target=s("gaming", "virt"), at=11.5)),
        (
            11.5,
            start(3, s("gaming", "virt"), {"gaming": by_rules("gpu"), "virt": by_rules("dock")}),
        ),
    ]


def test_a_failure_reports_the_rollback_set_as_applied() -> None:
    rec = _active(GPU, gpu=["a"])
    play(rec, [(200, holding())], until=230.5)  # apply 2 removes gaming
    play(rec, [(231, failed(2, "gaming"))])
    status = rec.snapshot(231)
    assert status.applied == s("gaming")
    assert status.last_apply is not None and not status.last_apply.ok
    assert status.backoff is not None and status.backoff.retry_at == 236.0


# --- overrides (issue 5 precedence) --------------------------------------------------------------


def test_override_off_beats_an_active_rule_at_once() -> None:
    rec = _active(GPU, gpu=["a"])
    log = play(rec, [(200, overrides(off("gaming")))])
    reason = Reason(
        kind=ReasonKind.OVERRIDE_OFF, wanted=False, rules=("gpu",), override=off("gaming")
    )
    assert log == [(200, start(2, s(), {"gaming": reason}))]


def test_override_on_without_any_rule_applies_at_once() -> None:
    rec = started(GPU)
    reason = Reason(kind=ReasonKind.OVERRIDE_ON, wanted=True, override=on("gaming"))
    assert play(rec, [(5, overrides(on("gaming")))]) == [
        (5, start(1, s("gaming"), {"gaming": reason}))
    ]


def test_override_expiry_hands_back_to_the_rule_at_exactly_until() -> None:
    rec = _active(GPU, gpu=["a"])
    play(rec, [(200, overrides(off("gaming", until=7400))), (260, ok(2))])
    assert rec.next_wakeup == 7400  # one timer, no polling in between
    log = play(rec, [], until=7400)
    assert log == [
        (7400, OverrideExpired(module="gaming")),
        (7400, start(3, s("gaming"), {"gaming": by_rules("gpu")})),
    ]


def test_override_expiry_with_no_rule_wanting_removes_the_module() -> None:
    rec = started(GPU)
    play(rec, [(1, overrides(on("gaming", until=100))), (2, ok(1, "gaming"))])
    assert play(rec, [], until=100) == [
        (100, OverrideExpired(module="gaming")),
        (100, start(2, s(), {"gaming": NO_RULE})),
    ]


def test_auto_hands_back_to_the_rules_at_once() -> None:
    rec = _active(GPU, gpu=["a"])
    play(rec, [(200, overrides(off("gaming"))), (210, ok(2))])
    assert play(rec, [(300, overrides())]) == [
        (300, start(3, s("gaming"), {"gaming": by_rules("gpu")}))
    ]


def test_an_override_that_arrives_expired_is_dropped_at_once() -> None:
    rec = started(GPU)
    assert play(rec, [(50, overrides(on("gaming", until=40)))]) == [
        (50, OverrideExpired(module="gaming"))
    ]
    assert rec.next_wakeup is None


def test_overrides_expiring_together_expire_in_one_step() -> None:
    rec = started(GPU)
    play(rec, [(1, overrides(on("a", until=10), on("b", until=10), on("c", until=20)))])
    play(rec, [(2, ok(1, "a", "b", "c"))])
    log = play(rec, [], until=10)
    assert log == [
        (10, OverrideExpired(module="a")),
        (10, OverrideExpired(module="b")),
        (
            10,
            start(
                2,
                s("c"),
                {
                    "a": NO_RULE,
                    "b": NO_RULE,
                    "c": Reason(
                        kind=ReasonKind.OVERRIDE_ON, wanted=True, override=on("c", until=20)
                    ),
                },
            ),
        ),
    ]
    assert rec.next_wakeup == 20


def test_an_override_during_a_world_scheduled_apply_skips_the_quiet_period() -> None:
    rec = started(GPU, rule("dock", "virt", settle=0))
    log = play(rec, [(1, holding(dock=["d"])), (1.2, overrides(on("gaming")))])
    assert log[-1] == (
        1.2,
        start(
            1,
            s("gaming", "virt"),
            {
                "gaming": Reason(kind=ReasonKind.OVERRIDE_ON, wanted=True, override=on("gaming")),
                "virt": by_rules("dock"),
            },
        ),
    )


def test_a_user_change_that_needs_no_apply_does_not_hurry_the_next_world_change() -> None:
    rec = _active(GPU, DOCK, gpu=["a"])
    play(rec, [(200, holding()), (230, None)])  # gaming lingers out: its removal is scheduled
    assert play(rec, [(230.1, overrides(on("gaming")))]) == [(230.1, ApplyCancelled(target=s()))]
    assert play(rec, [(240, holding(dock=["d"]))], until=243.2) == [
        (240, RuleSettling(rule="dock", until=243.0)),
        (243, RuleActivated(rule="dock", matches=("d",))),
        (243, ApplyScheduled(target=s("gaming", "virt"), at=243.5)),
    ]


def test_an_override_that_changes_nothing_does_not_hurry_a_backoff() -> None:
    rec = started(GPU)
    play(rec, [(0, holding(gpu=["a"]))], until=3.5)
    play(rec, [(4, failed(1))])
    assert play(rec, [(5, overrides(on("gaming")))]) == []  # gaming was wanted already
    assert rec.next_wakeup == 9.0


# --- pause, resume, reset ------------------------------------------------------------------------


def test_pause_keeps_the_rules_part_and_overrides_still_apply() -> None:
    rec = _active(GPU, DOCK, gpu=["a"])
    log = play(
        rec,
        [
            (200, Paused(paused=True)),
            (201, holding(gpu=["a"], dock=["d"])),  # the dock arrives: no apply while paused
            (202, holding(dock=["d"])),  # the GPU leaves: gaming stays
            (210, overrides(on("extra"))),
        ],
        until=300,
    )
    assert log == [
        (201, RuleSettling(rule="dock", until=204.0)),
        (202, RuleLingering(rule="gpu", until=232.0)),
        (204, RuleActivated(rule="dock", matches=("d",))),
        (
            210,
            start(
                2,
                s("gaming", "extra"),
                {
                    "gaming": Reason(kind=ReasonKind.PAUSED, wanted=True, rules=("gpu",)),
                    "extra": Reason(kind=ReasonKind.OVERRIDE_ON, wanted=True, override=on("extra")),
                },
            ),
        ),
        (232, RuleDeactivated(rule="gpu")),
    ]
    status = rec.snapshot(300)
    assert status.paused and status.paused_modules == s("gaming")
    virt = next(m for m in status.modules if m.name == "virt")
    assert virt.reason == Reason(kind=ReasonKind.PAUSED, wanted=False, rules=("dock",))


def test_resume_applies_what_the_rules_want_now_at_once() -> None:
    rec = _active(GPU, DOCK, gpu=["a"])
    play(rec, [(200, Paused(paused=True)), (201, holding(dock=["d"]))], until=300)
    assert play(rec, [(300, Paused(paused=False))]) == [
        (300, start(2, s("virt"), {"gaming": NO_RULE, "virt": by_rules("dock")}))
    ]


def test_pause_with_a_given_set_and_pausing_twice() -> None:
    rec = started(GPU)
    # at start, the daemon passes the set it persisted
    assert play(rec, [(1, Paused(paused=True, modules=s("gaming")))])[0][1] == start(
        1, s("gaming"), {"gaming": Reason(kind=ReasonKind.PAUSED, wanted=True)}
    )
    play(rec, [(2, ok(1, "gaming")), (3, Paused(paused=True))])  # already paused: kept as is
    assert rec.snapshot(3).paused_modules == s("gaming")
    assert play(rec, [(4, Paused(paused=False)), (5, Paused(paused=False))]) == [
        (4, start(2, s(), {"gaming": NO_RULE}))
    ]


def test_reset_returns_to_base_and_rules_do_not_bring_modules_back_until_resume() -> None:
    rec = _active(GPU, gpu=["a"])
    play(rec, [(150, overrides(on("extra"))), (151, ok(2, "gaming", "extra"))])
    paused = Reason(kind=ReasonKind.PAUSED, wanted=False, rules=("gpu",))
    assert play(rec, [(200, ResetRequested())]) == [
        (
            200,
            start(
                3, s(), {"gaming": paused, "extra": Reason(kind=ReasonKind.PAUSED, wanted=False)}
            ),
        )
    ]
    # the GPU is still there and its rule still active: nothing comes back
    assert play(rec, [(210, ok(3)), (220, holding(gpu=["a", "b"]))], until=1000) == []
    status = rec.snapshot(1000)
    assert status.overrides == () and status.paused and status.paused_modules == s()
    assert play(rec, [(1000, Paused(paused=False))]) == [
        (1000, start(4, s("gaming"), {"gaming": by_rules("gpu")}))
    ]


# --- start and restart (issue 4 item 4) ----------------------------------------------------------


def test_restart_with_the_world_present_and_its_modules_applied_applies_nothing() -> None:
    rec = Reconciler()
    log = play(
        rec,
        [
            (0, loaded(GPU, DOCK)),
            (0, AppliedKnown(applied=s("gaming", "virt"))),
            (0, holding(gpu=["/pci/gpu"], dock=["/usb/dock"])),
        ],
        until=1000,
    )
    assert log == [  # in the order of the input
        (0, RuleSettling(rule="gpu", until=3.0)),
        (0, RuleSettling(rule="dock", until=3.0)),
        (3, RuleActivated(rule="gpu", matches=("/pci/gpu",))),
        (3, RuleActivated(rule="dock", matches=("/usb/dock",))),
    ]
    assert rec.next_wakeup is None


def test_while_a_restarted_rule_settles_its_applied_modules_are_held() -> None:
    rec = Reconciler()
    play(rec, [(0, loaded(GPU)), (0, AppliedKnown(applied=s("gaming"))), (0, holding(gpu=["a"]))])
    status = rec.snapshot(1)
    assert status.wanted == s("gaming")
    (gaming,) = status.modules
    assert gaming.reason == Reason(kind=ReasonKind.HELD, wanted=True, rules=("gpu",))
    assert status.rules[0].held


def test_start_after_reboot_applies_what_the_world_wants_after_settle() -> None:
    rec = Reconciler()
    log = play(
        rec,
        [(0, loaded(GPU)), (0, AppliedKnown(applied=s())), (0, holding(gpu=["a"]))],
        until=10,
    )
    assert [(t, a) for t, a in log if isinstance(a, StartApply)] == [
        (3.5, start(1, s("gaming"), {"gaming": by_rules("gpu")}))
    ]


def test_restart_after_the_device_left_removes_its_module_after_quiet() -> None:
    rec = Reconciler()
    log = play(
        rec, [(0, loaded(GPU)), (0, AppliedKnown(applied=s("gaming"))), (0, holding())], until=10
    )
    assert log == [
        (0, ApplyScheduled(target=s(), at=0.5)),
        (0.5, start(1, s(), {"gaming": NO_RULE})),
    ]


def test_nothing_is_decided_before_the_world_is_known() -> None:
    rec = Reconciler()
    log = play(
        rec,
        [
            (0, loaded(GPU)),
            (0, AppliedKnown(applied=s("gaming"))),
            (0, overrides(on("virt"))),
            (0, RebuildRequested()),
        ],
        until=100,
    )
    assert log == []
    assert not rec.snapshot(100).world_known
    assert play(rec, [(100, holding(gpu=["a"]))]) == [
        (100, RuleSettling(rule="gpu", until=103.0)),
        (
            100,
            start(
                1,
                s("gaming", "virt"),
                {
                    "gaming": Reason(kind=ReasonKind.HELD, wanted=True, rules=("gpu",)),
                    "virt": Reason(kind=ReasonKind.OVERRIDE_ON, wanted=True, override=on("virt")),
                },
            ),
        ),
    ]


# --- rule reloads --------------------------------------------------------------------------------


def test_reload_keeps_the_timeline_of_unchanged_rules() -> None:
    rec = started(GPU, DOCK)
    play(rec, [(0, holding(gpu=["a"]))])
    # a reload at 1 (a description edited, or another rule added) while gpu settles
    log = play(
        rec, [(1, loaded(GPU, DOCK, rule("nic", "lab"))), (1, holding(gpu=["a"]))], until=3.4
    )
    assert log == [
        (3, RuleActivated(rule="gpu", matches=("a",))),
        (3, ApplyScheduled(target=s("gaming"), at=3.5)),
    ]


def test_reload_takes_new_settle_and_modules_of_an_unchanged_condition() -> None:
    rec = _active(rule("gpu", "gaming", settle=3), gpu=["a"])
    log = play(rec, [(200, loaded(rule("gpu", "gaming", "steam"))), (200, holding(gpu=["a"]))])
    assert log == [(200, ApplyScheduled(target=s("gaming", "steam"), at=200.5))]
    rec = started(GPU)
    play(rec, [(0, holding(gpu=["a"]))])
    log = play(rec, [(1, loaded(rule("gpu", "gaming", settle=1))), (1, holding(gpu=["a"]))])
    assert log == [  # since 0, settle now 1: already due, so active at once
        (1, RuleActivated(rule="gpu", matches=("a",))),
        (1, ApplyScheduled(target=s("gaming"), at=1.5)),
    ]
    log = play(rec, [(2, loaded(rule("gpu", "gaming", settle=1, linger=5))), (3, holding())])
    assert log[-1] == (3, RuleLingering(rule="gpu", until=8.0))
    assert play(rec, [(4, loaded(rule("gpu", "gaming", linger=10)))]) == []
    assert rec.next_wakeup == 13.0


def test_reload_with_a_changed_condition_resets_the_rule_but_holds_its_modules() -> None:
    rec = _active(GPU, gpu=["a"])
    changed = rule("gpu", "gaming", fingerprint="v2")
    log = play(rec, [(200, loaded(changed)), (200, holding(gpu=["a"]))], until=1000)
    assert log == [
        (200, RuleDeactivated(rule="gpu")),
        (200, RuleSettling(rule="gpu", until=203.0)),
        (203, RuleActivated(rule="gpu", matches=("a",))),
    ]  # and no apply: gaming was held while the new condition settled


def test_reload_with_a_changed_condition_that_no_longer_holds_drops_the_modules() -> None:
    rec = _active(GPU, gpu=["a"])
    log = play(
        rec,
        [(200, loaded(rule("gpu", "gaming", fingerprint="v2"))), (200, holding())],
        until=201,
    )
    assert log == [
        (200, RuleDeactivated(rule="gpu")),
        (200, ApplyScheduled(target=s(), at=200.5)),
        (200.5, start(2, s(), {"gaming": NO_RULE})),
    ]


def test_reload_removing_rules_deactivates_them() -> None:
    rec = _active(GPU, DOCK, gpu=["a"])
    play(rec, [(200, holding(gpu=["a"], dock=["d"]))])
    log = play(rec, [(201, loaded(rule("nic", "lab"))), (201, holding())], until=202)
    assert log == [
        (201, RuleSettleCancelled(rule="dock")),
        (201, RuleDeactivated(rule="gpu")),
        (201, ApplyScheduled(target=s(), at=201.5)),
        (201.5, start(2, s(), {"gaming": NO_RULE})),
    ]


def test_reload_removing_an_inactive_rule_says_nothing() -> None:
    rec = started(GPU, DOCK)
    assert play(rec, [(1, loaded(GPU)), (1, holding())]) == []
    assert [r.name for r in rec.snapshot(1).rules] == ["gpu"]


def test_two_rules_wanting_one_module_keep_it_until_both_are_gone() -> None:
    rec = _active(
        rule("a", "m", settle=0, linger=0), rule("b", "m", settle=0, linger=0), a=[], b=[]
    )
    assert play(rec, [(200, holding(b=[]))]) == [(200, RuleDeactivated(rule="a"))]
    assert play(rec, [(201, holding())])[-1] == (201, ApplyScheduled(target=s(), at=201.5))


# --- rebuild -------------------------------------------------------------------------------------


def test_rebuild_reapplies_the_current_set_at_once() -> None:
    rec = _active(GPU, gpu=["a"])
    assert play(rec, [(200, RebuildRequested())]) == [
        (200, start(2, s("gaming"), {"gaming": by_rules("gpu")}))
    ]


def test_rebuild_during_an_apply_follows_it() -> None:
    rec = started(GPU)
    play(rec, [(0, holding(gpu=["a"]))], until=3.5)
    assert play(rec, [(4, RebuildRequested()), (4.5, RebuildRequested(force=True))]) == []
    assert rec.snapshot(5).pending is not None
    assert play(rec, [(6, ok(1, "gaming"))]) == [
        (6, start(2, s("gaming"), {"gaming": by_rules("gpu")}, force=True))
    ]


# --- status --------------------------------------------------------------------------------------


def test_snapshot_is_complete_and_plain_json() -> None:
    rec = started(GPU, DOCK)
    play(
        rec,
        [
            (0, holding(gpu=["/pci/gpu"])),
            (1, overrides(on("virt", until=3600, source="uid 1000"))),
            (2, holding(gpu=["/pci/gpu"], dock=["/usb/dock"])),
        ],
    )
    data = json.loads(json.dumps(rec.snapshot(2.5).to_json()))
    assert data == {
        "now": 2.5,
        "world_known": True,
        "rules": [
            {
                "name": "dock",
                "phase": "settling",
                "since": 2.0,
                "until": 5.0,
                "matches": ["/usb/dock"],
                "modules": ["virt"],
                "held": False,
            },
            {
                "name": "gpu",
                "phase": "settling",
                "since": 0.0,
                "until": 3.0,
                "matches": ["/pci/gpu"],
                "modules": ["gaming"],
                "held": False,
            },
        ],
        "modules": [
            {
                "name": "gaming",
                "wanted": False,
                "applied": False,
                "reason": {"kind": "no-rule", "wanted": False, "rules": [], "override": None},
            },
            {
                "name": "virt",
                "wanted": True,
                "applied": False,
                "reason": {
                    "kind": "override-on",
                    "wanted": True,
                    "rules": [],
                    "override": {
                        "module": "virt",
                        "state": "on",
                        "until": 3600.0,
                        "source": "uid 1000",
                    },
                },
            },
        ],
        "wanted": ["virt"],
        "applied": [],
        "overrides": [{"module": "virt", "state": "on", "until": 3600.0, "source": "uid 1000"}],
        "paused": False,
        "paused_modules": None,
        "in_flight": {"apply_id": 1, "target": ["virt"], "force": False, "started": 1.0},
        "pending": None,
        "backoff": None,
        "given_up": None,
        "last_apply": None,
        "next_wakeup": 3.0,
    }


def test_snapshot_shows_the_follow_up_backoff_and_last_apply() -> None:
    rec = started(GPU, DOCK)
    play(rec, [(0, holding(gpu=["a"]))], until=3.5)
    play(rec, [(4, holding(gpu=["a"], dock=["d"]))], until=7)
    status = rec.snapshot(7)
    assert status.in_flight is not None and status.in_flight.target == s("gaming")
    assert status.pending is not None and status.pending.at is None
    assert status.pending.target == s("gaming", "virt")
    assert "after the current apply" in status.summary()
    play(rec, [(8, failed(1, message="nix: out of disk"))])
    status = rec.snapshot(8)
    assert status.pending is not None and status.pending.at == 13.0
    assert status.backoff is not None and status.backoff.failures == 1
    assert status.last_apply is not None
    assert status.last_apply.message == "nix: out of disk"
    assert (status.last_apply.started, status.last_apply.finished) == (3.5, 8)
    assert status.summary() == (
        "2 rules (2 not inactive); applied: base system; next: gaming,virt in 5.0s"
    )


def test_summary_line_names_pause_flight_and_give_up() -> None:
    rec = Reconciler(max_attempts=1)
    play(rec, [(0, loaded(GPU)), (0, holding()), (1, overrides(on("gaming")))])
    assert (
        rec.snapshot(1).summary() == "1 rules (0 not inactive); applied: base system; applying #1"
    )
    play(rec, [(2, failed(1)), (3, Paused(paused=True))])
    assert rec.snapshot(3).summary() == (
        "1 rules (0 not inactive); applied: base system; paused; gave up after 1 failures"
    )


def test_actions_turn_into_json_with_their_name() -> None:
    action = start(7, s("b", "a"), {"a": by_rules("r")}, attempt=2)
    assert to_json(action) == {
        "action": "StartApply",
        "apply_id": 7,
        "target": ["a", "b"],
        "reasons": {"a": {"kind": "rules", "wanted": True, "rules": ["r"], "override": None}},
        "force": False,
        "attempt": 2,
    }
    assert RuleLingering(rule="r", until=3.0).to_json() == {
        "action": "RuleLingering",
        "rule": "r",
        "until": 3.0,
    }
    assert holding(r=["x"]).to_json() == {"holding": {"r": ["x"]}}


# --- misuse: raised before any change ------------------------------------------------------------


def test_time_going_backwards_is_refused_and_changes_nothing() -> None:
    rec = started(GPU)
    play(rec, [(5, holding(gpu=["a"]))])
    before = rec.snapshot(5)
    with pytest.raises(ValueError, match="time went backwards"):
        rec.handle(holding(), 4.999)
    with pytest.raises(ValueError, match="time went backwards"):
        rec.tick(1)
    with pytest.raises(ValueError, match="time went backwards"):
        rec.snapshot(1)
    for bad in (math.nan, math.inf, True, "5"):
        with pytest.raises(ValueError, match="finite"):
            rec.tick(bad)  # type: ignore[arg-type]
    assert rec.snapshot(5) == before


def test_apply_finished_must_name_the_apply_in_flight() -> None:
    rec = started(GPU)
    with pytest.raises(RuntimeError, match="in flight is none"):
        rec.handle(ok(1), 1)
    play(rec, [(2, overrides(on("x")))])
    with pytest.raises(RuntimeError, match="in flight is apply 1"):
        rec.handle(ok(2), 3)
    with pytest.raises(RuntimeError, match="AppliedKnown while apply 1"):
        rec.handle(AppliedKnown(applied=s()), 3)
    assert rec.snapshot(3).in_flight is not None


def test_applied_known_of_an_external_apply_is_taken_as_the_truth() -> None:
    rec = _active(GPU, gpu=["a"])
    log = play(rec, [(200, AppliedKnown(applied=s()))], until=201)
    assert log == [
        (200, ApplyScheduled(target=s("gaming"), at=200.5)),
        (200.5, start(2, s("gaming"), {"gaming": by_rules("gpu")})),
    ]


def test_only_inputs_are_taken() -> None:
    rec = Reconciler()
    with pytest.raises(TypeError, match="not a reconciler input"):
        rec.handle(RuleDeactivated(rule="x"), 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: rule("", "m"), "RuleTiming.name"),
        (lambda: rule("r", "m", settle=-1), "settle of rule r"),
        (lambda: rule("r", "m", linger=math.inf), "linger of rule r"),
        (
            lambda: RuleTiming(
                name="r",
                modules="gaming",  # type: ignore[arg-type]
                settle=0,
                linger=0,
                fingerprint="",
            ),
            "set of",
        ),
        (
            lambda: RuleTiming(
                name="r", modules=frozenset({""}), settle=0, linger=0, fingerprint=""
            ),
            "each of",
        ),
        (
            lambda: RuleTiming(
                name="r",
                modules=s("m"),
                settle=0,
                linger=0,
                fingerprint=None,  # type: ignore[arg-type]
            ),
            "fingerprint",
        ),
        (lambda: loaded(GPU, GPU), "loaded twice"),
        (lambda: RulesLoaded(rules=("gpu",)), "RuleTiming values"),  # type: ignore[arg-type]
        (lambda: ConditionsChanged(holding=[("gpu", ())]), "mapping"),  # type: ignore[arg-type]
        (lambda: ConditionsChanged(holding={"gpu": "/pci/gpu"}), "tuple of names"),  # type: ignore[dict-item]
        (lambda: ConditionsChanged(holding={"gpu": 3}), "tuple of names"),  # type: ignore[dict-item]
        (lambda: Override(module="", state=OverrideState.ON), "Override.module"),
        (lambda: Override(module="m", state="on"), "OverrideState"),  # type: ignore[arg-type]
        (lambda: Override(module="m", state=OverrideState.ON, until=math.nan), "until"),
        (lambda: Override(module="m", state=OverrideState.ON, source=1), "source"),  # type: ignore[arg-type]
        (lambda: OverridesChanged(overrides=[on("m")]), "mapping"),  # type: ignore[arg-type]
        (lambda: OverridesChanged(overrides={"x": on("m")}), "Override of module 'x'"),
        (lambda: Paused(paused=1), "True or False"),  # type: ignore[arg-type]
        (lambda: Paused(paused=False, modules=s()), "only meaningful"),
        (lambda: AppliedKnown(applied=3), "set of"),  # type: ignore[arg-type]
        (lambda: ApplyFinished(apply_id="1", ok=True, applied=s()), "apply_id"),  # type: ignore[arg-type]
        (lambda: ApplyFinished(apply_id=1, ok=True, applied=s(), message=None), "message"),  # type: ignore[arg-type]
        (lambda: RebuildRequested(force="yes"), "True or False"),  # type: ignore[arg-type]
        (lambda: Reconciler(quiet=-1), "quiet"),
        (lambda: Reconciler(backoff=10, backoff_cap=5), "shorter"),
        (lambda: Reconciler(max_attempts=0), "max_attempts"),
        (lambda: Reconciler(first_apply_id=1.5), "first_apply_id"),  # type: ignore[arg-type]
    ],
)
def test_inputs_and_settings_are_validated_where_they_are_made(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_inputs_normalize_what_they_are_given() -> None:
    timing = RuleTiming(name="r", modules=["a", "a"], settle=1, linger=2, fingerprint="f")  # type: ignore[arg-type]
    assert timing.modules == s("a") and isinstance(timing.settle, float)
    raw = {"r": ["x"]}
    event = ConditionsChanged(holding=raw)  # type: ignore[arg-type]
    raw["r"].append("y")  # the input keeps its own copy
    assert event.holding == {"r": ("x",)}
    assert Reconciler(first_apply_id=41).handle(overrides(on("m")), 0) == []
