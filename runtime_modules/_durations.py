"""Durations and times of day as users type them: ``--for 1h30m``, ``--until 18:00``.

Parsing is pure: the current time is an argument, never read here. Every bad input raises
``ConfigError`` with the format that is expected; nothing else escapes (the tests fuzz this).
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta

from ._errors import ConfigError

__all__ = ["MAX_DURATION", "format_duration", "parse_duration", "parse_until"]

# Units in the order they must appear; each at most once ("1h30m", "2d", "90m", "45s").
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
# ASCII digits only (``\d`` would take "٣"), nine at most so int() never sees a huge string.
_DURATION = re.compile(
    r"\s*(?:(?P<d>[0-9]{1,9})\s*d)?\s*(?:(?P<h>[0-9]{1,9})\s*h)?"
    r"\s*(?:(?P<m>[0-9]{1,9})\s*m)?\s*(?:(?P<s>[0-9]{1,9})\s*s)?\s*",
    re.ASCII,
)
_TIME_OF_DAY = re.compile(r"\s*([01]?[0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?\s*", re.ASCII)
# A pin longer than a year is a permanent one: say so instead of `--for`.
MAX_DURATION = 366 * 86400.0

_DURATION_HELP = "expected a duration like 2h, 90m, 1h30m, 45s or 1d (units d h m s, in that order)"
_UNTIL_HELP = (
    "expected a time of day like 18:00 (today, or tomorrow when it has passed) "
    "or an ISO date and time like 2026-05-01T18:00 or 2026-05-01T18:00+02:00"
)


def parse_duration(text: str) -> float:
    """Seconds in ``text`` ("2h", "90m", "1h30m", "45s", "1d").

    Raises:
        ConfigError: the text is not such a duration, is zero, or is longer than a year.
    """
    m = _DURATION.fullmatch(text)
    if m is None or not any(m.group(u) for u, _ in _UNITS):
        raise ConfigError(f"--for {text!r}: {_DURATION_HELP}")
    seconds = float(sum(int(m.group(u)) * factor for u, factor in _UNITS if m.group(u)))
    if seconds <= 0:
        raise ConfigError(f"--for {text!r}: the duration must be more than 0")
    if seconds > MAX_DURATION:
        raise ConfigError(
            f"--for {text!r}: longer than a year; leave out --for to pin until `auto`"
        )
    return seconds


def parse_until(text: str, now: datetime) -> datetime:
    """The moment ``text`` names, as an aware datetime after ``now`` (an aware datetime).

    "HH:MM" or "HH:MM:SS" is today in the local time zone, or tomorrow when that has passed.
    An ISO date and time without an offset is local time.

    Raises:
        ConfigError: the text is not such a time, or the ISO moment is not in the future.
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    try:
        if m := _TIME_OF_DAY.fullmatch(text):
            local_now = now.astimezone()
            tod = time(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
            # A naive datetime's astimezone() reads it as local time, DST included.
            moment = datetime.combine(local_now.date(), tod).astimezone()
            if moment <= now:
                moment = datetime.combine(local_now.date() + timedelta(days=1), tod).astimezone()
            return moment
        parsed = datetime.fromisoformat(text.strip())
        moment = parsed.astimezone() if parsed.tzinfo is None else parsed
        moment.timestamp()  # dates at the ends of the calendar fail here, not later
    except (ValueError, OverflowError, OSError):
        raise ConfigError(f"--until {text!r}: {_UNTIL_HELP}") from None
    if moment <= now:
        raise ConfigError(f"--until {text!r}: that moment has passed; give a time in the future")
    return moment


def format_duration(seconds: float) -> str:
    """``seconds`` the way ``parse_duration`` reads it, to the second ("1h30m", "45s", "0s")."""
    rest = max(0, round(seconds))
    parts = []
    for unit, factor in _UNITS:
        n, rest = divmod(rest, factor)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "0s"
