"""history: past applies, read from the journal (``journalctl -o json``); needs no daemon.

An apply is its start entry and its end entry, joined by the applier's apply id
(RUNTIME_MODULES_APPLY_ID); one without an end is shown as in progress.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .._errors import ConfigError, ExitCode, PermissionDeniedError
from .._settings import Settings
from ._common import escape_controls, format_duration, print_json

REASON_WIDTH = 100  # characters of the reason shown per line in the plain output

# The common flags that select nothing in the journal: its entries carry no state directory,
# registry or nixos-rebuild command to filter on.
IGNORED_SETTINGS = {
    "registry": "--registry",
    "state_dir": "--state-dir",
    "nixos_rebuild": "--nixos-rebuild",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEntry:
    apply_id: str
    started: float  # wall clock, Unix time
    before: tuple[str, ...]
    after: tuple[str, ...]
    reason: str
    result: str  # the applier's ApplyResult value, or "in-progress"
    duration: float | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "apply_id": self.apply_id,
            "time": datetime.fromtimestamp(self.started).astimezone().isoformat(),
            "started": self.started,
            "before": list(self.before),
            "after": list(self.after),
            "reason": self.reason,
            "result": self.result,
            "duration": self.duration,
            "message": self.message,
        }


def _history_ids() -> tuple[list[str], set[str]]:
    """The MESSAGE_IDs an apply's history is made of: its start, and each way it can end."""
    from .._journal import JournalEvent as E

    ends = [
        E.APPLY_SUCCEEDED,
        E.APPLY_UNCHANGED,
        E.APPLY_FAILED,
        E.APPLY_ROLLED_BACK,
        E.ROLLBACK_FAILED,
        E.APPLY_VETOED,
    ]
    return [E.APPLY_STARTED.message_id, *(e.message_id for e in ends)], {e.message_id for e in ends}


def read_history(
    *, identifier: str, since: str | None = None, journalctl: Sequence[str] = ("journalctl",)
) -> list[HistoryEntry]:
    """Every apply in the journal, oldest first, from its start and end entries."""
    ids, end_ids = _history_ids()
    argv = [*journalctl, "-o", "json", "--no-pager", "--quiet", f"SYSLOG_IDENTIFIER={identifier}"]
    argv += [f"MESSAGE_ID={i}" for i in ids]  # same field: OR'd; with the identifier: AND'd
    if since:
        argv.append(f"--since={since}")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, errors="replace")
    except FileNotFoundError:
        raise ConfigError(
            "journalctl is not installed; `history` reads the systemd journal"
        ) from None
    if proc.returncode != 0 and not proc.stdout:
        detail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        if "insufficient permissions" in proc.stderr:
            raise PermissionDeniedError(
                f"journalctl: {detail[0].rstrip('.')}; the applies are in the system journal: "
                "run as root (`sudo runtime-modules history`) or as a member of systemd-journal"
            )
        raise ConfigError(f"journalctl failed: {detail[0]}")
    applies: dict[str, dict[str, Any]] = {}
    for line in proc.stdout.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        apply_id = _text(entry.get("RUNTIME_MODULES_APPLY_ID"))
        if not apply_id:
            continue
        record = applies.setdefault(apply_id, {})
        mid = _text(entry.get("MESSAGE_ID"))
        record.setdefault("first", entry)
        if mid in end_ids:
            record["end"] = entry  # a rollback logs "failed" and then "rolled back": keep the last
    return [_entry(apply_id, r["first"], r.get("end")) for apply_id, r in applies.items()]


def _entry(apply_id: str, first: dict[str, Any], end: dict[str, Any] | None) -> HistoryEntry:
    last = end if end is not None else first
    try:
        started = int(_text(first.get("__REALTIME_TIMESTAMP")) or 0) / 1e6
    except ValueError:
        started = 0.0
    duration: float | None = None
    if end is not None:
        try:
            duration = int(_text(end.get("RUNTIME_MODULES_DURATION_MS"))) / 1000
        except ValueError:
            duration = None
    return HistoryEntry(
        apply_id=apply_id,
        started=started,
        before=tuple(_text(first.get("RUNTIME_MODULES_BEFORE")).split()),
        after=tuple(_text(last.get("RUNTIME_MODULES_AFTER")).split()),
        reason=_text(first.get("RUNTIME_MODULES_REASON")),
        result=_text(end.get("RUNTIME_MODULES_RESULT")) if end is not None else "in-progress",
        duration=duration,
        message=_text(last.get("MESSAGE")),
    )


def _text(value: object) -> str:
    """A journal JSON field as text: journalctl gives bytes as a list of ints, repeats as a list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return bytes(v & 0xFF for v in value).decode("utf-8", "replace")
        return _text(value[-1]) if value else ""
    return "" if value is None else str(value)


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: give a number of applies, 1 or more")
    given = [flag for dest, flag in IGNORED_SETTINGS.items() if getattr(args, dest, None)]
    if given:
        print(
            f"runtime-modules: note: {' and '.join(given)} "
            f"{'selects' if len(given) == 1 else 'select'} nothing here: history lists "
            f"every apply in this machine's journal with SYSLOG_IDENTIFIER={args.identifier}; "
            "narrow it with --since or --identifier",
            file=sys.stderr,
        )
    entries = read_history(identifier=args.identifier, since=args.since)[-args.limit :]
    if args.json:
        print_json([e.to_json() for e in entries])
        return int(ExitCode.OK)
    if not entries:
        hint = "" if os.geteuid() == 0 else " (run as root or a member of systemd-journal)"
        print(f"no applies in the journal{hint}")
        return int(ExitCode.OK)
    print(f"{'TIME':<19}  {'RESULT':<15}  {'TOOK':>6}  CHANGE  [WHY]")
    for e in entries:
        when = datetime.fromtimestamp(e.started).strftime("%Y-%m-%d %H:%M:%S")
        took = format_duration(e.duration) if e.duration is not None else "-"
        change = f"{_set_text(e.before)} -> {_set_text(e.after)}"
        # One line per apply: a long reason (a pasted rule list) is cut; --json has it whole.
        # Escaped before it is cut, so that the cut never splits an escape.
        reason = escape_controls(e.reason)
        reason = reason if len(reason) <= REASON_WIDTH else reason[: REASON_WIDTH - 1] + "…"
        why = f"  [{reason}]" if reason else ""
        print(f"{when:<19}  {e.result:<15}  {took:>6}  {change}{why}")
    return int(ExitCode.OK)


def _set_text(names: Sequence[str]) -> str:
    return ",".join(names) if names else "(base)"
