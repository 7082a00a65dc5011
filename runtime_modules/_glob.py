"""Shell globs as rules use them: ``fnmatch`` semantics on ASCII-case-folded text.

Device IDs are written both ways (``10DE:1DB2`` in ``PCI_ID``, ``0x10de`` in sysfs, ``17ef`` in
``ID_VENDOR_ID``), so a rule's pattern and the value it is matched against are both folded to
ASCII lower case first; then ``fnmatch.fnmatchcase(fold(value), fold(pattern))`` is the truth,
and ``Glob.match`` agrees with it on every string (the tests check this with hypothesis). Only
ASCII letters fold: ``str.lower`` would also fold ``"İ"`` and ``"K"`` (Kelvin), which udev never
does.

A pattern is compiled once, when its rule is loaded. Most patterns are literals or a literal
prefix (``10DE:*``), which are matched by string comparison instead of a regular expression:
evaluation runs on every uevent.
"""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache

__all__ = ["MAX_PATTERN", "Glob", "compile_glob", "fold", "glob_error", "is_magic"]

# Longer patterns are surely a mistake (a pasted file); the cap keeps compiled regexes small.
MAX_PATTERN = 4096

_ASCII_FOLD = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}
_MAGIC = frozenset("*?[")


def fold(text: str) -> str:
    """``text`` with ASCII letters in lower case and every other character unchanged."""
    # str.lower() is ASCII folding exactly when the text is ASCII, and much faster than translate.
    return text.lower() if text.isascii() else text.translate(_ASCII_FOLD)


def is_magic(pattern: str) -> bool:
    """True when ``pattern`` has a wildcard, i.e. is not matched by plain equality."""
    return not _MAGIC.isdisjoint(pattern)


def glob_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable glob, or None when it is.

    ``fnmatch`` accepts anything, but reads an unclosed ``[`` as a literal and silently drops a
    reversed range such as ``[z-a]``; in a rule both are typos that would make it never match.
    """
    if len(pattern) > MAX_PATTERN:
        return f"longer than {MAX_PATTERN} characters"
    folded = fold(pattern)
    i, n = 0, len(folded)
    while i < n:
        if folded[i] != "[":
            i += 1
            continue
        # The bracket grammar of fnmatch.translate: "[", optional "!", a leading "]" is literal.
        j = i + 1
        if j < n and folded[j] == "!":
            j += 1
        if j < n and folded[j] == "]":
            j += 1
        while j < n and folded[j] != "]":
            j += 1
        if j >= n:
            return "the `[` is never closed; to match a literal `[` write `[[]`"
        body = folded[i + 1 : j]
        if body.startswith("!"):
            body = body[1:]
        # Ranges are "x-y" where "-" is neither the first nor the last character of the set.
        k = 1
        while k < len(body) - 1:
            if body[k] != "-":
                k += 1
                continue
            if body[k - 1] > body[k + 1]:
                return (
                    f"the range `{body[k - 1]}-{body[k + 1]}` in `{pattern[i : j + 1]}` is "
                    "reversed and matches nothing (ranges compare ignoring case)"
                )
            k += 3  # as fnmatch: a "-" right after a range's end is a literal "-"
        i = j + 1
    return None


class Glob:
    """One compiled pattern. Equal and hashed by its text, so conditions can be indexed."""

    __slots__ = ("_kind", "_regex", "_text", "pattern")

    # How a folded value is tested, cheapest first.
    _LITERAL, _ANY, _PREFIX, _SUFFIX, _CONTAINS, _REGEX = range(6)

    def __init__(self, pattern: str) -> None:
        problem = glob_error(pattern)
        if problem is not None:
            raise ValueError(f"bad glob {pattern!r}: {problem}")
        self.pattern = pattern
        folded = fold(pattern)
        self._regex: re.Pattern[str] | None = None
        self._text = folded
        body = folded.strip("*")
        if not is_magic(folded):
            self._kind = Glob._LITERAL
        elif not body and folded:
            self._kind = Glob._ANY
        elif not is_magic(body) and folded.endswith("*") and not folded.startswith("*"):
            self._kind, self._text = Glob._PREFIX, body
        elif not is_magic(body) and folded.startswith("*") and not folded.endswith("*"):
            self._kind, self._text = Glob._SUFFIX, body
        elif not is_magic(body):
            self._kind, self._text = Glob._CONTAINS, body
        else:
            self._kind = Glob._REGEX
            self._regex = re.compile(fnmatch.translate(folded))

    @property
    def literal(self) -> str | None:
        """The folded text this pattern equals, when it has no wildcard."""
        return self._text if self._kind == Glob._LITERAL else None

    def match(self, value: str) -> bool:
        return self.match_folded(fold(value))

    def match_folded(self, folded: str) -> bool:
        """Match a value already passed through ``fold``."""
        kind = self._kind
        if kind == Glob._LITERAL:
            return folded == self._text
        if kind == Glob._ANY:
            return True
        if kind == Glob._PREFIX:
            return folded.startswith(self._text)
        if kind == Glob._SUFFIX:
            return folded.endswith(self._text)
        if kind == Glob._CONTAINS:
            return self._text in folded
        assert self._regex is not None
        return self._regex.match(folded) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Glob) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)

    def __repr__(self) -> str:
        return f"Glob({self.pattern!r})"

    def __str__(self) -> str:
        return self.pattern


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> Glob:
    """The compiled ``pattern`` (shared between rules that use the same text).

    Raises:
        ValueError: the pattern is not usable (see ``glob_error``).
    """
    return Glob(pattern)
