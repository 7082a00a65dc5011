"""How the daemon tells what it decided: one journal entry per decision (MESSAGE_IDs in
docs/daemon.md), and with ``--dry-run`` the same readable line on stdout.

The line is ``describe``'s, also used by ``_replay``, so ``watch --dry-run`` and ``simulate`` read
alike. A rule's
matches (the devices and links that made it hold) are remembered from its activation, so that
"lingering" and "deactivated" can still say what it was about.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TextIO

from ._journal import Journal, JournalEvent, Priority
from ._reconciler_events import (
    Action,
    ApplyCancelled,
    ApplyGivenUp,
    ApplyScheduled,
    OverrideExpired,
    RuleActivated,
    RuleDeactivated,
    RuleLingering,
    RuleSettleCancelled,
    RuleSettling,
    StartApply,
)

__all__ = ["DecisionLog", "describe"]


class DecisionLog:
    """Describes and records decisions.

    Args:
        journal: where every decision goes.
        out: where readable lines go too (``--dry-run``), or None.
        dry_run: an apply "would start" rather than "starts".
        holding: the matches of a rule that holds now (the pipeline's).
        modules_of: the modules of a rule, for the journal.
    """

    def __init__(
        self,
        journal: Journal,
        out: TextIO | None,
        *,
        dry_run: bool,
        holding: Callable[[str], tuple[str, ...]],
        modules_of: Callable[[str], tuple[str, ...]],
    ) -> None:
        self.journal = journal
        self.out = out
        self.dry_run = dry_run
        self._holding = holding
        self._modules_of = modules_of
        self._matches: dict[str, tuple[str, ...]] = {}  # rule -> what made it active last
        self.dropped = 0  # lines not echoed: the reader of ``out`` did not keep up

    def record(self, action: Action, now: float, applied: frozenset[str]) -> str:
        """Journal and echo ``action``; returns its readable line."""
        matches: tuple[str, ...] = ()
        if isinstance(action, RuleActivated):
            self._matches[action.rule] = action.matches
        elif isinstance(action, RuleSettling):
            matches = self._holding(action.rule)
        elif isinstance(action, RuleLingering | RuleDeactivated):
            matches = self._matches.get(action.rule, ())
        text = describe(action, now, matches=matches, applied=applied, dry_run=self.dry_run)
        self._journal(action, text, now, matches, applied)
        self.echo(text)
        if isinstance(action, RuleDeactivated):
            self._matches.pop(action.rule, None)
        return text

    def _journal(
        self,
        action: Action,
        text: str,
        now: float,
        matches: tuple[str, ...],
        applied: frozenset[str],
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
                send(JournalEvent.APPLY_SCHEDULED, text, target=target, applied=applied,
                     in_s=round(at - now, 3))  # fmt: skip
            case ApplyGivenUp(target=target, failures=failures):
                send(JournalEvent.APPLY_FAILED, text, target=target, failures=failures)
            case OverrideExpired(module=module):
                # The control handler, a listener, removes it from the override store.
                send(JournalEvent.OVERRIDE_EXPIRED, text, module=module)
            case RuleSettling() | RuleSettleCancelled() | ApplyCancelled():
                if self.journal.enabled_for(Priority.DEBUG):
                    send(JournalEvent.EVENT_RECEIVED, text, priority=Priority.DEBUG)
            case StartApply():
                pass  # the applier journals APPLY_STARTED and the end, with its own apply id

    def echo(self, text: str) -> None:
        """``text`` on ``out`` with the time of day, when there is an ``out``."""
        if self.out is None:
            return
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        # The loop must never wait for a reader (`watch --dry-run | less`, paused): a line that
        # would block is dropped and counted, and the next one that fits says how many.
        if not _writable(self.out):
            self.dropped += 1
            return
        line = f"{stamp}  {text}\n"
        if self.dropped:
            line = f"{stamp}  ({self.dropped} lines dropped: the output was not read)\n" + line
        try:
            self.out.write(line)
            self.out.flush()
        except (OSError, ValueError):  # stdout closed (a pipe whose reader left): stop echoing
            self.out = None
            return
        self.dropped = 0


def _writable(out: TextIO) -> bool:
    """Whether a line can be written to ``out`` now without blocking.

    A pipe polls writable while a page (4 KiB) is free, and a line is shorter: the write does
    not block. Files and terminals are always writable; an object without a descriptor too.
    """
    try:
        fd = out.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation (StringIO) is both
        return True
    try:
        return bool(select.select([], [fd], [], 0)[1])
    except (OSError, ValueError):
        return True  # let the write find out (and stop echoing)


# --- describing decisions ---------------------------------------------------------------------


def set_text(modules: Iterable[str]) -> str:
    """A module set for people: "gaming, podman", or "base system"."""
    return ", ".join(sorted(modules)) or "base system"


def _what(matches: Sequence[str]) -> str:
    if not matches:
        return ""
    shown = ", ".join(matches[:3])
    if len(matches) > 3:
        shown += f" and {len(matches) - 3} more"
    return f" ({shown})"


def describe(
    action: Action,
    now: float,
    *,
    matches: Sequence[str] = (),
    applied: frozenset[str] = frozenset(),
    dry_run: bool = True,
) -> str:
    """One readable line for a decision; times are shown relative to ``now``.

    ``applied`` is what is applied when the decision is made (an apply shows what it changes);
    ``dry_run`` says "would start" rather than "starts" for an apply.
    """
    match action:
        case RuleSettling(rule=rule, until=until):
            return f"rule {rule} holds{_what(matches)}; active in {until - now:.1f}s if it stays"
        case RuleSettleCancelled(rule=rule):
            return f"rule {rule} stopped holding before it settled"
        case RuleActivated(rule=rule, matches=found, resumed=resumed):
            how = "active again" if resumed else "activated"
            return f"rule {rule} {how}{_what(found)}"
        case RuleLingering(rule=rule, until=until):
            return f"rule {rule} lingering: no longer holds, stays active {until - now:.1f}s more"
        case RuleDeactivated(rule=rule):
            return f"rule {rule} deactivated"
        case ApplyScheduled(target=target, at=at):
            return f"apply of {{{set_text(target)}}} scheduled in {at - now:.1f}s"
        case ApplyCancelled(target=target):
            return f"scheduled apply of {{{set_text(target)}}} cancelled: already applied"
        case StartApply(apply_id=apply_id, target=target, attempt=attempt):
            added = sorted(target - applied)
            removed = sorted(applied - target)
            diff = " ".join([*(f"+{m}" for m in added), *(f"-{m}" for m in removed)])
            retry = f", attempt {attempt}" if attempt > 1 else ""
            verb = "would start" if dry_run else "starts"
            return f"apply #{apply_id} {verb}: {{{set_text(target)}}}" + (
                f" ({diff}{retry})" if diff or retry else ""
            )
        case ApplyGivenUp(target=target, failures=failures, message=message):
            return f"gave up applying {{{set_text(target)}}} after {failures} failures: {message}"
        case OverrideExpired(module=module):
            return f"override of {module} expired: back to the rules"
    return repr(action)
