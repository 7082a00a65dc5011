"""Properties of the reconciler for any sequence of inputs and times (hypothesis).

A driver plays the daemon on a virtual clock: it feeds the generated inputs, ticks at every
``next_wakeup``, and plays the applier, finishing each apply after a drawn duration with a drawn
outcome (a failure rolls back to what was applied before).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime_modules._reconciler import (
    DEFAULT_BACKOFF,
    DEFAULT_BACKOFF_CAP,
    Action,
    AppliedKnown,
    ApplyFinished,
    ConditionsChanged,
    Input,
    Override,
    OverridesChanged,
    OverrideState,
    Paused,
    RebuildRequested,
    Reconciler,
    ResetRequested,
    RulesLoaded,
    RuleTiming,
    StartApply,
)

# A small world that still has every shape: settle and linger of 0, short and long ones, two rules
# sharing a module.
RULES = (
    RuleTiming(name="a", modules=frozenset({"x"}), settle=0, linger=0, fingerprint="1"),
    RuleTiming(name="b", modules=frozenset({"x", "y"}), settle=1, linger=2, fingerprint="1"),
    RuleTiming(name="c", modules=frozenset({"z"}), settle=3, linger=30, fingerprint="1"),
    RuleTiming(name="d", modules=frozenset({"y"}), settle=0.5, linger=0, fingerprint="1"),
)
MODULES = ("x", "y", "z", "w")

gaps = st.one_of(
    st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0]),
    st.floats(min_value=0, max_value=60, allow_nan=False),
)
truths = st.dictionaries(
    st.sampled_from([r.name for r in RULES]),
    st.lists(st.sampled_from(["/dev/a", "/dev/b", "eth0"]), max_size=2).map(tuple),
).map(lambda holding: ConditionsChanged(holding=holding))


@st.composite
def override_sets(draw: st.DrawFn) -> OverridesChanged:
    modules = draw(st.lists(st.sampled_from(MODULES), unique=True, max_size=3))
    overrides = {}
    for module in modules:
        until = draw(st.none() | st.floats(min_value=0, max_value=200, allow_nan=False))
        state = draw(st.sampled_from(OverrideState))
        overrides[module] = Override(module=module, state=state, until=until, source="test")
    return OverridesChanged(overrides=overrides)


@st.composite
def reloads(draw: st.DrawFn) -> RulesLoaded:
    kept = draw(st.lists(st.sampled_from(RULES), unique_by=lambda r: r.name, min_size=1))
    rules = []
    for timing in kept:
        fingerprint = draw(st.sampled_from(["1", "2"]))
        modules = draw(st.sampled_from([timing.modules, frozenset({"w"})]))
        rules.append(
            RuleTiming(
                name=timing.name,
                modules=modules,
                settle=timing.settle,
                linger=timing.linger,
                fingerprint=fingerprint,
            )
        )
    return RulesLoaded(rules=tuple(rules))


world_inputs = truths
user_inputs = st.one_of(
    override_sets(),
    st.builds(Paused, paused=st.booleans()),
    st.just(ResetRequested()),
    st.builds(RebuildRequested, force=st.booleans()),
    reloads(),
)
any_inputs = st.one_of(world_inputs, world_inputs, user_inputs)  # the world speaks most


def scripts(inputs: st.SearchStrategy[Input]) -> st.SearchStrategy[list[tuple[float, Input]]]:
    return st.lists(st.tuples(gaps, inputs), max_size=40).map(_absolute)


def _absolute(steps: list[tuple[float, Input]]) -> list[tuple[float, Input]]:
    t = 0.0
    out = []
    for gap, event in steps:
        t += gap
        out.append((t, event))
    return out


@dataclass
class Driver:
    rec: Reconciler
    data: st.DataObject | None  # draws apply durations and outcomes; None: 1 s, always ok
    failing: bool = True
    flight: tuple[float, StartApply, bool] | None = None
    log: list[tuple[float, Action]] = field(default_factory=list)
    cycle: list[tuple[str, float]] = field(default_factory=list)  # ("start" / "ok" / "failed", t)

    def start(self, applied: frozenset[str] = frozenset()) -> None:
        self.feed(0.0, RulesLoaded(rules=RULES))
        self.feed(0.0, AppliedKnown(applied=applied))
        self.feed(0.0, ConditionsChanged(holding={}))

    def _took(self, t: float, actions: list[Action]) -> None:
        rec = self.rec
        wake = rec.next_wakeup
        assert wake is None or wake > t, "a timer in the past would be polling"
        status = rec.snapshot(t)
        for module in status.modules:
            assert module.reason.wanted == (module.name in status.wanted), module
        for action in actions:
            self.log.append((t, action))
            if isinstance(action, StartApply):
                assert self.flight is None, "two applies in flight"
                assert action.target == status.wanted
                for name, reason in action.reasons.items():
                    assert reason.wanted == (name in action.target)
                if self.data is None:
                    duration, ok = 1.0, True
                else:
                    duration = self.data.draw(st.sampled_from([0.0, 0.1, 1.0, 10.0, 60.0]))
                    ok = self.data.draw(st.booleans()) if self.failing else True
                self.flight = (t + duration, action, ok)
                self.cycle.append(("start", t))

    def advance(self, until: float) -> None:
        """Finish applies and tick at wakeups up to and including ``until``."""
        while True:
            finish = self.flight[0] if self.flight is not None else None
            wake = self.rec.next_wakeup
            if finish is not None and finish <= until and (wake is None or finish <= wake):
                assert self.flight is not None
                _, action, ok = self.flight
                self.flight = None
                before = self.rec.snapshot(finish).applied
                applied = action.target if ok else before
                event = ApplyFinished(apply_id=action.apply_id, ok=ok, applied=applied)
                self.cycle.append(("ok" if ok else "failed", finish))
                self._took(finish, self.rec.handle(event, finish))
            elif wake is not None and wake <= until:
                self._took(wake, self.rec.tick(wake))
            else:
                return

    def feed(self, t: float, event: Input) -> None:
        self.advance(t)
        self._took(t, self.rec.handle(event, t))

    def drain(self, t: float) -> float:
        """Let the world be quiet and every apply succeed until nothing is pending."""
        self.failing = False
        if self.flight is not None:
            self.flight = (self.flight[0], self.flight[1], True)
        for _ in range(1000):
            if self.flight is None and self.rec.next_wakeup is None:
                return t
            t = max(t, self.flight[0] if self.flight else self.rec.next_wakeup or t)
            self.advance(t)
        raise AssertionError("never became idle")


@settings(max_examples=300, deadline=None)
@given(script=scripts(any_inputs), data=st.data())
def test_quiet_world_with_succeeding_applies_ends_applied_as_wanted_and_idle(
    script: list[tuple[float, Input]], data: st.DataObject
) -> None:
    driver = Driver(Reconciler(), data, failing=False)
    driver.start()
    for t, event in script:
        driver.feed(t, event)
    end = driver.drain(script[-1][0] if script else 0.0)
    status = driver.rec.snapshot(end)
    assert status.applied == status.wanted
    assert status.next_wakeup is None and status.in_flight is None and status.pending is None


@settings(max_examples=300, deadline=None)
@given(script=scripts(any_inputs), data=st.data())
def test_with_failures_it_ends_applied_as_wanted_or_given_up_and_a_rebuild_recovers(
    script: list[tuple[float, Input]], data: st.DataObject
) -> None:
    driver = Driver(Reconciler(), data)
    driver.start(applied=frozenset({"z"}))
    for t, event in script:
        driver.feed(t, event)
    end = driver.drain(script[-1][0] if script else 0.0)
    status = driver.rec.snapshot(end)
    if status.applied != status.wanted:
        assert status.given_up is not None and status.given_up.target == status.wanted
        driver.feed(end, RebuildRequested())
        end = driver.drain(end)
        status = driver.rec.snapshot(end)
    assert status.applied == status.wanted
    assert status.next_wakeup is None


@settings(max_examples=300, deadline=None)
@given(script=scripts(world_inputs), data=st.data())
def test_failed_applies_are_never_retried_faster_than_the_backoff(
    script: list[tuple[float, Input]], data: st.DataObject
) -> None:
    # Only the world speaks here: user actions may skip the backoff on purpose.
    driver = Driver(Reconciler(), data)
    driver.start(applied=frozenset({"z"}))
    for t, event in script:
        driver.feed(t, event)
    driver.advance(script[-1][0] + 1000 if script else 1000)
    failures = 0
    failed_at = 0.0
    for what, t in driver.cycle:
        if what == "failed":
            failures += 1
            failed_at = t
        elif what == "ok":
            failures = 0
        elif failures:
            delay = min(DEFAULT_BACKOFF * 2 ** (failures - 1), DEFAULT_BACKOFF_CAP)
            assert t >= failed_at + delay


@settings(max_examples=200, deadline=None)
@given(script=scripts(any_inputs))
def test_duplicated_truths_change_nothing(script: list[tuple[float, Input]]) -> None:
    # Level-triggered: the same ConditionsChanged twice (a duplicated uevent) is harmless.
    once = Driver(Reconciler(), None)
    twice = Driver(Reconciler(), None)
    for driver in (once, twice):
        driver.start()
    for t, event in script:
        once.feed(t, event)
        twice.feed(t, event)
        if isinstance(event, ConditionsChanged):
            twice.feed(t, event)
    assert once.log == twice.log
