"""The daemon: one event loop around the pure pipeline (the imperative shell).

Everything that decides lives in ``_replay.Pipeline`` (world → evaluator → reconciler) and
``_reconciler``; this module only does the I/O around it, on one thread with one ``selectors``
loop:

    udev monitor fd ─┐                           ┌─> journal (MESSAGE_IDs), stdout (--dry-run)
    netlink fd ──────┤                           ├─> sd_notify STATUS= / WATCHDOG=1
    signal pipe ─────┼─> Pipeline / Reconciler ──┼─> apply worker thread (one at a time)
    apply pipe ──────┤   (time: CLOCK_BOOTTIME)  └─> listeners (control socket, benchmarks)
    control socket ──┘   (registered by _control, later)

The selector's timeout is the reconciler's ``next_wakeup`` (and the other timers registered
with ``add_timer``): when nothing is pending the loop blocks with no timeout at all, so an idle
daemon makes no syscall. The watchdog, when systemd asks for one, is the only periodic timer.

Start (coldplug): open the monitors first, then enumerate, so nothing that happens during the
enumeration is lost (what the monitors queued meanwhile is applied after it: changes are
idempotent). Then rules, overrides, the state file's applied set and the rules' truth go to the
reconciler, and READY=1. A killed daemon's half-done apply is rolled back before (the applier's
``recover``).

Signals arrive through ``signal.set_wakeup_fd`` as bytes on the signal pipe: SIGHUP reloads the
registry and rules (an invalid set is rejected and the last good one kept), SIGTERM and SIGINT
stop: the sources are closed, an apply in flight may finish for ``stop_timeout`` seconds and is
then cancelled (the applier rolls it back), STOPPING=1, exit 0.

Applies run in a worker thread because ``nixos-rebuild`` takes minutes; the worker posts its
output lines and its outcome to the loop through the apply pipe, and the loop alone touches the
reconciler. ``step`` runs one round of the loop, so tests and benchmarks drive the daemon
in-process; ``subscribe`` gives them (and the control socket) every action, output line and
apply result; ``on_decision`` gives a benchmark the receive and decision times of each batch.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ._applier import Applier, ApplyOutcome
from ._errors import ConfigError, PermissionDeniedError, RuleError, RuntimeModulesError
from ._journal import Journal, JournalEvent, Priority
from ._reconciler import Reconciler
from ._reconciler_events import (
    Action,
    ApplyCancelled,
    ApplyFinished,
    ApplyGivenUp,
    ApplyScheduled,
    Input,
    OverrideExpired,
    Reason,
    RebuildRequested,
    ReconcilerStatus,
    RuleActivated,
    RuleDeactivated,
    RuleLingering,
    RuleSettleCancelled,
    RuleSettling,
    StartApply,
)
from ._registry import Registry, load_registry
from ._replay import Pipeline, describe
from ._rules import Needs, RuleSet, load_rules
from ._settings import Settings
from ._world import World, WorldChange, WorldReplaced

__all__ = [
    "ActionTaken",
    "ApplyDone",
    "ApplyOutput",
    "Daemon",
    "DecisionTimes",
    "Notice",
    "WorldChanged",
    "boottime",
]

log = logging.getLogger(__name__)

# SIGTERM while an apply runs: let it finish for this long, then cancel it (the applier kills
# nixos-rebuild and switches back, which takes seconds). 30 s + a rollback fits in systemd's
# default TimeoutStopSec of 90 s; the NixOS unit sets TimeoutStopSec to match.
DEFAULT_STOP_TIMEOUT = 30.0
_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


def boottime() -> float:
    """CLOCK_BOOTTIME seconds: monotonic, and counting suspend, so that a linger of 30 s is
    over after a laptop slept for an hour (CLOCK_MONOTONIC would stop while it sleeps)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# --- what listeners get ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionTaken:
    """The reconciler decided ``action`` at ``now`` (daemon clock); ``text`` says it plainly."""

    action: Action
    now: float
    text: str


@dataclass(frozen=True, slots=True)
class ApplyOutput:
    apply_id: int
    line: str


@dataclass(frozen=True, slots=True)
class ApplyDone:
    apply_id: int
    ok: bool
    applied: frozenset[str]
    message: str
    outcome: ApplyOutcome | None  # None when the applier raised before running anything


@dataclass(frozen=True, slots=True)
class WorldChanged:
    """A batch of normalized events from one source (for ``runtime-modules events``)."""

    source: str  # "udev" or "netlink"
    changes: tuple[WorldChange, ...]


Notice = ActionTaken | ApplyOutput | ApplyDone | WorldChanged


@dataclass(frozen=True, slots=True)
class DecisionTimes:
    """One batch whose changes moved some rule's truth (CLOCK_MONOTONIC seconds).

    ``received`` is when the loop woke for the source, ``decided`` when the reconciler
    answered; a latency benchmark compares them with its own injection times.
    """

    source: str
    received: float
    decided: float
    changes: int
    actions: tuple[Action, ...]


# --- the loop ----------------------------------------------------------------------------------


class _Timer:
    __slots__ = ("clock", "fire", "next")

    def __init__(
        self,
        next_: Callable[[], float | None],
        fire: Callable[[float], None],
        clock: Callable[[], float],
    ) -> None:
        self.next = next_
        self.fire = fire
        self.clock = clock


class Daemon:
    """``runtime-modules watch``. Create, then ``run()``; or ``start()`` and ``step()`` in a loop.

    Args:
        settings: paths and defaults (registry, state dir, rules when ``rules`` is None).
        rules: rule files or folders; default ``settings.rules``.
        dry_run: everything but nixos-rebuild; decisions are also printed to ``out``.
        netns: the network namespace whose links are watched (None: the daemon's own).
        journal, applier, reconciler, notifier: the parts, for tests; built from settings.
        out: where readable decision lines go (default: stdout with ``dry_run``, else nowhere).
        on_decision: called with the timings of every batch that changed some rule's truth.
        clock: the reconciler's clock (default CLOCK_BOOTTIME).
        stop_timeout: how long SIGTERM lets an apply in flight finish before cancelling it.
        udev_receive_buffer, netlink_receive_buffer: socket buffer sizes (tests shrink them).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        rules: Sequence[Path] | None = None,
        dry_run: bool = False,
        netns: str | None = None,
        journal: Journal | None = None,
        applier: Applier | None = None,
        reconciler: Reconciler | None = None,
        notifier: Any = None,
        out: TextIO | None = None,
        on_decision: Callable[[DecisionTimes], None] | None = None,
        clock: Callable[[], float] = boottime,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        udev_receive_buffer: int | None = None,
        netlink_receive_buffer: int | None = None,
    ) -> None:
        from ._notify import Notifier

        self.settings = settings
        self.rule_paths = tuple(rules) if rules is not None else settings.rules
        self.dry_run = dry_run
        self.netns = netns
        self.journal = journal if journal is not None else Journal.for_level(settings.log_level)
        self._applier = applier
        self._reconciler = reconciler
        self.notifier = notifier if notifier is not None else Notifier()
        self.out = out if out is not None else (sys.stdout if dry_run else None)
        self.on_decision = on_decision
        self.clock = clock
        self.stop_timeout = stop_timeout
        self.udev_receive_buffer = udev_receive_buffer
        self.netlink_receive_buffer = netlink_receive_buffer

        self.selector = selectors.DefaultSelector()
        self.registry: Registry | None = None
        self.pipeline: Pipeline | None = None
        self.applied: frozenset[str] = frozenset()
        self.started = False
        self.stopping = False
        self.stopped = False
        self.stats: collections.Counter[str] = collections.Counter()

        self._listeners: list[Callable[[Notice], None]] = []
        self._timers: list[_Timer] = []
        self._udev: Any = None
        self._netlink: Any = None
        self._needs: Needs | None = None
        self._matches: dict[str, tuple[str, ...]] = {}  # rule -> what made it active last
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._posted: collections.deque[ApplyOutput | ApplyDone] = collections.deque()
        self._flight: tuple[int, threading.Thread, threading.Event] | None = None
        self._stop_deadline: float | None = None
        self._pending_registry: Registry | None = None
        self._watchdog_due: float | None = None
        self._old_signals: dict[int, Any] = {}
        self._old_wakeup_fd: int | None = None
        self.selector.register(self._signal_r, selectors.EVENT_READ, self._on_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_posted)

    # --- the parts ------------------------------------------------------------------------

    @property
    def applier(self) -> Applier:
        if self._applier is None:
            assert self.registry is not None
            self._applier = Applier(
                self.settings, self.registry, journal=self.journal, dry_run=self.dry_run
            )
        return self._applier

    @property
    def reconciler(self) -> Reconciler:
        assert self.pipeline is not None, "start() first"
        return self.pipeline.reconciler

    @property
    def world(self) -> World:
        assert self.pipeline is not None, "start() first"
        return self.pipeline.world

    @property
    def rules(self) -> RuleSet:
        assert self.pipeline is not None, "start() first"
        return self.pipeline.rules

    def subscribe(self, listener: Callable[[Notice], None]) -> Callable[[], None]:
        """Call ``listener`` (in the loop's thread) with every notice; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def add_reader(self, fileobj: Any, callback: Callable[[int], None]) -> None:
        """Watch ``fileobj`` for reading; ``callback(mask)`` runs in the loop when it is ready.

        The control socket registers itself the same way (``ControlServer.register``): every
        key of the selector carries its callback as ``data``.
        """
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fileobj)

    def add_timer(
        self,
        next_wakeup: Callable[[], float | None],
        fire: Callable[[float], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Wake when ``next_wakeup()`` (on ``clock``) comes and call ``fire(now)``.

        For the control server: ``add_timer(server.next_wakeup, server.expire)``.
        """
        self._timers.append(_Timer(next_wakeup, fire, clock))

    def handle_input(self, event: Input) -> list[Action]:
        """Feed one reconciler input now (overrides, pause, reset, rebuild) and act on it."""
        now = self.clock()
        actions = self.reconciler.handle(event, now)
        self._execute(actions, now)
        self._update_status()
        return actions

    def snapshot(self) -> ReconcilerStatus:
        return self.reconciler.snapshot(self.clock())

    # --- start -------------------------------------------------------------------------------

    def _load(self, registry: Registry) -> RuleSet:
        return load_rules(
            self.rule_paths,
            known_modules=frozenset(m.name for m in registry.modules),
            default_settle=self.settings.default_settle,
            default_linger=self.settings.default_linger,
        )

    def start(self) -> None:
        """Coldplug: recover, enumerate, feed the reconciler, READY=1.

        Raises:
            RuntimeModulesError: the registry or the rules are invalid (nothing to keep yet).
        """
        from ._state import load_state

        self.registry = load_registry(self.settings.registry)
        rules = self._load(self.registry)
        if not self.dry_run:
            self.applier.recover()  # a daemon killed mid-apply left it half-done: roll back
        needs = rules.needs()
        world = World()
        self._open_sources(needs, world)
        state = load_state(self.settings, journal=self.journal)
        self.applied = state.applied
        reconciler = self._reconciler if self._reconciler is not None else Reconciler()
        self.pipeline = Pipeline(rules, reconciler, world)
        now = self.clock()
        actions = self.pipeline.coldplug(state.applied, now)
        self._execute(actions, now)
        self._feed_overrides(now)
        if not self.dry_run and self._uncertain(state):
            self._execute(self.reconciler.handle(RebuildRequested(), now), now)
        self.started = True
        if self.notifier.watchdog_interval:
            self._watchdog_due = time.monotonic() + self.notifier.watchdog_interval
        summary = self._status_line()
        self.journal.send(
            JournalEvent.DAEMON_STARTED,
            f"watching {len(world.devices)} devices and {len(world.links)} links with "
            f"{len(rules.rules)} rules" + (" (dry run)" if self.dry_run else ""),
            rules=len(rules.rules),
            devices=len(world.devices),
            links=len(world.links),
            applied=self.applied,
            dry_run=self.dry_run,
        )
        self._echo(
            f"watching {len(world.devices)} devices and {len(world.links)} links with "
            f"{len(rules.rules)} rules from {', '.join(map(str, self.rule_paths))}; "
            f"applied: {', '.join(sorted(self.applied)) or 'base system'}"
            + ("; dry run: nixos-rebuild is never run" if self.dry_run else "")
        )
        self.notifier.ready(summary)

    def _uncertain(self, state: Any) -> bool:
        from ._applier import drift

        why = state.uncertain or drift(self.settings, state)
        if why:
            self.journal.send(
                JournalEvent.APPLY_SCHEDULED,
                f"the applied set is uncertain ({why}): rebuilding the wanted set",
                priority=Priority.WARNING,
            )
        return bool(why)

    def _feed_overrides(self, now: float) -> None:
        """Pins and pause survive a restart: hand the stored ones to the reconciler."""
        from ._overrides import OverrideStore

        assert self.registry is not None
        try:
            store = OverrideStore.from_settings(self.settings, warn=self._warn)
            overrides = store.load(time.time(), known={m.name for m in self.registry.modules})
        except RuntimeModulesError as exc:
            self._warn(f"overrides not loaded: {exc}")
            return
        changed, paused = overrides.reconciler_inputs(wall_now=time.time(), mono_now=now)
        if changed.overrides:
            self._execute(self.reconciler.handle(changed, now), now)
        if paused.paused:
            self._execute(self.reconciler.handle(paused, now), now)

    def _warn(self, message: str) -> None:
        self.journal.send(JournalEvent.STATE_RECOVERED, message, priority=Priority.WARNING)

    def _open_sources(self, needs: Needs, world: World) -> None:
        """Open the monitors the rules need, then enumerate into ``world``.

        Raises:
            PermissionDeniedError, ConfigError: a monitor cannot be opened.
        """
        try:
            self._open_sources_or_fail(needs, world)
        except PermissionError as exc:
            self._close_sources()
            raise PermissionDeniedError(
                f"cannot listen to udev and netlink events ({exc.strerror}); run watch as root"
            ) from None
        except OSError as exc:
            self._close_sources()
            raise ConfigError(
                f"cannot listen to udev and netlink events: {exc}; is this a Linux machine "
                "with udev (/run/udev) and netlink?"
            ) from None

    def _open_sources_or_fail(self, needs: Needs, world: World) -> None:
        from ._netlink_source import NetlinkSource, enumerate_links
        from ._udev_source import UdevSource, enumerate_devices

        self._close_sources()
        self._needs = needs
        if needs.devices:
            import pyudev

            context = pyudev.Context()
            self._udev = UdevSource(context, needs, receive_buffer=self.udev_receive_buffer)
            self.add_reader(self._udev, lambda mask: self._on_source(self._udev, "udev"))
            world.apply(WorldReplaced(devices=tuple(enumerate_devices(context, needs)), links=None))
        else:
            world.apply(WorldReplaced(devices=(), links=None))
        if needs.links:
            kwargs = {}
            if self.netlink_receive_buffer is not None:
                kwargs["receive_buffer"] = self.netlink_receive_buffer
            self._netlink = NetlinkSource(self.netns, **kwargs)
            self.add_reader(self._netlink, lambda mask: self._on_source(self._netlink, "netlink"))
            world.apply(WorldReplaced(devices=None, links=tuple(enumerate_links(self.netns))))
        else:
            world.apply(WorldReplaced(devices=None, links=()))

    def _close_sources(self) -> None:
        for source in (self._udev, self._netlink):
            if source is not None:
                self.remove_reader(source)
                source.close()
        self._udev = self._netlink = None

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; returns the exit code (0)."""
        self.install_signal_handlers()
        try:
            self.start()
            while not self.stopped:
                self.step()
        finally:
            self.close()
        return 0

    def step(self, timeout: float | None = None) -> None:
        """One round: wait for the next event or timer (at most ``timeout`` s), handle it."""
        wait = self.wait_time()
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        for key, mask in self.selector.select(wait):
            key.data(mask)
        self._run_timers()
        if self.started and not self.stopped:
            self._update_status()

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Step until ``done()`` or ``timeout`` seconds passed; returns ``done()``."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return done()
            self.step(left)
        return True

    def wait_time(self) -> float | None:
        """Seconds until the next timer is due (0: now), or None when idle: no timer at all."""
        waits: list[float] = []
        if self.pipeline is not None and not self.stopping:
            wake = self.reconciler.next_wakeup
            if wake is not None:
                waits.append(wake - self.clock())
        if self._watchdog_due is not None:
            waits.append(self._watchdog_due - time.monotonic())
        if self._stop_deadline is not None:
            waits.append(self._stop_deadline - time.monotonic())
        for timer in self._timers:
            due = timer.next()
            if due is not None:
                waits.append(due - timer.clock())
        if not waits:
            return None  # idle: no timer at all
        return max(0.0, min(waits))

    def _run_timers(self) -> None:
        if self.pipeline is not None and not self.stopping:
            wake = self.reconciler.next_wakeup
            if wake is not None:
                now = self.clock()
                if wake <= now:
                    self._execute(self.reconciler.tick(now), now)
        if self._watchdog_due is not None and self._watchdog_due <= time.monotonic():
            self.notifier.watchdog()
            interval = self.notifier.watchdog_interval
            self._watchdog_due = time.monotonic() + interval if interval else None
        if self._stop_deadline is not None and self._stop_deadline <= time.monotonic():
            self._stop_deadline = None
            if self._flight is not None:
                apply_id, _, cancel = self._flight
                self.journal.send(
                    JournalEvent.DAEMON_STOPPING,
                    f"apply #{apply_id} did not finish within {self.stop_timeout:g}s of the stop "
                    "request: cancelling it (the previous system is restored)",
                    priority=Priority.WARNING,
                )
                cancel.set()
        for timer in self._timers:
            due = timer.next()
            if due is not None:
                now = timer.clock()
                if due <= now:
                    timer.fire(now)

    # --- sources -----------------------------------------------------------------------------

    def _on_source(self, source: Any, name: str) -> None:
        received = time.monotonic()
        if source is None or self.pipeline is None:
            return
        try:
            changes = source.read()
        except (ValueError, TypeError, KeyError, UnicodeError):
            # A message we could not translate (a kernel newer than our parser): what it said
            # is lost, so re-enumerate, as after an overrun, rather than die or drift.
            log.exception("%s: an event could not be read; re-enumerating", name)
            changes = [source.resync()]
        if not changes:
            return
        self.stats[f"{name}_changes"] += len(changes)
        self.stats["batches"] += 1
        for change in changes:
            if isinstance(change, WorldReplaced):
                self.stats["resyncs"] += 1
                self.journal.send(
                    JournalEvent.WORLD_RESYNCED,
                    f"{name} events were lost (overrun or monitor error): re-enumerated",
                    priority=Priority.WARNING,
                    source=name,
                )
        if self.journal.enabled_for(Priority.DEBUG):
            for change in changes:
                self.journal.send(JournalEvent.EVENT_RECEIVED, f"{name}: {change}", source=name)
        if self._listeners:
            self._notify(WorldChanged(name, tuple(changes)))
        now = self.clock()
        actions = self.pipeline.feed(changes, now)
        if actions is None:
            return
        if self.on_decision is not None:
            self.on_decision(
                DecisionTimes(name, received, time.monotonic(), len(changes), tuple(actions))
            )
        self._execute(actions, now)

    # --- actions -----------------------------------------------------------------------------

    def _execute(self, actions: Iterable[Action], now: float) -> None:
        for action in actions:
            matches: tuple[str, ...] = ()
            if isinstance(action, RuleActivated):
                self._matches[action.rule] = action.matches
            elif isinstance(action, RuleSettling) and self.pipeline is not None:
                matches = self.pipeline.matches(action.rule)
            elif isinstance(action, RuleLingering | RuleDeactivated):
                matches = self._matches.get(action.rule, ())
            text = describe(
                action, now, matches=matches, applied=self.applied, dry_run=self.dry_run
            )
            self._journal_action(action, text, now, matches)
            self._echo(text)
            if self._listeners:
                self._notify(ActionTaken(action, now, text))
            if isinstance(action, StartApply):
                self._start_apply(action)
            elif isinstance(action, RuleDeactivated):
                self._matches.pop(action.rule, None)

    def _journal_action(
        self, action: Action, text: str, now: float, matches: tuple[str, ...]
    ) -> None:
        send = self.journal.send
        match action:
            case RuleActivated(rule=rule, matches=found):
                send(JournalEvent.RULE_ACTIVATED, text, rule=rule, matches=found,
                     modules=self._modules_of(rule))  # fmt: skip
            case RuleLingering(rule=rule, until=until):
                send(JournalEvent.RULE_LINGERING, text, rule=rule, matches=matches,
                     linger_left_s=round(until - now, 3))  # fmt: skip
            case RuleDeactivated(rule=rule):
                send(JournalEvent.RULE_DEACTIVATED, text, rule=rule, matches=matches)
            case ApplyScheduled(target=target, at=at):
                send(JournalEvent.APPLY_SCHEDULED, text, target=target, applied=self.applied,
                     in_s=round(at - now, 3))  # fmt: skip
            case ApplyGivenUp(target=target, failures=failures):
                send(JournalEvent.APPLY_FAILED, text, target=target, failures=failures)
            case OverrideExpired(module=module):
                send(JournalEvent.OVERRIDE_EXPIRED, text, module=module)
                self._drop_expired()
            case RuleSettling() | RuleSettleCancelled() | ApplyCancelled():
                if self.journal.enabled_for(Priority.DEBUG):
                    send(JournalEvent.EVENT_RECEIVED, text, priority=Priority.DEBUG)
            case StartApply():
                pass  # the applier journals APPLY_STARTED and the end, with its own apply id

    def _drop_expired(self) -> None:
        """The reconciler let an override go at its time: remove it from the store too."""
        from ._overrides import OverrideStore

        try:
            OverrideStore.from_settings(self.settings, warn=self._warn).expire(time.time())
        except RuntimeModulesError as exc:
            self._warn(f"expired override not removed from the store: {exc}")

    def _modules_of(self, rule: str) -> tuple[str, ...]:
        if self.pipeline is None:
            return ()
        try:
            return self.pipeline.rules.rule(rule).modules
        except KeyError:
            return ()

    def _echo(self, text: str) -> None:
        if self.out is None:
            return
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        try:
            self.out.write(f"{stamp}  {text}\n")
            self.out.flush()
        except (OSError, ValueError):  # stdout closed (a pipe whose reader left): stop echoing
            self.out = None

    def _notify(self, notice: Notice) -> None:
        for listener in list(self._listeners):
            try:
                listener(notice)
            except Exception:  # a listener's bug must not stop the loop
                log.exception("listener %r failed on %r", listener, notice)

    # --- applies -----------------------------------------------------------------------------

    def _start_apply(self, action: StartApply) -> None:
        if self._flight is not None:  # the reconciler never does this; say so if it ever did
            raise RuntimeError(f"apply #{action.apply_id} started while #{self._flight[0]} runs")
        cancel = threading.Event()
        reason = _reason(action.reasons)
        applier = self.applier

        def work() -> None:
            outcome: ApplyOutcome | None = None
            try:
                outcome = applier.apply(
                    action.target,
                    reason=reason,
                    force=action.force,
                    wait=True,
                    on_output=lambda line: self._post(ApplyOutput(action.apply_id, line)),
                    cancel=cancel,
                )
                done = ApplyDone(
                    action.apply_id, outcome.ok, outcome.after, outcome.message, outcome
                )
            except RuntimeModulesError as exc:
                done = ApplyDone(action.apply_id, False, self._applied_now(), str(exc), None)
            except Exception as exc:  # never lose the loop's apply slot to a bug
                log.exception("apply #%d crashed", action.apply_id)
                done = ApplyDone(
                    action.apply_id, False, self._applied_now(), f"internal error: {exc}", None
                )
            self._post(done)

        thread = threading.Thread(target=work, name=f"apply-{action.apply_id}", daemon=True)
        self._flight = (action.apply_id, thread, cancel)
        thread.start()

    def _applied_now(self) -> frozenset[str]:
        from ._state import load_state

        try:
            return load_state(self.settings).applied
        except RuntimeModulesError:
            return self.applied

    def _post(self, item: ApplyOutput | ApplyDone) -> None:
        """From the worker thread: queue ``item`` and wake the loop."""
        self._posted.append(item)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the loop will drain the queue
        except OSError as exc:  # closed at shutdown
            if exc.errno != errno.EBADF:
                raise

    def _on_posted(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while self._posted:
            item = self._posted.popleft()
            if isinstance(item, ApplyOutput):
                self._notify(item)
            else:
                self._finish_apply(item)

    def _finish_apply(self, done: ApplyDone) -> None:
        assert self._flight is not None and self._flight[0] == done.apply_id
        self._flight[1].join()
        self._flight = None
        self.applied = done.applied
        self.stats["applies"] += 1
        if not done.ok:
            self.stats["failed_applies"] += 1
            self._echo(f"apply #{done.apply_id} failed: {done.message}")
        elif not self.dry_run:
            self._echo(f"apply #{done.apply_id} done: {done.message}")
        self._notify(done)
        if self._pending_registry is not None:
            self.applier.registry = self._pending_registry
            self._pending_registry = None
        if self.stopping:
            self.stopped = True  # no follow-up apply: we are on our way out
            return
        now = self.clock()
        finished = ApplyFinished(
            apply_id=done.apply_id, ok=done.ok, applied=done.applied, message=done.message
        )
        self._execute(self.reconciler.handle(finished, now), now)

    # --- signals -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Deliver SIGHUP/SIGTERM/SIGINT to the loop (main thread only)."""
        self._old_wakeup_fd = signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for signum in _SIGNALS:
            # The handler does nothing: the C-level handler already wrote the number to the pipe.
            self._old_signals[signum] = signal.signal(signum, _ignore)

    def signal(self, signum: int) -> None:
        """Deliver ``signum`` as if it had arrived (for in-process tests)."""
        os.write(self._signal_w, bytes([signum]))

    def _on_signal(self, mask: int) -> None:
        try:
            data = os.read(self._signal_r, 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGHUP:
                self.reload()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop()

    def reload(self) -> bool:
        """SIGHUP: new registry and rules, or the last good ones kept; True when reloaded."""
        if self.pipeline is None:
            return False
        try:
            registry = load_registry(self.settings.registry)
            rules = self._load(registry)
        except RuntimeModulesError as exc:
            problems = exc.problems if isinstance(exc, RuleError) else []
            self.journal.send(
                JournalEvent.RULES_REJECTED,
                f"new rules rejected, keeping the {len(self.rules.rules)} loaded ones: {exc}",
                errors=len(problems) or 1,
                details=str(exc),
            )
            self._echo(f"rules rejected, the loaded ones stay: {exc}")
            return False
        self.registry = registry
        if self._flight is None:
            if self._applier is not None:
                self._applier.registry = registry
        else:
            self._pending_registry = registry
        now = self.clock()
        needs = rules.needs()
        if needs != self._needs:
            fresh = World()
            self._open_sources(needs, fresh)
            self.pipeline.world.apply(
                WorldReplaced(tuple(fresh.devices.values()), tuple(fresh.links.values()))
            )
        actions = self.pipeline.reload(rules, now)
        self.journal.send(
            JournalEvent.RULES_RELOADED,
            f"rules reloaded: {len(rules.rules)} rules from {len(rules.sources)} files",
            rules=len(rules.rules),
        )
        self._echo(f"rules reloaded: {len(rules.rules)} rules")
        self._execute(actions, now)
        return True

    def stop(self) -> None:
        """SIGTERM: stop listening; let an apply in flight finish or cancel it; then exit."""
        if self.stopping:
            if self._flight is not None:
                self._flight[2].set()  # a second SIGTERM: cancel now
            return
        self.stopping = True
        self._close_sources()
        if self._flight is None:
            status = "stopping"
            self.stopped = True
        else:
            status = (
                f"stopping: waiting for apply #{self._flight[0]} (at most {self.stop_timeout:g}s)"
            )
            self._stop_deadline = time.monotonic() + self.stop_timeout
        self.notifier.stopping(status)
        self.journal.send(JournalEvent.DAEMON_STOPPING, status)
        self._echo(status)

    # --- status and teardown -----------------------------------------------------------------

    def _status_line(self) -> str:
        line = self.snapshot().summary()
        return f"dry run; {line}" if self.dry_run else line

    def _update_status(self) -> None:
        if self.notifier.enabled:
            self.notifier.status(self._status_line())

    def close(self) -> None:
        """Release everything (sockets, pipes, signal handlers). Waits for an apply in flight."""
        if self._flight is not None:
            self._flight[2].set()
            self._flight[1].join()
        self._close_sources()
        for signum, handler in self._old_signals.items():
            signal.signal(signum, handler)
        self._old_signals.clear()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None
        self.selector.close()
        for fd in (self._signal_r, self._signal_w, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.notifier.close()


def _ignore(signum: int, frame: object) -> None:
    pass


def _reason(reasons: Any) -> str:
    """Why an apply runs, in one line for the journal and the state file."""
    parts = []
    for module in sorted(reasons):
        r: Reason = reasons[module]
        why = r.kind.value
        if r.rules:
            why += " " + ",".join(r.rules)
        parts.append(f"{module} {'on' if r.wanted else 'off'} ({why})")
    return "; ".join(parts) or "rebuild"
