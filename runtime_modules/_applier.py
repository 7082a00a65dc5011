"""The applier: switch the system to a set of modules with ``nixos-rebuild test``, never half-way.

One apply, under the apply lock (``_lock``):

1. read the state; an ``in_progress`` record left by a dead applier is rolled back first;
2. resolve and validate the target; no change and no ``force`` -> UNCHANGED, nothing runs;
3. pre-apply hooks (a failing one vetoes: VETOED, nothing runs);
4. write ``in_progress`` (with the running system, ``/run/current-system``) to the state;
5. build: write the generated flake (``_flake``) and run ``nixos-rebuild build --flake
   path:<dir>#<host>`` in a scratch directory, in its own process group, streaming each line to
   the caller, a capped log file and the journal. It changes nothing on the running system, so a
   failure, timeout or cancel kills its whole process group and the apply ends: nothing to undo;
6. activate: run ``<built system>/bin/switch-to-configuration test`` ourselves. It is never killed
   (not by a timeout, a cancel or a stop: a half-run activation is what rollback exists for), so
   nothing of ours can race it. Current ``nixos-rebuild`` runs its own activation in a transient
   systemd unit outside our process group, so killing it would leave that running beside our
   rollback; that is why the two phases are ours (docs/applier.md);
7. success: the state says the target is applied. An activation that fails is rolled back to the
   recorded system (``<previous>/bin/switch-to-configuration test``), unless the running system is
   neither that one nor the built one (switched by hand meanwhile: left alone, state uncertain);
8. post-apply hooks, which cannot veto.

``apply`` does not raise for a failed apply: the outcome says what happened, in one line, and
where the full log is. It raises for what stops an apply before anything runs (unknown module,
lock busy under ``wait=False``, a state directory that cannot be written).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypedDict

from ._errors import ConfigError, StateError
from ._flake import flake_ref, write_flake
from ._hooks import HookPhase, HookResult, run_hooks
from ._journal import Journal, JournalEvent
from ._lock import ApplyLock, read_holder
from ._process import (
    group_alive,
    kill_group,
    process_alive,
    process_start_time,
)
from ._registry import Registry
from ._runner import (
    TERM_GRACE,
    OutputLog,
    Run,
    Runner,
)
from ._settings import Settings
from ._state import (
    ApplyRecord,
    ApplyResult,
    InProgress,
    ModuleState,
    ModuleStatus,
    State,
    load_state,
    save_state,
)

__all__ = ["Applier", "ApplyOutcome", "ApplyResult", "Target", "drift"]

# A target is a set of module names, or a function from the applied set to one: `enable X` must
# add X to what is applied when its turn comes, not to what was applied when it started waiting.
Target = frozenset[str] | Callable[[frozenset[str]], frozenset[str]]

KEEP_LOGS = 20  # newest apply logs kept in <state dir>/logs
# An activation is never killed; past this it is only said to be slow (journal warning). NixOS
# bounds each unit's start by its own timeouts (DefaultTimeoutStartSec=90s a unit), so a quarter
# of an hour means something waits that will not come.
ACTIVATION_REPORT_AFTER = 15 * 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyOutcome:
    apply_id: str
    result: ApplyResult
    before: frozenset[str]
    after: frozenset[str]  # what is applied now
    system_before: str | None
    system_after: str | None
    started: float  # wall time
    duration: float  # seconds
    message: str  # one line for the user
    log_path: Path | None
    target: frozenset[str] = frozenset()
    hooks: tuple[HookResult, ...] = ()

    @property
    def ok(self) -> bool:
        return self.result.ok


def new_apply_id() -> str:
    """Sortable by time, unique enough: 32 random bits per second."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def current_system(settings: Settings) -> str | None:
    """Where the current-system link points now, or None when there is none."""
    link = settings.current_system
    if not link.exists():
        return None
    return os.path.realpath(link)


def drift(settings: Settings, state: State) -> str | None:
    """Why the running system is not the one our last apply left, or None when it is.

    Someone ran `nixos-rebuild switch` or `test` by hand: what is applied is then unknown.
    """
    last = state.last_apply
    if last is None or last.system_after is None or state.in_progress is not None:
        return None
    now = current_system(settings)
    if now is None or now == last.system_after:
        return None
    return (
        f"the running system {now} is not the one the last apply left ({last.system_after}); "
        "it was switched outside runtime-modules, so the next apply rebuilds"
    )


def _phrase(before: frozenset[str], goal: frozenset[str], *, past: bool) -> str:
    added, removed = sorted(goal - before), sorted(before - goal)
    on, off = ("enabled", "disabled") if past else ("enable", "disable")
    parts = []
    if added:
        parts.append(f"{on} {', '.join(added)}")
    if removed:
        parts.append(f"{off} {', '.join(removed)}")
    if parts:
        return " and ".join(parts)
    what = f"with {', '.join(sorted(goal))}" if goal else "the base system"
    return f"{'rebuilt' if past else 'rebuild'} {what}"


def _names(names: Iterable[str]) -> str:
    return " ".join(sorted(names))


class Applier:
    """Applies module sets; safe to share between threads (each apply takes the lock)."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        journal: Journal | None = None,
        dry_run: bool = False,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.journal = journal if journal is not None else Journal.for_level(settings.log_level)
        self.dry_run = dry_run
        # What the dry runs of this applier would have applied: never written to the state file
        # (the real system did not change), yet a dry-run daemon must not "apply" it again.
        self.dry_applied: frozenset[str] | None = None
        # The state file's identity when last read for an orphaned rebuild, and what it said.
        self._seen_in_progress: tuple[tuple[int, int, int], InProgress | None] | None = None

    # -- public API ---------------------------------------------------------------------------

    def apply(
        self,
        target: Target,
        *,
        reason: str,
        force: bool = False,
        wait: bool = True,
        on_output: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> ApplyOutcome:
        """Switch to ``target``; see the module docstring. Never half-switches the system."""
        try:
            return self._apply(
                target, reason=reason, force=force, wait=wait, on_output=on_output, cancel=cancel
            )
        except StateError as exc:
            # Nothing ran: the lock or the in-progress record could not be written. The caller
            # gets the error; the journal gets it too, since a daemon's apply has no terminal.
            self.journal.send(JournalEvent.STATE_WRITE_FAILED, str(exc), reason=reason)
            raise

    def _apply(
        self,
        target: Target,
        *,
        reason: str,
        force: bool,
        wait: bool,
        on_output: Callable[[str], None] | None,
        cancel: threading.Event | None,
    ) -> ApplyOutcome:
        if not callable(target):
            target = frozenset(target)
            self.registry.check_known(sorted(target))
        apply_id = new_apply_id()
        started, t0 = time.time(), time.monotonic()
        self._free_orphaned_lock()
        lock = ApplyLock(self.settings.lock_file)
        ctx = _Context(apply_id, started, t0, reason, force, on_output, cancel, lock)
        if not lock.acquire(
            apply_id=apply_id,
            command=_command(),
            wait=wait,
            cancel=cancel,
            while_waiting=self._free_orphaned_lock,
        ):
            state = load_state(self.settings, journal=self.journal)
            return ctx.outcome(
                ApplyResult.CANCELLED,
                state.applied,
                state.applied,
                "cancelled while waiting for another apply to finish; nothing changed",
            )
        try:
            return self._apply_locked(ctx, target)
        finally:
            lock.release()

    def recover(self) -> ApplyOutcome | None:
        """Roll back an apply that a killed process left in progress; None when there was none."""
        state = load_state(self.settings, journal=self.journal)
        if state.in_progress is None:
            return None
        self._free_orphaned_lock()
        lock = ApplyLock(self.settings.lock_file)
        lock.acquire(
            apply_id=state.in_progress.apply_id,
            command=_command(),
            while_waiting=self._free_orphaned_lock,
        )
        try:
            state = load_state(self.settings, journal=self.journal, locked=True)
            if state.in_progress is None:  # another process recovered it while we waited
                return None
            return self._recover_locked(state, lock)
        finally:
            lock.release()

    # -- the apply ------------------------------------------------------------------------------

    def _apply_locked(self, ctx: _Context, target: Target) -> ApplyOutcome:
        # A dry run holds the lock too, yet must not write the state, not even a recovery.
        state = load_state(self.settings, journal=self.journal, locked=not self.dry_run)
        if state.in_progress is not None and not self.dry_run:
            self._recover_locked(state, ctx.lock)
            state = load_state(self.settings, journal=self.journal, locked=True)
        stale = state.uncertain or drift(self.settings, state)
        if self.dry_run and self.dry_applied is not None:
            state, stale = state.with_(applied=self.dry_applied), None
        # Modules the registry no longer has cannot stay applied: the base system dropped them.
        before = state.applied
        goal = frozenset(target(before & self.registry.names)) if callable(target) else target
        self.registry.check_known(sorted(goal))
        if goal == before and not ctx.force and stale is None:
            return self._unchanged(ctx, state)
        system_before = current_system(self.settings)
        if system_before is None and not self.dry_run:
            # Before anything is said or run: no hook should prepare an apply that cannot start.
            raise ConfigError(
                f"{self.settings.current_system} does not exist, so there would be no system to "
                "roll back to; is this NixOS? (set RUNTIME_MODULES_CURRENT_SYSTEM for another link)"
            )

        log_path = None if self.dry_run else self.settings.log_dir / f"{ctx.apply_id}.log"
        self.journal.send(
            JournalEvent.APPLY_STARTED,
            f"{'dry run: would ' if self.dry_run else 'applying: '}"
            f"{_phrase(before, goal, past=False)} ({ctx.reason})",
            **self._fields(ctx, before, goal),
            dry_run=self.dry_run,
            log_path=log_path,
        )
        if self.dry_run:
            return self._dry_run(ctx, state, goal)

        hooks = run_hooks(
            HookPhase.PRE_APPLY,
            self.settings.hooks_dir,
            self._payload(
                ctx, HookPhase.PRE_APPLY, before=before, after=goal, goal=goal, result=None
            ),
            self._hook_env(ctx, before, goal, None),
            self.settings.hook_timeout,
            self.journal,
        )
        if hooks and not hooks[-1].ok:
            veto = hooks[-1]
            message = (
                f"{_phrase(before, goal, past=False)} was vetoed: {veto.describe()} "
                f"({veto.path}); nothing changed"
            )
            end = _End(ApplyResult.VETOED, before, system_before, system_before, message)
            return self._finish(
                ctx, state, goal, end, hooks, event=JournalEvent.APPLY_VETOED, hook=veto.name
            )
        if ctx.cancel is not None and ctx.cancel.is_set():
            message = "cancelled before the rebuild started; nothing changed"
            end = _End(ApplyResult.CANCELLED, before, system_before, system_before, message)
            return self._finish(ctx, state, goal, end, hooks, event=JournalEvent.APPLY_FAILED)
        assert system_before is not None
        progress = InProgress(
            apply_id=ctx.apply_id,
            pid=os.getpid(),
            pid_start=process_start_time(os.getpid()),
            started=ctx.started,
            reason=ctx.reason,
            before=before,
            target=goal,
            system_before=system_before,
            log_path=str(log_path) if log_path is not None else None,
        )
        save_state(self.settings, state.with_(in_progress=progress))  # StateError: nothing ran

        log = OutputLog(log_path)
        self._prune_logs(keep=log_path)
        if (problem := self._write_flake(goal)) is not None:
            message = (
                f"could not {_phrase(before, goal, past=False)}: {problem}; nothing was rebuilt"
            )
            end = _End(ApplyResult.FAILED, before, system_before, system_before, message, log)
            return self._finish(ctx, state, goal, end, hooks, event=JournalEvent.APPLY_FAILED)

        built, build = self._build(ctx, log, state, progress)
        if built is None:
            return self._build_failed(
                ctx, state, goal, build, system_before=system_before, log=log, hooks=hooks
            )
        # Recorded before the activation starts, or it does not start: recovery reads "nothing
        # built" as "nothing activated", and tells the built system from a switch by hand.
        try:
            save_state(self.settings, state.with_(in_progress=replace(progress, built=built)))
        except StateError as exc:
            message = (
                f"could not {_phrase(before, goal, past=False)}: the built system could not be "
                f"recorded before activating it ({exc}); the running system was not touched; "
                f"{log.where()}"
            )
            end = _End(ApplyResult.FAILED, before, system_before, system_before, message, log)
            return self._finish(
                ctx, state, goal, end, hooks,
                event=JournalEvent.APPLY_FAILED, post_hooks=True, mark_failed=True, phase="build",
            )  # fmt: skip
        switch = Path(built) / "bin" / "switch-to-configuration"
        log.flush_tail()
        log.write(f"# activating: {switch} test")
        activation = self._run(
            [str(switch), "test"], ACTIVATION_REPORT_AFTER, ctx, log, killable=False
        )
        if activation.ok:
            message = (
                f"{_phrase(before, goal, past=True)} (apply {ctx.apply_id}, "
                f"{time.monotonic() - ctx.t0:.1f} s)"
            )
            system_after = current_system(self.settings)
            end = _End(ApplyResult.SUCCEEDED, goal, system_before, system_after, message, log)
            return self._finish(
                ctx, state, goal, end, hooks, event=JournalEvent.APPLY_SUCCEEDED, post_hooks=True
            )
        return self._fail_and_roll_back(
            ctx, state, goal, activation, system_before=system_before, built=built, log=log,
            hooks=hooks,
        )  # fmt: skip

    def _build(
        self, ctx: _Context, log: OutputLog, state: State, progress: InProgress
    ) -> tuple[str | None, Run]:
        """Phase 1: ``nixos-rebuild build``; (the built system or None, how it ran).

        Killable (timeout, cancel): building changes nothing on the running system.
        """
        scratch = self.settings.state_dir / "build"
        result = scratch / "result"
        run = Run()
        try:
            scratch.mkdir(parents=True, exist_ok=True, mode=0o755)
            if result.is_symlink() or result.exists():
                result.unlink()  # a link from an earlier build must not pass for this one
        except OSError as exc:
            run.error = f"cannot prepare {scratch}: {exc.strerror or exc}"
            return None, run
        argv = [
            *self.settings.nixos_rebuild,
            "build",
            "--flake",
            flake_ref(self.settings.flake_dir, self.registry.host),
        ]
        log.write(f"# apply {ctx.apply_id} ({ctx.reason}): {' '.join(argv)}")

        def spawned(pgid: int) -> None:
            # Recovery must be able to find (and kill) a build whose applier died.
            running = replace(progress, rebuild_pgid=pgid, rebuild_start=process_start_time(pgid))
            with contextlib.suppress(StateError, OSError):
                save_state(self.settings, state.with_(in_progress=running))

        run = self._run(argv, self.settings.apply_timeout, ctx, log, on_spawn=spawned, cwd=scratch)
        if not run.ok:
            return None, run
        if not result.is_symlink():
            run.error = f"it left no {result} link to the built system"
            return None, run
        return os.path.realpath(result), run

    def _build_failed(
        self,
        ctx: _Context,
        state: State,
        goal: frozenset[str],
        run: Run,
        *,
        system_before: str,
        log: OutputLog,
        hooks: list[HookResult],
    ) -> ApplyOutcome:
        """The build failed, timed out or was stopped: the running system was never touched."""
        before = state.applied
        if run.timed_out:
            result = ApplyResult.TIMED_OUT
        elif run.cancelled:
            result = ApplyResult.CANCELLED
        else:
            result = ApplyResult.FAILED
        what = run.describe("nixos-rebuild build", self.settings.apply_timeout)
        if run.error is not None and run.returncode is None:
            what += (
                f" (the command is {' '.join(self.settings.nixos_rebuild)!r}: is this NixOS? set "
                "RUNTIME_MODULES_NIXOS_REBUILD to the nixos-rebuild command)"
            )
        message = (
            f"could not {_phrase(before, goal, past=False)}: {what}; the running system was not "
            f"touched; {log.where()}"
        )
        end = _End(result, before, system_before, current_system(self.settings), message, log)
        return self._finish(
            ctx, state, goal, end, hooks,
            event=JournalEvent.APPLY_FAILED, post_hooks=True, mark_failed=True, phase="build",
        )  # fmt: skip

    def _fail_and_roll_back(
        self,
        ctx: _Context,
        state: State,
        goal: frozenset[str],
        run: Run,
        *,
        system_before: str,
        built: str,
        log: OutputLog,
        hooks: list[HookResult],
    ) -> ApplyOutcome:
        """The activation failed: roll back to ``system_before``, unless someone switched."""
        before = state.applied
        result = ApplyResult.FAILED
        what = run.describe(f"switch-to-configuration test of {built}", ACTIVATION_REPORT_AFTER)
        failed = f"could not {_phrase(before, goal, past=False)}: {what}"
        self.journal.send(
            JournalEvent.APPLY_FAILED,
            failed,
            **self._fields(ctx, before, goal),
            result=result,
            phase="activation",
            system_before=system_before,
            duration_ms=round((time.monotonic() - ctx.t0) * 1000),
            log_path=log.path,
        )
        now = current_system(self.settings)
        if now not in (system_before, built):
            # Someone ran `nixos-rebuild switch` meanwhile: rolling back would undo their switch.
            message = (
                f"{failed}; the running system is now {now}, neither the previous one nor the "
                "one built, so it was switched by hand meanwhile and is not rolled back; "
                f"run `runtime-modules rebuild` to make it match; {log.where()}"
            )
            end = _End(result, before, system_before, now, message, log)
            return self._finish(
                ctx, state, goal, end, hooks,
                event=JournalEvent.APPLY_FAILED, post_hooks=True, mark_failed=True,
                uncertain=f"switched by hand during a failed apply: the running system is {now}",
                phase="activation",
            )  # fmt: skip
        rolled_back, problem = self._roll_back(system_before, ctx, log)
        if rolled_back:
            message = f"{failed}; rolled back to {system_before}; {log.where()}"
            end = _End(result, before, system_before, current_system(self.settings), message, log)
            return self._finish(
                ctx, state, goal, end, hooks,
                event=JournalEvent.APPLY_ROLLED_BACK, post_hooks=True, mark_failed=True,
            )  # fmt: skip
        message = (
            f"{failed}; and rolling back to {system_before} failed too ({problem}): the "
            f"system may be half-switched, run `runtime-modules rebuild`; {log.where()}"
        )
        end = _End(
            ApplyResult.ROLLBACK_FAILED,
            before,
            system_before,
            current_system(self.settings),
            message,
            log,
        )
        return self._finish(
            ctx, state, goal, end, hooks,
            event=JournalEvent.ROLLBACK_FAILED, post_hooks=True, mark_failed=True,
            uncertain=f"rolling back a failed apply failed: {problem}",
        )  # fmt: skip

    def _finish(
        self,
        ctx: _Context,
        state: State,
        goal: frozenset[str],
        end: _End,
        hooks: list[HookResult],
        *,
        event: JournalEvent,
        post_hooks: bool = False,
        mark_failed: bool = False,
        uncertain: str | None = None,
        hook: str | None = None,
        phase: str | None = None,
    ) -> ApplyOutcome:
        """Record the end of an apply in the state, say it, run post hooks, make the outcome."""
        result, after, message, log = end.result, end.after, end.message, end.log
        system_before, system_after = end.system_before, end.system_after
        if log is not None:
            log.close()
        before = state.applied
        now = time.time()
        record = ApplyRecord(
            apply_id=ctx.apply_id,
            started=ctx.started,
            duration=time.monotonic() - ctx.t0,
            result=result,
            reason=ctx.reason,
            before=before,
            after=after,
            target=goal,
            system_before=system_before,
            system_after=system_after,
            log_path=str(log.path) if log is not None and log.path is not None else None,
            message=message,
        )
        new_state = State(
            applied=after,
            modules=self._module_states(
                state,
                goal,
                after,
                result,
                message=message,
                now=now,
                force=ctx.force,
                mark_failed=mark_failed,
            ),
            last_apply=record,
            uncertain=uncertain or (None if result.ok else state.uncertain),
        )
        try:
            save_state(self.settings, new_state)
        except StateError as exc:
            result, after, message = self._state_not_saved(ctx, result, system_before, exc, message)
            if result is ApplyResult.FAILED and event is JournalEvent.APPLY_SUCCEEDED:
                event = JournalEvent.APPLY_FAILED
            elif result is ApplyResult.ROLLBACK_FAILED:
                event = JournalEvent.ROLLBACK_FAILED
            system_after = current_system(self.settings)
        duration = time.monotonic() - ctx.t0
        self.journal.send(
            event,
            message,
            **self._fields(ctx, before, after),
            result=result,
            system_before=system_before,
            system_after=system_after,
            duration_ms=round(duration * 1000),
            log_path=log.path if log is not None else None,
            hook=hook,
            phase=phase,
        )
        if post_hooks:
            payload = self._payload(
                ctx, HookPhase.POST_APPLY, before=before, after=after, goal=goal, result=result
            )
            payload["system_before"], payload["system_after"] = system_before, system_after
            hooks = hooks + run_hooks(
                HookPhase.POST_APPLY,
                self.settings.hooks_dir,
                payload,
                self._hook_env(ctx, before, after, result),
                self.settings.hook_timeout,
                self.journal,
            )
        return ctx.outcome(
            result,
            before,
            after,
            message,
            system_before=system_before,
            system_after=system_after,
            log_path=log.path if log is not None else None,
            target=goal,
            hooks=hooks,
        )

    def _state_not_saved(
        self,
        ctx: _Context,
        result: ApplyResult,
        system_before: str | None,
        exc: StateError,
        message: str,
    ) -> tuple[ApplyResult, frozenset[str], str]:
        """The final state could not be written: make the system match the file that stays.

        That file still says the previous set is applied (with this apply in progress), so a
        successful rebuild is rolled back rather than leave a system that no record describes.
        """
        self.journal.send(
            JournalEvent.STATE_WRITE_FAILED, str(exc), apply_id=ctx.apply_id, result=result
        )
        state = load_state(self.settings, journal=self.journal, locked=True)
        before = state.applied
        if result is not ApplyResult.SUCCEEDED or system_before is None:
            return result, before, f"{message}; and the state could not be recorded: {exc}"
        log = OutputLog(self.settings.log_dir / f"{ctx.apply_id}.log")
        rolled_back, problem = self._roll_back(system_before, ctx, log)
        log.close()
        if rolled_back:
            return (
                ApplyResult.FAILED,
                before,
                f"the rebuild succeeded but the state could not be recorded ({exc}); "
                f"rolled back to {system_before}",
            )
        return (
            ApplyResult.ROLLBACK_FAILED,
            before,
            f"the rebuild succeeded but the state could not be recorded ({exc}); rolling back "
            f"to {system_before} failed too ({problem}): run `runtime-modules rebuild`",
        )

    def _module_states(
        self,
        state: State,
        goal: frozenset[str],
        after: frozenset[str],
        result: ApplyResult,
        *,
        message: str,
        now: float,
        force: bool,
        mark_failed: bool,
    ) -> Mapping[str, ModuleState]:
        changed = state.applied ^ goal
        modules: dict[str, ModuleState] = {}
        for name in sorted(self.registry.names):
            old = state.module_status(name)
            status = ModuleStatus.ENABLED if name in after else ModuleStatus.DISABLED
            if mark_failed and name in changed:
                modules[name] = ModuleState(status=ModuleStatus.FAILED, message=message, since=now)
            elif old.status is ModuleStatus.FAILED and not (
                result.ok and (name in changed or force)
            ):
                # A failure stays visible until that module is changed or all is rebuilt.
                modules[name] = old
            elif old.status is status and old.message is None:
                modules[name] = old
            else:
                modules[name] = ModuleState(status=status, since=now)
        return MappingProxyType(modules)

    def _unchanged(self, ctx: _Context, state: State) -> ApplyOutcome:
        applied = state.applied
        what = ", ".join(sorted(applied)) if applied else "the base system (no modules)"
        message = f"nothing to do: {what} already applied"
        self.journal.send(
            JournalEvent.APPLY_UNCHANGED,
            message,
            **self._fields(ctx, applied, applied),
            result=ApplyResult.UNCHANGED,
        )
        system = current_system(self.settings)
        return ctx.outcome(
            ApplyResult.UNCHANGED,
            applied,
            applied,
            message,
            system_before=system,
            system_after=system,
            target=applied,
        )

    def _write_flake(self, goal: frozenset[str]) -> str | None:
        """Write the generated flake for ``goal``; None, or why it could not be written."""
        try:
            write_flake(
                self.settings.flake_dir,
                base_url=self.registry.flake,
                host=self.registry.host,
                modules=goal,
                registry=self.settings.registry,
            )
        except (OSError, ConfigError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            return f"cannot write the generated flake in {self.settings.flake_dir}: {why}"
        return None

    def _dry_run(self, ctx: _Context, state: State, goal: frozenset[str]) -> ApplyOutcome:
        """Everything but nixos-rebuild and hooks (they act on the real system).

        The state file is not written: it describes the real system, which did not change. What
        the dry run would have applied is kept in ``dry_applied``, for this applier's next call.
        """
        before = state.applied
        system = current_system(self.settings)
        if (problem := self._write_flake(goal)) is not None:
            result, after, event = ApplyResult.FAILED, before, JournalEvent.APPLY_FAILED
            message = f"dry run: could not {_phrase(before, goal, past=False)}: {problem}"
        else:
            result, after, event = ApplyResult.DRY_RUN, goal, JournalEvent.APPLY_SUCCEEDED
            message = (
                f"dry run: would {_phrase(before, goal, past=False)} "
                f"(flake written to {self.settings.flake_dir}; nixos-rebuild not run)"
            )
            self.dry_applied = goal
        duration = time.monotonic() - ctx.t0
        self.journal.send(
            event,
            message,
            **self._fields(ctx, before, after),
            result=result,
            duration_ms=round(duration * 1000),
        )
        return ctx.outcome(
            result, before, after, message, system_before=system, system_after=system, target=goal
        )

    # -- recovery -------------------------------------------------------------------------------

    def _free_orphaned_lock(self) -> None:
        """Kill a rebuild left running by an applier that died: it holds the lock forever.

        Called about once a second while waiting for the lock: the state file is parsed again
        only when it changed (each write replaces it: a new inode).
        """
        try:
            st = os.stat(self.settings.state_file)
        except OSError:
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        seen = self._seen_in_progress
        if seen is None or seen[0] != key:
            try:
                state = load_state(self.settings, journal=self.journal)
            except (StateError, OSError):
                return
            seen = self._seen_in_progress = (key, state.in_progress)
        ip = seen[1]
        if ip is None or ip.rebuild_pgid is None or process_alive(ip.pid, ip.pid_start):
            return
        holder = read_holder(self.settings.lock_file)
        if holder is not None and holder.pid != ip.pid and process_alive(holder.pid, None):
            return  # a live process holds the lock: it is not the orphan's
        pgid = ip.rebuild_pgid
        leader = process_start_time(pgid)
        # While a process group exists its id is never reused as a pid; a live process with that
        # pid and another start time is a stranger.
        ours = leader == ip.rebuild_start if leader is not None else group_alive(pgid)
        if not ours:
            return
        self.journal.send(
            JournalEvent.STATE_RECOVERED,
            f"apply {ip.apply_id} lost its applier (pid {ip.pid}); stopping its orphaned "
            f"nixos-rebuild (process group {pgid}) before rolling back",
            apply_id=ip.apply_id,
        )
        kill_group(pgid, wait=TERM_GRACE)

    def _recover_locked(self, state: State, lock: ApplyLock) -> ApplyOutcome:
        """End the interrupted apply as a live one would have ended, through ``_finish``."""
        ip = state.in_progress
        assert ip is not None
        # Timed from the apply's own start, so the record and the journal tell its whole span.
        t0 = time.monotonic() - max(0.0, time.time() - ip.started)
        ctx = _Context(ip.apply_id, ip.started, t0, ip.reason, False, None, None, lock)
        log = OutputLog(Path(ip.log_path) if ip.log_path else None)
        log.write(f"# recovery at {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}: the applier died")
        interrupted = (
            f"apply {ip.apply_id} ({_phrase(ip.before, ip.target, past=False)}, {ip.reason}) "
            f"was interrupted: its process {ip.pid} died"
        )
        now = current_system(self.settings)
        uncertain = None
        if ip.built is None and now == ip.system_before:
            # Died while building: the built system is recorded before any activation starts,
            # so nothing was activated and there is nothing to roll back.
            message = (
                f"{interrupted} while building; the running system was not touched; {log.where()}"
            )
            end = _End(ApplyResult.FAILED, ip.before, ip.system_before, now, message, log)
            return self._finish(
                ctx, state, ip.target, end, [],
                event=JournalEvent.APPLY_FAILED, post_hooks=True, mark_failed=True, phase="build",
            )  # fmt: skip
        self.journal.send(
            JournalEvent.STATE_RECOVERED,
            f"{interrupted}; rolling back to {ip.system_before}",
            **self._fields(ctx, ip.before, ip.target),
        )
        by_hand = now is not None and now not in (ip.system_before, ip.built)
        if ip.system_before is None:
            rolled_back, problem = False, "no previous system was recorded"
        elif by_hand:  # rolling back would undo someone's `nixos-rebuild switch`
            rolled_back, problem = False, ""
        else:
            rolled_back, problem = self._roll_back(ip.system_before, ctx, log)
        if rolled_back:
            message = f"{interrupted}; rolled back to {ip.system_before}"
            event = JournalEvent.APPLY_ROLLED_BACK
        elif by_hand:
            message = (
                f"{interrupted}; the running system is now {now}, neither the previous one nor "
                "the one built, so it was switched by hand meanwhile and is not rolled back; run "
                "`runtime-modules rebuild` to make it match"
            )
            event = JournalEvent.APPLY_FAILED
            uncertain = f"switched by hand during an interrupted apply: the running system is {now}"
        else:
            message = (
                f"{interrupted}; rolling back failed ({problem}): the system may be "
                "half-switched, run `runtime-modules rebuild`"
            )
            event = JournalEvent.ROLLBACK_FAILED
            uncertain = f"an interrupted apply could not be rolled back: {problem}"
        result = (
            ApplyResult.FAILED
            if event is not JournalEvent.ROLLBACK_FAILED
            else (ApplyResult.ROLLBACK_FAILED)
        )
        end = _End(
            result, ip.before, ip.system_before, current_system(self.settings),
            f"{message}; {log.where()}", log,
        )  # fmt: skip
        return self._finish(
            ctx, state, ip.target, end, [],
            event=event, post_hooks=True, mark_failed=True, uncertain=uncertain,
        )  # fmt: skip

    def _roll_back(self, system_before: str, ctx: _Context, log: OutputLog) -> tuple[bool, str]:
        """Switch back to ``system_before``; (done, why not). Not cancellable: it must finish."""
        switch = Path(system_before) / "bin" / "switch-to-configuration"
        log.flush_tail()
        log.write(f"# rolling back: {switch} test")
        rollback_ctx = _Context(
            ctx.apply_id, ctx.started, ctx.t0, ctx.reason, ctx.force, ctx.on_output, None, ctx.lock
        )
        # Like the activation it undoes, never killed: a half-run switch is what it repairs.
        run = self._run(
            [str(switch), "test"], ACTIVATION_REPORT_AFTER, rollback_ctx, log, killable=False
        )
        now = current_system(self.settings)
        if not run.ok:
            return False, run.describe("switch-to-configuration", ACTIVATION_REPORT_AFTER)
        if now != system_before:
            return False, f"switch-to-configuration succeeded but the running system is {now}"
        return True, ""

    # -- running a command ----------------------------------------------------------------------

    def _run(
        self,
        argv: list[str],
        timeout: float,
        ctx: _Context,
        log: OutputLog,
        *,
        on_spawn: Callable[[int], None] | None = None,
        cwd: Path | None = None,
        killable: bool = True,
    ) -> Run:
        """Run one command of this apply (see ``_runner``); not ``killable``: never stopped."""
        runner = Runner(
            self.journal,
            ctx.apply_id,
            log,
            ctx.on_output,
            pass_fds=(ctx.lock.fd,) if ctx.lock.held else (),
        )
        return runner.run(
            argv, timeout, cancel=ctx.cancel, on_spawn=on_spawn, cwd=cwd, killable=killable
        )

    # -- small parts ----------------------------------------------------------------------------

    def _fields(self, ctx: _Context, before: frozenset[str], after: frozenset[str]) -> _ApplyFields:
        return {
            "apply_id": ctx.apply_id,
            "before": _names(before),
            "after": _names(after),
            "reason": ctx.reason,
        }

    def _payload(
        self,
        ctx: _Context,
        phase: HookPhase,
        *,
        before: frozenset[str],
        after: frozenset[str],
        goal: frozenset[str],
        result: ApplyResult | None,
    ) -> dict[str, Any]:
        return {
            "phase": phase.value,
            "apply_id": ctx.apply_id,
            "host": self.registry.host,
            "reason": ctx.reason,
            "before": sorted(before),
            "after": sorted(after),
            "target": sorted(goal),
            "result": result.value if result is not None else None,
            "force": ctx.force,
        }

    def _hook_env(
        self,
        ctx: _Context,
        before: frozenset[str],
        after: frozenset[str],
        result: ApplyResult | None,
    ) -> dict[str, str]:
        env = {
            "RUNTIME_MODULES_APPLY_ID": ctx.apply_id,
            "RUNTIME_MODULES_BEFORE": _names(before),
            "RUNTIME_MODULES_AFTER": _names(after),
            "RUNTIME_MODULES_REASON": ctx.reason,
        }
        if result is not None:
            env["RUNTIME_MODULES_RESULT"] = result.value
        return env

    def _prune_logs(self, keep: Path | None) -> None:
        try:
            logs = sorted(self.settings.log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for old in logs[:-KEEP_LOGS]:
            if old != keep:
                with contextlib.suppress(OSError):
                    old.unlink()


class _ApplyFields(TypedDict):
    """The journal fields every entry of an apply carries."""

    apply_id: str
    before: str
    after: str
    reason: str


@dataclass(frozen=True, slots=True)
class _End:
    """How an apply ended, before it is recorded."""

    result: ApplyResult
    after: frozenset[str]
    system_before: str | None
    system_after: str | None
    message: str
    log: OutputLog | None = None


@dataclass(slots=True)
class _Context:
    """What one apply carries through its steps."""

    apply_id: str
    started: float
    t0: float
    reason: str
    force: bool
    on_output: Callable[[str], None] | None
    cancel: threading.Event | None
    lock: ApplyLock

    def outcome(
        self,
        result: ApplyResult,
        before: frozenset[str],
        after: frozenset[str],
        message: str,
        *,
        system_before: str | None = None,
        system_after: str | None = None,
        log_path: Path | None = None,
        target: frozenset[str] = frozenset(),
        hooks: Iterable[HookResult] = (),
        started: float | None = None,
    ) -> ApplyOutcome:
        """The outcome of this apply, timed from its start: the one place one is built."""
        return ApplyOutcome(
            apply_id=self.apply_id,
            result=result,
            before=before,
            after=after,
            system_before=system_before,
            system_after=system_after,
            started=self.started if started is None else started,
            duration=time.monotonic() - self.t0,
            message=message,
            log_path=log_path,
            target=target,
            hooks=tuple(hooks),
        )


def _command() -> str:
    """How the lock holder is named to a caller that must not wait."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(argv)[:200]
