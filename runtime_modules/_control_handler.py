"""The daemon's side of the control socket: pins, requests, progress, status and events.

``ControlHandler`` lives in the daemon's loop (one thread; ``_control_protocol`` has the messages,
``_control_server`` the non-blocking server). It owns the override store while the daemon runs:

- at start it hands the stored pins and pause to the reconciler (``stored_inputs``), before the
  first truth of the world, so nothing is scheduled and then cancelled;
- a change (``enable``, ``disable``, ``auto``, ``reset``, ``pause``, ``resume``, ``rebuild``) is
  written to the store first, then fed to the reconciler, which decides when to apply;
- pins end on time with nothing polling: the reconciler's one timer expires them
  (``OverrideExpired``) and the handler removes them from the store; a runtime pin that hides a
  persistent one is ended by a timer of the handler's instead, which then feeds the persistent
  pin (``Overrides.next_reveal``), so that the module goes where the user said, in one apply;
- when the wall clock is set (``_clocks.WallClockWatch``) the pins are converted onto the
  daemon's clock again.

Answering a change: the request's ``reply`` waits for the apply that carries the change. The
reconciler coalesces: an apply that starts at once carries it; while another runs, the change
goes into the follow-up, and the caller is answered when *that* apply ends; when the apply in
flight already goes where the change wants, its end answers. A change that needs no apply is
answered at once (``done``, result ``unchanged``). Meanwhile the caller gets ``progress``: the
output lines of the apply that carries its change, and, whenever it got nothing else for a few
seconds, a heartbeat with the running apply's id and elapsed time (a caller queued behind
another apply gets those too, so that it never waits in silence).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ._clocks import WallClockWatch
from ._control_events import events_of
from ._control_protocol import (
    EXIT_CODES,
    Accepted,
    AutoRequest,
    DisableRequest,
    Done,
    EnableRequest,
    EventMessage,
    Ok,
    PauseRequest,
    Progress,
    RebuildRequest,
    Request,
    ResetRequest,
    ResumeRequest,
    StatusRequest,
    StatusResponse,
)
from ._control_server import ControlServer, Reply
from ._daemon_events import ActionTaken, ApplyDone, ApplyOutput, Notice
from ._errors import ConfigError, ControlError, ExitCode, RuntimeModulesError, UnknownModuleError
from ._journal import JournalEvent
from ._overrides import Overrides, OverrideState, OverrideStore, check_until
from ._reconciler_events import (
    ApplyCancelled,
    ApplyGivenUp,
    Input,
    OverrideExpired,
    OverridesChanged,
    Paused,
    RebuildRequested,
    ReconcilerStatus,
    ResetRequested,
    StartApply,
)
from ._registry import unknown_module_message
from ._state import load_state
from ._status import DaemonView, local_time, status_json

if TYPE_CHECKING:
    from ._daemon import Daemon

__all__ = ["HEARTBEAT", "ControlHandler"]

log = logging.getLogger("runtime_modules.control")

# A waiting CLI shows the elapsed time at least this often, even while nixos-rebuild is silent
# (evaluating a big configuration prints nothing for tens of seconds).
HEARTBEAT = 5.0
# A Progress line carries at most this much output, well under the protocol's 1 MiB per line.
PROGRESS_BYTES = 256 * 1024
# A wall clock that moved this far against the daemon's clock was set; pins are converted again.
CLOCK_JUMP = 1.0


@dataclass(eq=False)
class _Waiter:
    """A caller waiting for its change to be applied."""

    reply: Reply
    apply_id: int | None = None  # the apply that carries the change, once known
    accepted: bool = False  # the `accepted` answer went out
    sent: float = field(default_factory=time.monotonic)  # when it was sent something last


@dataclass
class _Running:
    """The apply in flight, as far as waiting callers are concerned."""

    apply_id: int
    started: float  # time.monotonic()
    text: str  # what it does, in one line ("apply #3 starts: {gaming} (+gaming)")
    lines: list[str] = field(default_factory=list)  # output not yet sent

    def elapsed(self, now: float) -> float:
        return round(now - self.started, 3)


class ControlHandler:
    """Implements ``_control.Handler`` for ``daemon``; see the module docstring.

    Args:
        daemon: the daemon whose loop, reconciler and registry it uses.
        wall: the wall clock (tests may move it).
        heartbeat: seconds between progress messages of a silent apply.
    """

    def __init__(
        self,
        daemon: Daemon,
        *,
        wall: Callable[[], float] = time.time,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        settings = daemon.settings
        self.daemon = daemon
        self.wall = wall
        self.heartbeat = heartbeat
        self.store = OverrideStore.from_settings(settings, warn=daemon.warn)
        self.view = Overrides()  # what the reconciler was given last
        self.server = ControlServer(
            settings.control_socket, self, group=settings.control_group, clock=daemon.clock
        )
        self._waiters: list[_Waiter] = []
        self._running: _Running | None = None
        self._ended: list[tuple[list[_Waiter], ApplyDone]] = []  # answered after the reconciler
        self._settle = False  # waiters without an apply may have been left with nothing to wait
        self._revealed: list[str] = []  # runtime pins over persistent ones that `_expired` ended
        self._offset = 0.0  # wall - daemon clock when the pins were converted
        self._clock_watch: WallClockWatch | None = None

    # --- life --------------------------------------------------------------------------------

    def open(self) -> None:
        """Listen, and join the daemon's loop.

        Raises:
            ControlError: another daemon listens on the socket, or it cannot be made.
        """
        daemon = self.daemon
        self.server.open()
        self.server.register(daemon.selector)
        daemon.add_timer(self.server.next_wakeup, self.server.expire, clock=daemon.clock)
        daemon.add_timer(self._next_reveal, self._reveal, clock=daemon.clock)
        daemon.add_timer(self._next_housekeeping, self._housekeeping)
        daemon.subscribe(self._on_notice)
        self._clock_watch = WallClockWatch.open(self._clock_set)
        if self._clock_watch is not None:
            daemon.add_reader(self._clock_watch, self._clock_watch.on_ready)

    def close(self) -> None:
        """Tell callers still waiting that their change was not applied, stop listening."""
        for waiter in self._waiters:
            with contextlib.suppress(RuntimeError):  # called from another thread: just close
                waiter.reply.fail(
                    ControlError(
                        "the daemon stopped before applying this change; it is recorded and "
                        "applied when the daemon starts again (see `runtime-modules status`)"
                    )
                )
        self._waiters.clear()
        self.server.close()
        if self._clock_watch is not None:
            self.daemon.remove_reader(self._clock_watch)
            self._clock_watch.close()
            self._clock_watch = None

    def stored_inputs(self, applied: frozenset[str]) -> list[Input]:
        """The stored pins and pause, as inputs for a reconciler that is about to start.

        A pause stored without its kept set (written by hand or by an older version) keeps
        ``applied``, as a pause from the CLI without a daemon does.
        """
        assert self.daemon.registry is not None
        try:
            view = self.store.load(self.wall(), known=self.daemon.registry.names)
        except RuntimeModulesError as exc:
            self.daemon.warn(f"overrides not loaded: {exc}")
            return []
        if view.paused and view.paused_modules is None:
            view = replace(view, paused_modules=applied)
        self.view = view
        changed, paused = self._inputs(view)
        inputs: list[Input] = [changed] if changed.overrides else []
        return [*inputs, paused] if paused.paused else inputs

    def reload_pins(self) -> list[Input]:
        """After a registry reload: the stored pins again, filtered by the new registry."""
        assert self.daemon.registry is not None
        try:
            view = self.store.load(self.wall(), known=self.daemon.registry.names)
        except RuntimeModulesError as exc:
            self.daemon.warn(f"overrides not reloaded: {exc}")
            view = self.view
        if view.paused and view.paused_modules is None:
            view = replace(view, paused_modules=self.view.paused_modules)
        self.view = view
        changed, _ = self._inputs(view)
        return [changed]

    def _inputs(self, view: Overrides) -> tuple[OverridesChanged, Paused]:
        wall, mono = self.wall(), self.daemon.clock()
        self._offset = wall - mono
        assert self.daemon.registry is not None
        known = self.daemon.registry.names
        if view.pins.keys() - known:  # a pin on a module the registry no longer lists: ignored
            view = replace(view, pins={m: p for m, p in view.pins.items() if m in known})
        return view.reconciler_inputs(wall_now=wall, mono_now=mono)

    def _feed_pins(self, view: Overrides) -> None:
        self.view = view
        changed, _ = self._inputs(view)
        self.daemon.handle_input(changed)

    # --- requests ----------------------------------------------------------------------------

    def handle(self, request: Request, reply: Reply) -> None:
        self._check_clock()
        if isinstance(request, StatusRequest):
            reply.send(StatusResponse(status=self.status(request.modules)))
            return
        if self.daemon.stopping:
            raise ControlError(
                "the daemon is stopping and takes no changes; run the command again once it is "
                "back, or once it is gone (the command then applies directly)"
            )
        match request:
            case EnableRequest() | DisableRequest():
                self._pin(request, reply)
            case AutoRequest():
                self._auto(request, reply)
            case ResetRequest(force=force):
                view = self.store.reset(now=self.wall())
                text = "reset: every pin removed, automation paused until `resume`"
                self._set_view(view, reply, text, cleared=True)
                self._change(reply, [ResetRequested(), *_rebuild(force)])
            case PauseRequest():
                self._pause(reply)
            case ResumeRequest():
                view = self.store.set_paused(False, now=self.wall())
                self._set_view(view, reply, "automation resumed", cleared=True)
                self._change(reply, [Paused(paused=False)])
            case RebuildRequest(force=force):
                self._change(reply, [RebuildRequested(force=force)])

    def _pin(self, request: EnableRequest | DisableRequest, reply: Reply) -> None:
        registry = self.daemon.registry
        assert registry is not None
        registry.check_known(request.modules)
        now = self.wall()
        until = None if request.until is None else request.until.timestamp()
        if until is not None:
            # Any client may send any moment: the same cap as the CLI's, before it is printed.
            check_until(until, now, f"{request.op}: until {request.until}")
        if until is not None and until <= now:
            raise ConfigError(
                f"{request.op}: the pin would end at {local_time(until, now)}, which has passed; "
                "give a time in the future"
            )
        state = OverrideState.ON if isinstance(request, EnableRequest) else OverrideState.OFF
        view = self.store.pin(
            request.modules,
            state,
            until=until,
            source=reply.source(),
            persist=request.persist,
            now=now,
        )
        names = ", ".join(request.modules)
        text = f"{names} pinned {state.value}" + (
            f" until {local_time(until, now)}" if until is not None else ""
        )
        self._set_view(view, reply, text, modules=request.modules, state=state.value, until=until)
        self._change(reply, [self._inputs(view)[0], *_rebuild(request.force)])

    def _auto(self, request: AutoRequest, reply: Reply) -> None:
        registry = self.daemon.registry
        assert registry is not None
        now = self.wall()
        pinned = self.store.load(now).pins  # also pins of modules the registry lost
        for name in request.modules:
            if name not in pinned and name not in registry.names:
                raise UnknownModuleError(unknown_module_message(name, registry.names))
        view = self.store.unpin(request.modules, now=now)
        text = f"{', '.join(request.modules)} handed back to the rules"
        self._set_view(view, reply, text, modules=request.modules, cleared=True)
        self._change(reply, [self._inputs(view)[0]])

    def _pause(self, reply: Reply) -> None:
        was_paused = self.daemon.snapshot().paused
        self.daemon.handle_input(Paused(paused=True))
        kept = self.daemon.snapshot().paused_modules or frozenset()
        try:
            view = self.store.set_paused(True, now=self.wall(), modules=kept)
        except RuntimeModulesError:
            if not was_paused:  # the store is the truth a restart reads: do not pause without it
                self.daemon.handle_input(Paused(paused=False))
            raise
        text = f"automation paused; keeping {', '.join(sorted(kept)) or 'the base system'}"
        self._set_view(view, reply, text)
        reply.send(Ok(message=text))

    def _set_view(
        self,
        view: Overrides,
        reply: Reply,
        text: str,
        *,
        modules: Sequence[str] = (),
        cleared: bool = False,
        **fields: Any,
    ) -> None:
        """Remember the store's new view; journal and broadcast what changed, and who did it."""
        self.view = view
        source = reply.source()
        event = JournalEvent.OVERRIDE_CLEARED if cleared else JournalEvent.OVERRIDE_SET
        self.daemon.journal.send(
            event,
            f"{text} by {source}",
            modules=list(modules) or None,
            user=source.user,
            uid=source.uid,
            command=source.command or None,
            **fields,
        )
        data = {"modules": list(modules), "user": source.user, "uid": source.uid, **fields}
        self._broadcast(EventMessage(time=self.wall(), kind="override", text=text, data=data))

    # --- waiting for the apply ---------------------------------------------------------------

    def _change(self, reply: Reply, inputs: Sequence[Input]) -> None:
        """Feed ``inputs`` and answer ``reply`` as the apply that carries them goes."""
        waiter = _Waiter(reply)
        self._waiters.append(waiter)
        for event in inputs:
            self.daemon.handle_input(event)  # a StartApply attaches the waiter (_on_notice)
        running = self.daemon.applying
        if waiter.apply_id is None:
            snap = self.daemon.snapshot()
            if running is not None and snap.pending is None:
                waiter.apply_id = running  # the apply in flight goes where this change wants
                message = f"apply #{running}, under way, carries this change"
            elif running is not None or snap.pending is not None:
                message = self._queued(snap)
            else:
                self._waiters.remove(waiter)
                reply.send(_nothing_to_do(snap))
                return
        else:
            running_now = self._running
            message = running_now.text if running_now is not None else ""
        apply_id = None if waiter.apply_id is None else str(waiter.apply_id)
        reply.send(Accepted(apply_id=apply_id, message=message))
        waiter.accepted = True
        if not reply.open:  # `--no-wait`: the accepted answer was the last
            self._waiters.remove(waiter)

    def _queued(self, snap: ReconcilerStatus) -> str:
        target = ", ".join(sorted(snap.wanted)) or "the base system"
        if snap.in_flight is not None:
            return (
                f"apply #{snap.in_flight.apply_id} is under way; {{{target}}} is applied "
                "right after it"
            )
        pending = snap.pending
        if pending is not None and pending.at is not None:
            at = self.wall() + (pending.at - snap.now)
            return f"{{{target}}} is applied at {local_time(at, self.wall())}"
        return f"{{{target}}} is applied next"

    def _on_notice(self, notice: Notice) -> None:
        if self.server.subscribers:
            world = self.daemon.pipeline.world if self.daemon.pipeline is not None else None
            now, mono = self.wall(), self.daemon.clock()
            for event in events_of(notice, world, wall=now, to_wall=lambda t: now + (t - mono)):
                self._broadcast(event)
        match notice:
            case ActionTaken(action=StartApply(apply_id=apply_id), text=text):
                self._running = _Running(apply_id, time.monotonic(), text)
                for waiter in self._waiters:
                    if waiter.apply_id is None:
                        waiter.apply_id = apply_id
                        if waiter.accepted:  # it was queued: now its apply is known
                            waiter.reply.send(Accepted(apply_id=str(apply_id), message=text))
                            waiter.sent = time.monotonic()
            case ActionTaken(action=OverrideExpired(module=module)):
                self._expired(module)
            case ActionTaken(action=ApplyCancelled() | ApplyGivenUp()):
                self._settle = True
            case ApplyOutput(apply_id=apply_id, line=line):
                running = self._running
                if (
                    running is not None
                    and running.apply_id == apply_id
                    and any(w.apply_id == apply_id for w in self._waiters)
                ):
                    running.lines.append(line)
            case ApplyDone(apply_id=apply_id):
                done = [w for w in self._waiters if w.apply_id == apply_id]
                self._waiters = [w for w in self._waiters if w.apply_id != apply_id]
                if self._running is not None and self._running.lines:
                    self._progress(self._running, done, time.monotonic())  # its last words
                self._ended.append((done, notice))
                self._running = None
                self._settle = True

    def _next_housekeeping(self) -> float | None:
        if self._ended or self._settle or (self._running is not None and self._running.lines):
            return 0.0  # now: at the end of this round of the loop
        running = self._running
        if running is not None and self._waiters:
            return min(self._beat_due(running, w) for w in self._waiters)
        return None

    def _beat_due(self, running: _Running, waiter: _Waiter) -> float:
        """When ``waiter`` is due a heartbeat: ``heartbeat`` s after it was sent anything."""
        return max(running.started, waiter.sent) + self.heartbeat

    def _housekeeping(self, now: float) -> None:
        """Progress and heartbeats; ended applies and waiters left without an apply answered.

        Runs after the loop's callbacks of a round, so after the reconciler took an apply's end
        and maybe started the follow-up.
        """
        self._check_clock()
        running = self._running
        if running is not None:
            if running.lines:
                carried = [w for w in self._waiters if w.apply_id == running.apply_id]
                self._progress(running, carried, now)
            # Every caller still waiting hears of the running apply at least every `heartbeat`
            # s: those it carries while it is silent, and those queued behind it.
            beat = [w for w in self._waiters if w.reply.open and self._beat_due(running, w) <= now]
            if beat:
                self._progress(running, beat, now)
        snap = self.daemon.snapshot() if self._ended or self._settle else None
        for waiters, done in self._ended:
            answer = _done(done, snap)
            for waiter in waiters:
                waiter.reply.send(answer)
        self._ended.clear()
        if self._settle:
            self._settle = False
            assert snap is not None
            if self.daemon.applying is None and snap.pending is None:
                for waiter in [w for w in self._waiters if w.apply_id is None]:
                    self._waiters.remove(waiter)
                    waiter.reply.send(_nothing_to_do(snap))
        self._waiters = [w for w in self._waiters if w.reply.open]

    def _progress(self, running: _Running, waiters: list[_Waiter], now: float) -> None:
        """Send the output gathered so far (or a heartbeat, when none) to ``waiters``."""
        for batch in _batches(running.lines):
            progress = Progress(
                apply_id=str(running.apply_id), lines=batch, elapsed=running.elapsed(now)
            )
            for waiter in waiters:
                waiter.reply.send(progress)
                waiter.sent = now
        running.lines = []

    # --- pins that end -----------------------------------------------------------------------

    def _expired(self, module: str) -> None:
        """The reconciler let ``module``'s pin go at its time: remove it from the store too.

        The decision log journaled it; the events stream hears of it here.
        """
        before = self.view
        pin = before.pins.get(module)
        expired = self._expire_stored(pin.until if pin is not None else None)
        if expired is not None:
            gone, self.view = expired
            # A runtime pin over a persistent one that ended by now left the store with it: the
            # new view no longer shows it, so the reveal timer is made due to feed (and say) it.
            self._revealed += [m for m in gone if m in before.shadowed and m != module]
        self._pin_ended(module, revealed=False, journal=False)

    def _pin_ended(self, module: str, *, revealed: bool, journal: bool) -> None:
        """Say that ``module``'s pin ended: one journal entry, one ``override`` event.

        Every end of a pin is said here, once: by ``_expired`` (the reconciler's timer, whose
        entry the decision log wrote) or by ``_reveal`` (what it removes from the pins it feeds).
        """
        then = "its persistent pin is in force again" if revealed else "back to the rules"
        text = f"override of {module} expired: {then}"
        if journal:
            self.daemon.journal.send(JournalEvent.OVERRIDE_EXPIRED, text, module=module)
        self._broadcast(
            EventMessage(
                time=self.wall(),
                kind="override",
                text=text,
                data={"modules": [module], "change": "expired", "revealed": revealed},
            )
        )

    def _expire_stored(self, end: float | None) -> tuple[list[str], Overrides] | None:
        """Drop the pins that ended by ``end`` from the store; None (warned) when it failed.

        The daemon's clock decided that ``end`` came; the wall clock may lag it by a hair, so
        the store expires at the later of the two.
        """
        try:
            gone, view = self.store.expire(max(self.wall(), end or 0.0))
        except RuntimeModulesError as exc:
            self.daemon.warn(f"expired override not removed from the store: {exc}")
            return None
        return gone, view

    def _next_reveal(self) -> float | None:
        if self._revealed:
            return 0.0  # now (``_expired`` took such a pin out of the store already)
        reveal = self.view.next_reveal()
        return None if reveal is None else reveal - self._offset

    def _reveal(self, now: float) -> None:
        """A runtime pin over a persistent one ended: the persistent one is in force again.

        The pins are fed again without it; a plain pin that ended by now and left the store
        with it leaves the reconciler that way too (it never expires there): both are said here.
        """
        before = self.view
        revealed, self._revealed = set(self._revealed), []
        expired = self._expire_stored(before.next_reveal())
        gone: list[str] = []
        if expired is None:  # fed without the timer, so that it does not fire in a loop; the
            # pin keeps its end and the reconciler expires it (and ``_expired`` says so)
            view = replace(before, shadowed={})
        else:
            gone, view = expired
        for module in sorted(revealed.union(gone)):
            shown = module in revealed or module in before.shadowed
            self._pin_ended(module, revealed=shown, journal=True)
        self._feed_pins(view)

    def _check_clock(self) -> None:
        """Convert the pins again when the wall clock moved against ours (without timerfd)."""
        if self.view.pins and abs(self.wall() - self.daemon.clock() - self._offset) > CLOCK_JUMP:
            self._clock_set()

    def _clock_set(self) -> None:
        if self.view.pins and self.daemon.pipeline is not None:
            log.info("the wall clock was set: pins are converted again")
            self._feed_pins(self.view)

    # --- status and events -------------------------------------------------------------------

    def status(self, modules: Sequence[str] = ()) -> dict[str, Any]:
        """The status object with the daemon's explanation (docs/control.md, "Status JSON")."""
        daemon = self.daemon
        registry = daemon.registry
        assert registry is not None
        registry.check_known(modules)
        state = load_state(daemon.settings)
        view = DaemonView(
            snapshot=daemon.snapshot(),
            wall_now=self.wall(),
            pid=os.getpid(),
            started=daemon.started_at,
            dry_run=daemon.dry_run,
            rejected=daemon.rejected,
        )
        return status_json(
            daemon.settings, registry, state, modules, overrides=self.view, daemon=view
        )

    def _broadcast(self, event: EventMessage) -> None:
        if self.server.subscribers:
            self.server.broadcast(event)


def _rebuild(force: bool) -> list[Input]:
    return [RebuildRequested(force=True)] if force else []


def _batches(lines: list[str]) -> list[list[str]]:
    """``lines`` cut into Progress-sized batches (at least one, maybe empty: a heartbeat)."""
    batches: list[list[str]] = [[]]
    size = 0
    for line in lines:
        if size + len(line) > PROGRESS_BYTES and batches[-1]:
            batches.append([])
            size = 0
        batches[-1].append(line)
        size += len(line)
    return batches


def _set(names: frozenset[str]) -> str:
    return ", ".join(sorted(names)) or "the base system"


def _nothing_to_do(snap: ReconcilerStatus) -> Done:
    """The answer to a change that needs no apply: done, or given up on."""
    applied = sorted(snap.applied)
    given_up = snap.given_up
    if given_up is not None and given_up.target == snap.wanted and snap.wanted != snap.applied:
        return Done(
            ok=False,
            result="given-up",
            before=applied,
            after=applied,
            message=f"the daemon gave up applying {{{_set(given_up.target)}}} after "
            f"{given_up.failures} failures ({given_up.message}); `runtime-modules rebuild` "
            "tries again",
            exit_code=int(ExitCode.FAILURE),
        )
    return Done(
        ok=True,
        result="unchanged",
        before=applied,
        after=applied,
        message=f"nothing to do: {_set(snap.applied)} already applied",
    )


def _done(done: ApplyDone, snap: ReconcilerStatus | None) -> Done:
    """The answer for an apply that ended; a failure says what the daemon does next."""
    outcome = done.outcome
    message = done.message
    if not done.ok and snap is not None:
        if snap.given_up is not None:
            message += f"; the daemon gave up after {snap.given_up.failures} failures"
        elif snap.backoff is not None and snap.backoff.retry_at is not None:
            delay = snap.backoff.retry_at - snap.now
            message += f"; the daemon tries again in {delay:.{1 if delay < 10 else 0}f}s"
    if outcome is None:
        return Done(
            apply_id=str(done.apply_id),
            ok=False,
            result="failed",
            after=sorted(done.applied),
            message=message,
            exit_code=int(ExitCode.FAILURE),
        )
    return Done(
        apply_id=str(done.apply_id),
        ok=outcome.ok,
        result=outcome.result.value,
        before=sorted(outcome.before),
        after=sorted(outcome.after),
        message=message,
        duration=round(outcome.duration, 3),
        exit_code=int(EXIT_CODES[outcome.result]),
        journal_id=outcome.apply_id,
    )
