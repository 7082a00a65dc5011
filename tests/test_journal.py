"""Journal entries, read back from the real systemd-journald with journalctl -o json."""

from __future__ import annotations

import io
import os
import re
import uuid
from pathlib import Path

import pytest

from runtime_modules._errors import ConfigError
from runtime_modules._journal import Journal, JournalEvent, Priority, field_name
from tests.fixtures.system import REPO, journal_entries

REQUIRED = {
    "APPLY_STARTED",
    "APPLY_SUCCEEDED",
    "APPLY_FAILED",
    "APPLY_ROLLED_BACK",
    "ROLLBACK_FAILED",
    "APPLY_VETOED",
    "APPLY_OUTPUT",
    "APPLY_SCHEDULED",
    "RULE_ACTIVATED",
    "RULE_LINGERING",
    "RULE_DEACTIVATED",
    "RULES_RELOADED",
    "RULES_REJECTED",
    "OVERRIDE_SET",
    "OVERRIDE_CLEARED",
    "OVERRIDE_EXPIRED",
    "DAEMON_STARTED",
    "DAEMON_STOPPING",
    "WORLD_RESYNCED",
    "EVENT_RECEIVED",
    "STATE_RECOVERED",
    "SYSTEM_DRIFTED",
}


def test_every_event_has_its_own_128_bit_id() -> None:
    assert {e.name for e in JournalEvent} >= REQUIRED
    ids = [e.message_id for e in JournalEvent]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_docs_list_every_message_id() -> None:
    doc = (REPO / "docs" / "applier.md").read_text(encoding="utf-8")
    for e in JournalEvent:
        assert f"`{e.name}`" in doc and e.message_id in doc, e.name


def test_entries_reach_journald_with_fields(journald: Path, journal_tag: str) -> None:
    journal = Journal(identifier=journal_tag, min_priority=Priority.DEBUG)
    apply_id = uuid.uuid4().hex
    journal.send(
        JournalEvent.APPLY_STARTED,
        "applying: enable gaming",
        apply_id=apply_id,
        before=frozenset(),
        after=frozenset({"podman", "gaming"}),
        duration_ms=12,
        skipped=None,
    )
    journal.send(JournalEvent.APPLY_ROLLED_BACK, "rolled back", apply_id=apply_id)
    entries = journal_entries(RUNTIME_MODULES_APPLY_ID=apply_id)
    assert [e["MESSAGE_ID"] for e in entries] == [
        JournalEvent.APPLY_STARTED.message_id,
        JournalEvent.APPLY_ROLLED_BACK.message_id,
    ]
    first = entries[0]
    assert first["MESSAGE"] == "applying: enable gaming"
    assert first["SYSLOG_IDENTIFIER"] == journal_tag
    assert first["PRIORITY"] == str(int(Priority.INFO))
    assert first["RUNTIME_MODULES_BEFORE"] == ""
    assert first["RUNTIME_MODULES_AFTER"] == "gaming podman"
    assert first["RUNTIME_MODULES_DURATION_MS"] == "12"
    assert "RUNTIME_MODULES_SKIPPED" not in first
    assert entries[1]["PRIORITY"] == str(int(Priority.WARNING))


def test_multiline_and_binary_ish_values_survive(journald: Path, journal_tag: str) -> None:
    journal = Journal(identifier=journal_tag)
    apply_id = uuid.uuid4().hex
    text = 'line one\nline "two" ${x} \\ \x01'
    journal.send(JournalEvent.APPLY_OUTPUT, text, apply_id=apply_id, hook_output=text)
    (entry,) = journal_entries(RUNTIME_MODULES_APPLY_ID=apply_id)
    # journalctl -o json renders a value with control characters as a list of bytes.
    message = entry["MESSAGE"]
    if isinstance(message, list):
        message = bytes(message).decode()
    assert message == text


def test_min_priority_drops_less_important_entries(journald: Path, journal_tag: str) -> None:
    journal = Journal(identifier=journal_tag, min_priority=Priority.INFO)
    apply_id = uuid.uuid4().hex
    journal.send(JournalEvent.EVENT_RECEIVED, "a uevent", apply_id=apply_id)  # debug
    journal.send(JournalEvent.DAEMON_STARTED, "started", apply_id=apply_id)
    entries = journal_entries(RUNTIME_MODULES_APPLY_ID=apply_id)
    assert [e["MESSAGE"] for e in entries] == ["started"]


def test_without_journald_the_line_goes_to_stderr(tmp_path: Path) -> None:
    err = io.StringIO()
    journal = Journal(socket_path=tmp_path / "missing.socket", stderr=err)
    assert not journal.connected
    journal.send(
        JournalEvent.APPLY_FAILED,
        "could not enable gaming",
        apply_id="a1",
        after=frozenset({"b", "a"}),
        reason="by hand\nreally",
    )
    assert err.getvalue() == (
        'runtime-modules: could not enable gaming [APPLY_ID=a1 AFTER="a b" '
        'REASON="by hand\\nreally"]\n'
    )


def test_priority_parse() -> None:
    assert Priority.parse("debug") is Priority.DEBUG
    assert Priority.parse("WARN") is Priority.WARNING
    assert Priority.parse("error") is Priority.ERR
    assert Priority.parse("3") is Priority.ERR
    with pytest.raises(ConfigError, match="RUNTIME_MODULES_LOG_LEVEL"):
        Priority.parse("loud")


def test_field_names() -> None:
    assert field_name("apply_id") == "RUNTIME_MODULES_APPLY_ID"
    with pytest.raises(ValueError):
        field_name("bad-name")


def test_a_name_that_is_not_utf8_reaches_journald_escaped(journald: Path, journal_tag: str) -> None:
    journal = Journal(identifier=journal_tag)
    apply_id = uuid.uuid4().hex
    name = os.fsdecode(b"caf\xe9")  # a hook file name that is not UTF-8: a lone surrogate
    journal.send(JournalEvent.HOOK_FAILED, f"{name} failed", apply_id=apply_id, hook=name)
    (entry,) = journal_entries(RUNTIME_MODULES_APPLY_ID=apply_id)
    assert entry["MESSAGE"] == "caf\\udce9 failed"
    assert entry["RUNTIME_MODULES_HOOK"] == "caf\\udce9"
