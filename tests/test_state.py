"""The state file: atomic writes, recovery from bad files, read-only and full state dirs."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import MappingProxyType

import pytest

from runtime_modules._errors import StateError
from runtime_modules._journal import Journal
from runtime_modules._settings import Settings
from runtime_modules._state import (
    MAX_STATE_BYTES,
    ApplyRecord,
    ApplyResult,
    InProgress,
    ModuleState,
    ModuleStatus,
    State,
    load_state,
    save_state,
)
from tests.fixtures.applier import Tmpfs


def _settings(state_dir: Path) -> Settings:
    return Settings(state_dir=state_dir)


def _journal(tmp_path: Path, err: io.StringIO) -> Journal:
    return Journal(socket_path=tmp_path / "no-journal", stderr=err)


def _full_state() -> State:
    return State(
        applied=frozenset({"gaming", "podman"}),
        modules=MappingProxyType(
            {
                "gaming": ModuleState(status=ModuleStatus.ENABLED, since=1.5),
                "virt": ModuleState(status=ModuleStatus.FAILED, message='x "y"\n', since=2.0),
            }
        ),
        last_apply=ApplyRecord(
            apply_id="a1",
            started=10.0,
            duration=2.5,
            result=ApplyResult.ROLLBACK_FAILED,
            reason="enable virt",
            before=frozenset({"gaming"}),
            after=frozenset({"gaming", "podman"}),
            target=frozenset({"gaming", "podman", "virt"}),
            system_before="/nix/store/a",
            system_after="/nix/store/b",
            log_path="/run/runtime-modules/logs/a1.log",
            message="could not …",
        ),
        in_progress=InProgress(
            apply_id="a2",
            pid=123,
            pid_start=456,
            started=11.0,
            reason="r",
            before=frozenset(),
            target=frozenset({"gaming"}),
            system_before="/nix/store/a",
            rebuild_pgid=789,
        ),
        uncertain="because",
    )


def test_missing_file_is_the_empty_state(tmp_path: Path) -> None:
    assert load_state(_settings(tmp_path / "nope")) == State()


def test_round_trip_and_sorted_file(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "state")
    state = _full_state()
    save_state(settings, state)
    assert load_state(settings) == state
    data = json.loads(settings.state_file.read_text())
    assert data["applied"] == ["gaming", "podman"]
    assert data["last_apply"]["target"] == ["gaming", "podman", "virt"]
    assert data["version"] == 1
    assert oct(settings.state_file.stat().st_mode & 0o777) == "0o644"
    # Only the state file is left: the temp file was renamed over it.
    assert sorted(p.name for p in settings.state_dir.iterdir()) == ["state.json"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the file is empty"),
        (b"   \n", "the file is empty"),
        (b'{"applied": ["gam', "not valid JSON"),
        (bytes(range(256)) * 4, "not valid JSON"),
        (b"[1, 2]", "no version field"),
        (b'{"version": 1, "applied": 7}', "applied"),
        (b'{"version": 99}', "state version 99"),
        (b'{"version": 1, "last_apply": {"result": "exploded"}}', "last_apply"),
        (b'{"version": 1, "x": "' + b"a" * MAX_STATE_BYTES + b'"}', "over 4 MiB"),
        (b'{"version": 1, "applied": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deeply"),
    ],
    ids=[
        "empty",
        "blank",
        "truncated",
        "binary",
        "not-object",
        "bad-type",
        "version",
        "enum",
        "huge",
        "deep",
    ],
)
def test_bad_state_file_warns_and_recovers(tmp_path: Path, content: bytes, problem: str) -> None:
    settings = _settings(tmp_path / "state")
    settings.state_dir.mkdir()
    settings.state_file.write_bytes(content)
    err = io.StringIO()
    state = load_state(settings, journal=_journal(tmp_path, err))
    assert state.applied == frozenset()
    assert state.uncertain is not None and "unknown" in state.uncertain
    warning = err.getvalue()
    assert warning.count("\n") == 1 and problem in warning
    assert "runtime-modules rebuild" in warning
    # The bad file is kept for a look, and a good state (marked uncertain) replaced it, so the
    # next reader does not warn again.
    assert (settings.state_dir / "state.json.corrupt").read_bytes() == content
    err2 = io.StringIO()
    assert load_state(settings, journal=_journal(tmp_path, err2)) == state
    assert err2.getvalue() == ""


def test_read_only_state_dir_gives_a_clear_error_and_keeps_the_state(tmpfs: Tmpfs) -> None:
    settings = _settings(tmpfs.path / "state")
    save_state(settings, State(applied=frozenset({"gaming"})))
    before = settings.state_file.read_bytes()
    tmpfs.remount("ro")
    with pytest.raises(StateError) as exc:
        save_state(settings, State(applied=frozenset({"podman"})))
    message = str(exc.value)
    assert str(settings.state_file) in message
    assert "read-only" in message and "remount it read-write" in message
    assert "previous state file is unchanged" in message
    assert settings.state_file.read_bytes() == before


def test_full_state_dir_gives_a_clear_error_and_keeps_the_state(tmpfs: Tmpfs) -> None:
    settings = _settings(tmpfs.path / "state")
    save_state(settings, State(applied=frozenset({"gaming"})))
    before = settings.state_file.read_bytes()
    tmpfs.fill()
    with pytest.raises(StateError, match="is full; free some space"):
        save_state(settings, _full_state())
    assert settings.state_file.read_bytes() == before
    # No temp file is left behind to eat what space there is.
    assert sorted(p.name for p in settings.state_dir.iterdir()) == ["state.json"]
    os.unlink(tmpfs.path / "filler")
    save_state(settings, _full_state())
    assert load_state(settings) == _full_state()


def test_recovery_on_a_read_only_dir_only_warns(tmpfs: Tmpfs, tmp_path: Path) -> None:
    settings = _settings(tmpfs.path / "state")
    settings.state_dir.mkdir()
    settings.state_file.write_bytes(b"garbage")
    tmpfs.remount("ro")
    err = io.StringIO()
    state = load_state(settings, journal=_journal(tmp_path, err))
    assert state.uncertain is not None
    assert "left in place" in err.getvalue()
    assert settings.state_file.read_bytes() == b"garbage"


def test_recovery_whose_write_fails_keeps_the_bad_file_and_the_uncertain_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path / "state")
    settings.state_dir.mkdir()
    settings.state_file.write_bytes(b"{garbage")

    def disk_full(*args: object) -> None:  # the disk fills between the copy and the write
        raise StateError("disk full")

    monkeypatch.setattr("runtime_modules._state.save_state", disk_full)
    err = io.StringIO()
    assert load_state(settings, journal=_journal(tmp_path, err)).uncertain is not None
    assert "left in place (disk full)" in err.getvalue()
    monkeypatch.undo()
    # The bad file is still there, so the next load recovers again: still uncertain.
    assert settings.state_file.read_bytes() == b"{garbage"
    assert load_state(settings, journal=_journal(tmp_path, io.StringIO())).uncertain is not None


def test_recovery_writes_only_under_the_apply_lock(tmp_path: Path) -> None:
    from runtime_modules._lock import ApplyLock

    settings = _settings(tmp_path / "state")
    settings.state_dir.mkdir()
    settings.state_file.write_bytes(b"{garbage")
    lock = ApplyLock(settings.lock_file)
    assert lock.acquire(apply_id="a", command="an apply")
    try:
        err = io.StringIO()
        assert load_state(settings, journal=_journal(tmp_path, err)).uncertain is not None
        assert "left in place (an apply holds the lock" in err.getvalue()
        assert settings.state_file.read_bytes() == b"{garbage"  # the apply will recover it
        # The holder itself recovers it.
        assert load_state(settings, journal=_journal(tmp_path, err), locked=True).uncertain
        assert settings.state_file.read_bytes() != b"{garbage"
    finally:
        lock.release()
