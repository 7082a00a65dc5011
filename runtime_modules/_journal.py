"""Structured journald entries, one fixed MESSAGE_ID per kind of event.

Every entry carries ``SYSLOG_IDENTIFIER=runtime-modules``, the event's ``MESSAGE_ID``, a syslog
``PRIORITY`` and our own fields named ``RUNTIME_MODULES_<FIELD>``, so that
``journalctl RUNTIME_MODULES_APPLY_ID=…`` shows one apply and ``journalctl MESSAGE_ID=…`` one kind
of event. When no journald listens (no socket, e.g. a container or a test machine) the same line
goes to stderr as ``runtime-modules: <message> [KEY=value …]``, so nothing is ever lost silently.
"""

from __future__ import annotations

import enum
import json
import re
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from ._errors import ConfigError

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
IDENTIFIER = "runtime-modules"
FIELD_PREFIX = "RUNTIME_MODULES_"
# journald field names: upper-case letters, digits and "_", not starting with "_" or a digit,
# at most 64 characters (systemd.journal-fields(7)).
_FIELD_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


class Priority(enum.IntEnum):
    """syslog(3) priorities, as journald stores them in ``PRIORITY``."""

    EMERG = 0
    ALERT = 1
    CRIT = 2
    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7

    @classmethod
    def parse(cls, text: str) -> Priority:
        """A log level as users write it: a name (``info``, ``warn``, ``error``) or 0-7."""
        aliases = {"warn": "warning", "error": "err", "crit": "crit", "critical": "crit"}
        t = text.strip().lower()
        t = aliases.get(t, t)
        if t.isdigit() and 0 <= int(t) <= 7:
            return cls(int(t))
        try:
            return cls[t.upper()]
        except KeyError:
            names = ", ".join(p.name.lower() for p in cls)
            raise ConfigError(
                f"log level {text!r} is not one of {names} (or 0-7); "
                "set RUNTIME_MODULES_LOG_LEVEL to one of them"
            ) from None


class JournalEvent(enum.Enum):
    """Kinds of entries. Each value is the entry's MESSAGE_ID: generated once, never changed.

    The table in docs/applier.md lists them; users filter with ``journalctl MESSAGE_ID=…``.
    """

    # apply (the applier)
    APPLY_SCHEDULED = "7012ad140c6342c092861ca4a0eb7404"
    APPLY_STARTED = "11b0e2c0dc3b407d825e6d6e763ad3e9"
    APPLY_OUTPUT = "bba5378c8b65449da5632db36baaeb2f"
    APPLY_SUCCEEDED = "98fa49c24b4d4606a9a82158c9f062c8"
    APPLY_UNCHANGED = "a9701e61dfa646f1b97e7de2cb791431"
    APPLY_FAILED = "26e0d8652f204331adc237ce6d0a3e47"
    APPLY_ROLLED_BACK = "e7b6f1d0cdb141db87cf797e025be475"
    ROLLBACK_FAILED = "91aca7243e2940b7912a73aa55ec4de0"
    APPLY_VETOED = "9079821733dc4b3e9c1da01ea4c07801"
    HOOK_FINISHED = "a5e646486f9a4f3fbeeeabf694fff8af"
    HOOK_FAILED = "b621317b975445c5abee16325227a24f"
    STATE_RECOVERED = "7e12372a10a54cd19a24b476382755fa"
    STATE_WRITE_FAILED = "5e223714eb414d759ee347c3b75664e3"
    # rules (the daemon)
    RULE_ACTIVATED = "78f6c2c167514b2188a82afaac1ecb7e"
    RULE_LINGERING = "0347d38da78f499ebbc38cfd4fa7f05e"
    RULE_DEACTIVATED = "0d1864ca214449fc9aba91f588df7908"
    RULES_RELOADED = "df976ac22c5c454083b2164502c50bd6"
    RULES_REJECTED = "38dbb4338e2e47a6919467e48f6ceeb2"
    # overrides
    OVERRIDE_SET = "082bcd7cc3cb403099588f59a653c8b3"
    OVERRIDE_CLEARED = "420acbf87cbc40488957869b0b2b1660"
    OVERRIDE_EXPIRED = "ffef173e3df84e3f92e1fb4c420184fa"
    # daemon life
    DAEMON_STARTED = "d8a8c440a26444e08b03cc4288afff35"
    DAEMON_STOPPING = "52bb5f0006da461fa25b0cf82d58ecf1"
    WORLD_RESYNCED = "34572bfb69a84ff09bed35344efdaf52"
    UDEVD_NOT_RUNNING = "fb2f32c3e63d44779dde0aed4c9ebc9f"
    SYSTEM_DRIFTED = "ea8066cb350c4c8c81f17ec9f212b487"
    EVENT_RECEIVED = "31f331717a944ec2b30157c05c0baa12"

    @property
    def message_id(self) -> str:
        return self.value

    @property
    def default_priority(self) -> Priority:
        return _DEFAULT_PRIORITY.get(self, Priority.INFO)


_DEFAULT_PRIORITY = {
    JournalEvent.APPLY_FAILED: Priority.ERR,
    JournalEvent.ROLLBACK_FAILED: Priority.CRIT,  # the machine may be half-switched
    JournalEvent.APPLY_ROLLED_BACK: Priority.WARNING,
    JournalEvent.APPLY_VETOED: Priority.WARNING,
    JournalEvent.HOOK_FAILED: Priority.WARNING,
    JournalEvent.STATE_RECOVERED: Priority.WARNING,
    JournalEvent.STATE_WRITE_FAILED: Priority.ERR,
    JournalEvent.UDEVD_NOT_RUNNING: Priority.WARNING,
    JournalEvent.SYSTEM_DRIFTED: Priority.WARNING,
    JournalEvent.RULES_REJECTED: Priority.ERR,
    JournalEvent.APPLY_UNCHANGED: Priority.DEBUG,
    JournalEvent.EVENT_RECEIVED: Priority.DEBUG,
    JournalEvent.HOOK_FINISHED: Priority.DEBUG,
}


def field_name(name: str) -> str:
    """``apply_id`` -> ``RUNTIME_MODULES_APPLY_ID``; a bad name is a programming error."""
    full = FIELD_PREFIX + name.upper()
    if not _FIELD_NAME.match(full):
        raise ValueError(f"{name!r} cannot be a journal field name")
    return full


def render(value: object) -> str:
    """A field value as text: sets of names sorted and space-separated, like the hook env."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, frozenset | set):
        return " ".join(sorted(str(v) for v in value))
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


# What ends a line for str.splitlines(), a terminal or a log reader: escaped, so that one entry
# stays one line on stderr whatever a device or a rebuild put into its message.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def _stderr_value(text: str) -> str:
    # Keep each stderr entry on one line and unambiguous: quote what has spaces or controls.
    if text and all(c.isprintable() and not c.isspace() and c not in "\"'" for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class Journal:
    """Writes entries to journald, or to stderr when journald is absent.

    ``socket_path`` is only checked for presence (systemd-python always talks to the standard
    socket); tests point it at a missing file to exercise the stderr fallback. ``min_priority``
    drops entries less important than the daemon's log level.
    """

    def __init__(
        self,
        *,
        identifier: str = IDENTIFIER,
        socket_path: Path = JOURNAL_SOCKET,
        min_priority: Priority = Priority.INFO,
        stderr: TextIO | None = None,
    ) -> None:
        self.identifier = identifier
        self.socket_path = socket_path
        self.min_priority = min_priority
        self._stderr = stderr
        self._lock = threading.Lock()

    @classmethod
    def for_level(cls, level: str, *, identifier: str = IDENTIFIER) -> Journal:
        """A journal whose minimum priority is a log level as settings hold it."""
        return cls(identifier=identifier, min_priority=Priority.parse(level))

    @property
    def connected(self) -> bool:
        """True when journald is there to take entries (its socket exists)."""
        return self.socket_path.exists()

    def enabled_for(self, priority: Priority) -> bool:
        return priority <= self.min_priority

    def send(
        self,
        event: JournalEvent,
        message: str,
        *,
        priority: Priority | None = None,
        **fields: object,
    ) -> None:
        """Write one entry; ``fields`` become ``RUNTIME_MODULES_<FIELD>`` (None is left out)."""
        prio = event.default_priority if priority is None else priority
        if not self.enabled_for(prio):
            return
        pairs = [(field_name(k), render(v)) for k, v in fields.items() if v is not None]
        if self.connected and self._send_journald(event, message, prio, pairs):
            return
        self._send_stderr(message, pairs)

    def _send_journald(
        self, event: JournalEvent, message: str, prio: Priority, pairs: Iterable[tuple[str, str]]
    ) -> bool:
        try:
            import systemd.journal as sd_journal
        except ImportError:  # systemd-python missing: still say it, on stderr
            return False
        args = [
            f"MESSAGE={message}",
            f"MESSAGE_ID={event.message_id}",
            f"PRIORITY={int(prio)}",
            f"SYSLOG_IDENTIFIER={self.identifier}",
            *(f"{k}={v}" for k, v in pairs),
        ]
        # A name that is not UTF-8 (a hook file `caf\xe9`) arrives as surrogates: keep it
        # readable as backslash escapes rather than fail the apply that logs it.
        args = [a.encode("utf-8", "backslashreplace").decode("utf-8") for a in args]
        try:
            sd_journal.sendv(*args)
        except (OSError, ValueError):  # journald went away between the check and the send
            return False
        return True

    def _send_stderr(self, message: str, pairs: Iterable[tuple[str, str]]) -> None:
        extra = " ".join(f"{k.removeprefix(FIELD_PREFIX)}={_stderr_value(v)}" for k, v in pairs)
        line = f"{self.identifier}: {message}" + (f" [{extra}]" if extra else "")
        stream = self._stderr if self._stderr is not None else sys.stderr
        with self._lock:
            try:
                stream.write(line.translate(_LINE_BREAKS) + "\n")
                stream.flush()
            except (OSError, ValueError):  # stderr closed: nowhere left to say it
                pass
