"""Globs: fnmatch on ASCII-case-folded strings, compiled once, bad patterns refused."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from runtime_modules._glob import Glob, compile_glob, fold, glob_error

# Characters that make globs interesting, plus letters of both cases and non-ASCII look-alikes.
_ALPHABET = st.sampled_from([*"aAbBzZ09:-_*?[]!/.^\\", "\u0130", "\u0131", "\u212a", "ß", "é", "É"])
patterns = st.text(_ALPHABET, max_size=10)
values = st.text(_ALPHABET, max_size=12)


def reference(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(fold(value), fold(pattern))


@given(patterns, values)
@example("10DE:*", "10de:1db2")
@example("[A-C]x", "bX")
@example("*a*", "BAB")
@example("a*", "A")
@example("*", "")
@example("[!a]", "A")
@example("[]]", "]")
@example("[a-c-e]", "-")
def test_agrees_with_fnmatch_on_folded_strings(pattern: str, value: str) -> None:
    if glob_error(pattern) is not None:
        with pytest.raises(ValueError, match="bad glob"):
            Glob(pattern)
        return
    assert Glob(pattern).match(value) == reference(pattern, value)


@given(values)
def test_fold_changes_only_ascii_letters(value: str) -> None:
    folded = fold(value)
    assert len(folded) == len(value)
    for a, b in zip(value, folded, strict=True):
        assert b == (a.lower() if "A" <= a <= "Z" else a)


def test_only_ascii_folds() -> None:
    # str.lower() would fold these; udev never does, so neither do we.
    assert not Glob("k").match("\u212a")  # KELVIN SIGN
    assert not Glob("i̇").match("İ")
    assert Glob("É").match("É") and not Glob("é").match("É")


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("[abc", "never closed"),
        ("PCI[", "never closed"),
        ("[!]", "never closed"),
        ("[z-a]", "range `z-a`"),
        ("[Z-a]", "range `z-a`"),  # ranges compare ignoring case
        ("x" * 5000, "longer than"),
    ],
)
def test_bad_globs_are_named(pattern: str, problem: str) -> None:
    error = glob_error(pattern)
    assert error is not None and problem in error


@pytest.mark.parametrize("pattern", ["", "*", "[[]", "[]]", "[a-]", "[a-c-a]", "a\\*", "[!a-z]"])
def test_unusual_but_valid(pattern: str) -> None:
    assert glob_error(pattern) is None


def test_literal_and_sharing() -> None:
    assert compile_glob("PCI").literal == "pci"
    assert compile_glob("pci*").literal is None
    assert compile_glob("10DE:*") is compile_glob("10DE:*")
    assert Glob("a") == Glob("a") and hash(Glob("a")) == hash(Glob("a")) and Glob("a") != Glob("A")
