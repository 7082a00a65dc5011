"""The daemon: one event loop around the pure pipeline (the imperative shell).

Everything that decides lives in ``_pipeline.Pipeline`` (world → evaluator → reconciler) and
``_reconciler``; this module only does the I/O around it, on one thread with one ``selectors``
loop:

    udev monitor fd ─┐                           ┌─> journal (MESSAGE_IDs), stdout (--dry-run)
    netlink fd ──────┤                           ├─> sd_notify STATUS= / WATCHDOG=1
    signal pipe ─────┼─> Pipeline / Reconciler ──┼─> apply worker thread (_apply_worker)
    apply pipe ──────┤   (time: CLOCK_BOOTTIME)  └─> listeners (control socket, benchmarks)
    control socket ──┘   (_control_handler: pins, requests, status, events)

The selector's timeout is the reconciler's ``next_wakeup`` (and the other timers registered
with ``add_timer``): when nothing is pending the loop blocks with no timeout at all, so an idle
daemon makes no syscall. The watchdog, when systemd asks for one, is the only periodic timer.

Start (coldplug): the control socket is opened first, before anything is read, so that a CLI
started meanwhile queues its request for this daemon instead of applying behind its back. Then
the monitors are opened, then the machine enumerated, so nothing that happens during the
enumeration is lost (what the monitors queued meanwhile is applied after it: changes are
idempotent). The stored pins and pause, the state file's applied set, the rules and their truth
go to the reconciler, and READY=1. A killed daemon's half-done apply is rolled back before (the
applier's ``recover``).

Signals arrive through ``signal.set_wakeup_fd`` as bytes on the signal pipe: SIGHUP reloads the
registry and rules (an invalid set is rejected and the last good one kept), SIGTERM and SIGINT
stop: the sources are closed, an apply in flight may finish for ``stop_timeout`` seconds and is
then cancelled (the applier rolls it back), STOPPING=1, exit 0.

``step`` runs one round of the loop, so tests and benchmarks drive the daemon in-process;
``subscribe`` gives them (and the control socket) every action, output line and apply result;
``on_decision`` gives a benchmark the receive and decision times of each batch.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ._applier import Applier
from ._apply_worker import ApplyWorker
from ._clocks import boottime
from ._daemon_events import (
    ActionTaken,
    ApplyDone,
    ApplyOutput,
    DecisionTimes,
    Notice,
    WorldChanged,
)
from ._daemon_sources import Sources
from ._decision_log import DecisionLog
from ._errors import RuleError, RuntimeModulesError
from ._journal import Journal, JournalEvent, Priority
from ._pipeline import Pipeline
from ._reconciler import Reconciler
from ._reconciler_events import (
    Action,
    AppliedKnown,
    ApplyFinished,
    Input,
    Reason,
    RebuildRequested,
    ReconcilerStatus,
    StartApply,
)
from ._registry import Registry, load_registry
from ._rules import RuleSet, load_rules
from ._settings import Settings
from ._system_watch import SystemSwitchWatch
from ._world import World, WorldReplaced

if TYPE_CHECKING:
    from ._control_handler import ControlHandler
    from ._state import State

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

# SIGTERM while an apply runs: let it finish for this long, then cancel it (a build is killed at
# once and the system left untouched; an activation is never killed and is waited for, with its
# rollback if it fails). The units set TimeoutStopSec long enough for that.
DEFAULT_STOP_TIMEOUT = 30.0
_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


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
        wall: the wall clock, for pins that end at a moment (tests move it).
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
        wall: Callable[[], float] = time.time,
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
        self.on_decision = on_decision
        self.clock = clock
        self.wall = wall
        self.stop_timeout = stop_timeout
        self.log = DecisionLog(
            self.journal,
            out if out is not None else (sys.stdout if dry_run else None),
            dry_run=dry_run,
            holding=lambda rule: self.pipeline.matches(rule) if self.pipeline else (),
            modules_of=self._modules_of,
        )
        self.sources = Sources(
            add_reader=self.add_reader,
            remove_reader=self.remove_reader,
            on_ready=self._on_source,
            netns=netns,
            udev_receive_buffer=udev_receive_buffer,
            netlink_receive_buffer=netlink_receive_buffer,
        )

        self.selector = selectors.DefaultSelector()
        self.registry: Registry | None = None
        self.pipeline: Pipeline | None = None
        self.control: ControlHandler | None = None
        self.applied: frozenset[str] = frozenset()
        self.started = False
        self.started_at: float | None = None  # wall clock, for `status`
        # (wall clock, first problem) of the last rejected reload, until one works: `status`.
        self.rejected: tuple[float, str] | None = None
        self.stopping = False
        self.stopped = False
        self.stats: collections.Counter[str] = collections.Counter()

        self._listeners: list[Callable[[Notice], None]] = []
        self._timers: list[_Timer] = []
        # A source whose re-enumeration failed retries it when due (level-triggered).
        self.add_timer(self.sources.resync_due, self.sources.retry_resyncs)
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._worker = ApplyWorker(self._notify, self._finish_apply, self._applied_now)
        self._stop_deadline: float | None = None
        self._pending_registry: Registry | None = None
        self._watchdog_due: float | None = None
        self._switch_watch: SystemSwitchWatch | None = None
        self._switched_while_applying = False  # the watch fired during our apply: look again
        self._old_signals: dict[int, Any] = {}
        self._old_wakeup_fd: int | None = None
        self._closed = False
        self.selector.register(self._signal_r, selectors.EVENT_READ, self._on_signal)
        self.selector.register(self._worker.fileno(), selectors.EVENT_READ, self._worker.on_ready)

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

    @property
    def applying(self) -> int | None:
        """The apply running now (the reconciler's id), or None."""
        return self._worker.apply_id

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
        """Coldplug: listen, recover, enumerate, feed the reconciler, READY=1.

        Raises:
            RuntimeModulesError: the registry or the rules are invalid (nothing to keep yet), or
                another daemon listens on the control socket.
        """
        from ._control_handler import ControlHandler
        from ._state import load_state

        self.registry = load_registry(self.settings.registry)
        rules = self._load(self.registry)
        self.started_at = self.wall()
        self.control = ControlHandler(self, wall=self.wall)
        self.control.open()  # first: a CLI started from now on talks to us (see the docstring)
        if not self.dry_run:
            self.applier.recover()  # a daemon killed mid-apply left it half-done: roll back
        needs = rules.needs()
        world = World()
        self.sources.open(needs, world)
        self._warn_if_udevd_missing()
        state = load_state(self.settings, journal=self.journal)
        self.applied = state.applied
        reconciler = (
            self._reconciler
            if self._reconciler is not None
            else Reconciler(first_apply_id=self._last_apply_id() + 1)
        )
        self.pipeline = Pipeline(rules, reconciler, world)
        now = self.clock()
        # Pins and pause before the world: nothing is decided before the first truth, so a
        # pinned module is not first scheduled and then cancelled.
        for event in self.control.stored_inputs(state.applied):
            self._execute(reconciler.handle(event, now), now)
        self._execute(self.pipeline.coldplug(state.applied, now), now)
        if not self.dry_run and self._uncertain(state, "rebuilding the wanted set"):
            self._execute(self.reconciler.handle(RebuildRequested(), now), now)
        if not self.dry_run:
            self._switch_watch = SystemSwitchWatch.open(
                self.settings.current_system, self._system_switched
            )
            if self._switch_watch is not None:
                self.add_reader(self._switch_watch, self._switch_watch.on_ready)
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
        self.log.echo(
            f"watching {len(world.devices)} devices and {len(world.links)} links with "
            f"{len(rules.rules)} rules from {', '.join(map(str, self.rule_paths))}; "
            f"applied: {', '.join(sorted(self.applied)) or 'base system'}"
            + ("; dry run: nixos-rebuild is never run" if self.dry_run else "")
        )
        self.notifier.ready(summary)
        _release_startup_memory()

    def _uncertain(self, state: State, then: str) -> bool:
        """Whether what is applied is unknown (an uncertain state, or a system switched by
        hand); if so, ``SYSTEM_DRIFTED`` says why and what the daemon does (``then``)."""
        from ._applier import current_system, drift

        why = state.uncertain or drift(self.settings, state)
        if why:
            self.journal.send(
                JournalEvent.SYSTEM_DRIFTED,
                f"the applied set is uncertain ({why}): {then}",
                problem=why,
                applied=state.applied,
                system=current_system(self.settings),
            )
        return bool(why)

    def _system_switched(self) -> None:
        """The running system was replaced. Our own activation does that (no drift: the state
        names the new system once the apply ends); a switch from outside (a `nixos-rebuild
        switch` of the base) leaves what is applied unknown: level-triggered, treat it as the
        base system, so the wanted set is applied again on top of the new base. A switch while
        our apply runs is looked at when it ends (``_finish_apply``): it may have come after
        our activation."""
        from ._state import load_state

        if self.stopping:
            return
        if self.applying is not None:
            self._switched_while_applying = True
            return
        state = load_state(self.settings, journal=self.journal)
        then = "taking the base system as applied, the wanted set is applied again on top of it"
        if not self._uncertain(state, then):
            return
        now = self.clock()
        self.applied = frozenset()
        self._execute(self.reconciler.handle(AppliedKnown(applied=frozenset()), now), now)

    def _warn_if_udevd_missing(self) -> None:
        """Device rules with no udevd: the devices found now count, but no event will come."""
        if not self.sources.udevd_missing:
            return
        from ._udev_source import UDEVD_CONTROL  # loaded already: device rules opened udev

        control = self.sources.udevd_control or UDEVD_CONTROL
        message = (
            f"systemd-udevd is not running (nothing listens on {control}): device rules see "
            "the devices found at start but no device event until it runs; start "
            "systemd-udevd, then reload (SIGHUP) or restart runtime-modules"
        )
        self.journal.send(JournalEvent.UDEVD_NOT_RUNNING, message, control=control)
        self.log.echo(f"warning: {message}")

    def warn(self, message: str) -> None:
        """A problem the daemon works around (a bad overrides file): journaled as a warning."""
        self.journal.send(JournalEvent.STATE_RECOVERED, message, priority=Priority.WARNING)

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
        if self.started:
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
            if self._worker.apply_id is not None:
                self.journal.send(
                    JournalEvent.DAEMON_STOPPING,
                    f"apply #{self._worker.apply_id} did not finish within "
                    f"{self.stop_timeout:g}s of the stop request: cancelling it (the previous "
                    "system is restored)",
                    priority=Priority.WARNING,
                )
                self._worker.cancel()
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
            changes = source.try_resync()
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
            self._notify(WorldChanged(name, tuple(changes)))  # before the world moves
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
            text = self.log.record(action, now, self.applied)
            if isinstance(action, StartApply):
                # Started before the listeners hear of it, so that they see it running.
                self._worker.start(self.applier, action, _reason(action.reasons))
                self._save_apply_id(action.apply_id)
            if self._listeners:
                self._notify(ActionTaken(action, now, text))

    # The daemon's apply numbers ("apply #7") go on across restarts, so that journal entries and
    # what users quote stay unique: the last one is kept beside the state file (a few bytes
    # per apply; the state file itself belongs to the applier and names applies by time).
    def _apply_id_file(self) -> Path:
        return self.settings.state_dir / "daemon-apply-id"

    def _last_apply_id(self) -> int:
        try:
            return max(0, int(self._apply_id_file().read_text().strip()))
        except (OSError, ValueError):
            return 0  # none yet, or unreadable: numbering starts again, nothing worse

    def _save_apply_id(self, apply_id: int) -> None:
        path = self._apply_id_file()
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(f"{apply_id}\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("apply id not saved (%s): numbering restarts with the daemon", exc)

    def _modules_of(self, rule: str) -> tuple[str, ...]:
        if self.pipeline is None:
            return ()
        try:
            return self.pipeline.rules.rule(rule).modules
        except KeyError:
            return ()

    def _notify(self, notice: Notice) -> None:
        for listener in list(self._listeners):
            try:
                listener(notice)
            except Exception:  # a listener's bug must not stop the loop
                log.exception("listener %r failed on %r", listener, notice)

    # --- applies -----------------------------------------------------------------------------

    def _applied_now(self) -> frozenset[str]:
        from ._state import load_state

        try:
            return load_state(self.settings).applied
        except RuntimeModulesError:
            return self.applied

    def _finish_apply(self, done: ApplyDone) -> None:
        self.applied = done.applied
        self.stats["applies"] += 1
        if not done.ok:
            self.stats["failed_applies"] += 1
            self.log.echo(f"apply #{done.apply_id} failed: {done.message}")
        elif not self.dry_run:
            self.log.echo(f"apply #{done.apply_id} done: {done.message}")
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
        if self._switched_while_applying:
            # The running system was replaced during the apply: ours, or someone's after it.
            # Now the state names what our apply left, so a drift is known for what it is (a
            # follow-up that started meanwhile defers this to its own end).
            self._switched_while_applying = False
            self._system_switched()

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
        """SIGHUP: new registry and rules, or the last good ones kept; True when reloaded.

        Ignored while stopping (the sources are closed; nothing would use new rules).
        """
        if self.pipeline is None or self.stopping:
            return False
        fresh: World | None = None
        try:
            registry = load_registry(self.settings.registry)
            rules = self._load(registry)
            needs = rules.needs()
            if needs != self.sources.needs:
                # New monitors beside the old ones, swapped in only when they work: a failure
                # here keeps the old rules *and* the old monitors (the daemon is never deaf).
                fresh = World()
                self.sources.open(needs, fresh)
                self._warn_if_udevd_missing()
        except RuntimeModulesError as exc:
            self._reject(exc)
            return False
        self.registry = registry
        if self._worker.apply_id is None:
            if self._applier is not None:
                self._applier.registry = registry
        else:
            self._pending_registry = registry
        now = self.clock()
        if fresh is not None:
            self.pipeline.world.apply(
                WorldReplaced(tuple(fresh.devices.values()), tuple(fresh.links.values()))
            )
        actions = self.pipeline.reload(rules, now)
        if self.control is not None:
            # The pins again, against the new registry: one on a module it dropped would make
            # every apply fail; a stored one on a module it added now counts. After the rules,
            # so that the (urgent) pin change is decided with them.
            for event in self.control.reload_pins():
                actions = [*actions, *self.reconciler.handle(event, now)]
        self.rejected = None
        self.journal.send(
            JournalEvent.RULES_RELOADED,
            f"rules reloaded: {len(rules.rules)} rules from {len(rules.sources)} files",
            rules=len(rules.rules),
        )
        self.log.echo(f"rules reloaded: {len(rules.rules)} rules")
        self._execute(actions, now)
        return True

    def _reject(self, exc: RuntimeModulesError) -> None:
        problems = exc.problems if isinstance(exc, RuleError) else []
        first = str(problems[0]) if problems else str(exc)
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        # Kept for `status` until a reload works: the files on disk are not what runs.
        self.rejected = (self.wall(), first + more)
        self.journal.send(
            JournalEvent.RULES_REJECTED,
            f"new rules rejected, keeping the {len(self.rules.rules)} loaded ones: {exc}",
            errors=len(problems) or 1,
            details=str(exc),
        )
        self.log.echo(f"rules rejected, the loaded ones stay: {exc}")

    def stop(self) -> None:
        """SIGTERM: stop listening; let an apply in flight finish or cancel it; then exit."""
        if self.stopping:
            self._worker.cancel()  # a second SIGTERM: cancel now
            return
        self.stopping = True
        self.sources.close()
        apply_id = self._worker.apply_id
        if apply_id is None:
            status = "stopping"
            self.stopped = True
        else:
            status = f"stopping: waiting for apply #{apply_id} (at most {self.stop_timeout:g}s)"
            self._stop_deadline = time.monotonic() + self.stop_timeout
        self.notifier.stopping(status)
        self.journal.send(JournalEvent.DAEMON_STOPPING, status)
        self.log.echo(status)

    # --- status and teardown -----------------------------------------------------------------

    def _status_line(self) -> str:
        line = self.snapshot().summary()
        return f"dry run; {line}" if self.dry_run else line

    def _update_status(self) -> None:
        # While stopping, STATUS keeps the stop message (what systemctl status should show).
        if self.notifier.enabled and self.pipeline is not None and not self.stopping:
            self.notifier.status(self._status_line())

    def close(self) -> None:
        """Release everything (sockets, pipes, signal handlers). Waits for an apply in flight.

        Call it from the loop's thread; a second call does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._worker.close()
        if self.control is not None:
            self.control.close()
        self.sources.close()
        if self._switch_watch is not None:
            self.remove_reader(self._switch_watch)
            self._switch_watch.close()
        for signum, handler in self._old_signals.items():
            signal.signal(signum, handler)
        self._old_signals.clear()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None
        self.selector.close()
        for fd in (self._signal_r, self._signal_w):
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


def _release_startup_memory() -> None:
    """Give back what loading and coldplug left free: the daemon then idles for days.

    Coldplug builds and drops many short-lived objects (every device udev knows, the rule
    models); glibc keeps the freed heap until told, so it would count as resident forever.
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)
