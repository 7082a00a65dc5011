"""How the daemon tells what it decided: one journal entry per decision (MESSAGE_IDs in
docs/daemon.md), and with ``--dry-run`` the same readable line on stdout.

The line is ``_replay.describe``'s, so ``watch --dry-run`` and ``simulate`` read alike. A rule's
matches (the devices and links that made it hold) are remembered from its activation, so that
"lingering" and "deactivated" can still say what it was about.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
from ._replay import describe

__all__ = ["DecisionLog"]


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
        try:
            self.out.write(f"{stamp}  {text}\n")
            self.out.flush()
        except (OSError, ValueError):  # stdout closed (a pipe whose reader left): stop echoing
            self.out = None
