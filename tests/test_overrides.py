"""Overrides: the two-layer store, its files' recovery, expiry conversion, and --for/--until."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime_modules._errors import ConfigError, PermissionDeniedError, StateError
from runtime_modules._overrides import (
    MAX_FILE_BYTES,
    OverrideSource,
    OverrideState,
    OverrideStore,
    monotonic_deadline,
    parse_for,
    parse_until,
    until_from_flags,
)
from runtime_modules._reconciler import Reconciler
from runtime_modules._settings import Settings

REPO = Path(__file__).resolve().parents[1]
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
T0 = 1_800_000_000.0  # a fixed wall-clock "now" (2027-01-15)
ROOT = OverrideSource(uid=0, user="root", command="enable gaming")


@pytest.fixture
def warnings() -> list[str]:
    return []


@pytest.fixture
def store(tmp_path: Path, warnings: list[str]) -> OverrideStore:
    settings = Settings(state_dir=tmp_path / "run", persist_dir=tmp_path / "lib")
    return OverrideStore.from_settings(settings, warn=warnings.append)


# --- the store -----------------------------------------------------------------------------


def test_a_stuck_lock_holder_costs_an_error_not_a_hang(
    store: OverrideStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    import runtime_modules._overrides as overrides

    monkeypatch.setattr(overrides, "LOCK_PATIENCE", 0.2)  # 2 s in production
    store.set_paused(False, now=T0)  # makes the files and the lock
    lock = store.runtime_file.with_name(store.runtime_file.name + ".lock")
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's writer, stuck
        with pytest.raises(StateError, match=r"locked by another process for over 0\.2s"):
            store.set_paused(True, now=T0)
    finally:
        os.close(fd)
    assert store.set_paused(True, now=T0).paused  # free again: it works


def test_no_files_means_no_pins_and_no_warning(store: OverrideStore, warnings: list[str]) -> None:
    view = store.load(T0)
    assert dict(view.pins) == {}
    assert view.paused is False
    assert warnings == []


def test_pin_round_trips_through_the_runtime_file(store: OverrideStore) -> None:
    store.pin(
        ["gaming", "vm"], OverrideState.ON, until=T0 + 7200, source=ROOT, persist=False, now=T0
    )
    # A fresh store reads what the first wrote: nothing lives only in memory.
    view = OverrideStore(store.runtime_file, store.persistent_file).load(T0 + 1)
    assert set(view.pins) == {"gaming", "vm"}
    pin = view.pins["gaming"]
    assert (pin.state, pin.until, pin.created, pin.persistent) == (
        OverrideState.ON,
        T0 + 7200,
        T0,
        False,
    )
    assert pin.source == ROOT
    assert not store.persistent_file.exists()
    doc = json.loads(store.runtime_file.read_text())
    assert doc["version"] == 1
    # Wall-clock moments are written readable, with their offset.
    assert doc["overrides"]["gaming"]["until"] == "2027-01-15T10:00:00Z"


def test_runtime_pin_shadows_persistent_until_it_expires(store: OverrideStore) -> None:
    store.pin(["gaming"], OverrideState.OFF, until=None, source=ROOT, persist=True, now=T0)
    store.pin(["gaming"], OverrideState.ON, until=T0 + 60, source=ROOT, persist=False, now=T0)
    assert store.load(T0 + 59).pins["gaming"].state is OverrideState.ON
    after = store.load(T0 + 60).pins["gaming"]
    assert (after.state, after.persistent) == (OverrideState.OFF, True)


def test_persist_replaces_a_runtime_pin(store: OverrideStore) -> None:
    store.pin(["gaming"], OverrideState.ON, until=None, source=ROOT, persist=False, now=T0)
    view = store.pin(["gaming"], OverrideState.OFF, until=None, source=ROOT, persist=True, now=T0)
    assert view.pins["gaming"].state is OverrideState.OFF
    assert json.loads(store.runtime_file.read_text())["overrides"] == {}


def test_unpin_removes_both_layers(store: OverrideStore) -> None:
    store.pin(["gaming"], OverrideState.OFF, until=None, source=ROOT, persist=True, now=T0)
    store.pin(["gaming", "vm"], OverrideState.ON, until=None, source=ROOT, persist=False, now=T0)
    view = store.unpin(["gaming"], now=T0)
    assert set(view.pins) == {"vm"}
    assert json.loads(store.persistent_file.read_text())["overrides"] == {}


def test_expire_removes_passed_pins_and_reports_them(store: OverrideStore) -> None:
    store.pin(["a"], OverrideState.ON, until=T0 + 10, source=ROOT, persist=False, now=T0)
    store.pin(["b"], OverrideState.ON, until=T0 + 20, source=ROOT, persist=True, now=T0)
    store.pin(["c"], OverrideState.OFF, until=None, source=ROOT, persist=False, now=T0)
    assert store.load(T0).next_expiry() == T0 + 10
    gone, view = store.expire(T0 + 20)
    assert gone == ["a", "b"]
    assert set(view.pins) == {"c"}
    assert view.next_expiry() is None
    assert set(json.loads(store.runtime_file.read_text())["overrides"]) == {"c"}


def test_pause_keeps_its_modules_and_reset_keeps_nothing(store: OverrideStore) -> None:
    view = store.set_paused(True, now=T0, modules=["vm"])
    assert (view.paused, view.paused_modules) == (True, frozenset({"vm"}))
    assert store.set_paused(False, now=T0).paused_modules is None
    store.pin(["p"], OverrideState.ON, until=None, source=ROOT, persist=True, now=T0)
    store.pin(["r"], OverrideState.OFF, until=None, source=ROOT, persist=False, now=T0)
    view = store.reset(now=T0)
    assert (dict(view.pins), view.paused, view.paused_modules) == ({}, True, frozenset())
    fresh = OverrideStore(store.runtime_file, store.persistent_file).load(T0)
    assert (dict(fresh.pins), fresh.paused_modules) == ({}, frozenset())


def test_pause_is_runtime_only(store: OverrideStore) -> None:
    store.set_paused(True, now=T0)
    assert store.load(T0).paused is True
    # A persistent file that says paused (hand-written, or a future version) does not pause.
    store.runtime_file.unlink()
    store.persistent_file.parent.mkdir(parents=True, exist_ok=True)
    store.persistent_file.write_text('{"version": 1, "paused": true, "overrides": {}}')
    assert store.load(T0).paused is False
    store.set_paused(True, now=T0)
    assert store.set_paused(False, now=T0).paused is False


def test_clear_keeps_persistent_pins_unless_asked(store: OverrideStore) -> None:
    store.pin(["p"], OverrideState.ON, until=None, source=ROOT, persist=True, now=T0)
    store.pin(["r"], OverrideState.ON, until=None, source=ROOT, persist=False, now=T0)
    assert set(store.clear(now=T0).pins) == {"p"}
    assert dict(store.clear(now=T0, persistent=True).pins) == {}


def test_unknown_modules_are_left_out_but_kept(store: OverrideStore, warnings: list[str]) -> None:
    store.pin(["gone", "vm"], OverrideState.ON, until=None, source=ROOT, persist=False, now=T0)
    assert set(store.load(T0, known={"vm"}).pins) == {"vm"}
    assert "'gone'" in warnings[0] and "runtime-modules auto gone" in warnings[0]
    assert set(store.load(T0).pins) == {"gone", "vm"}


def test_concurrent_writers_lose_no_pin(store: OverrideStore) -> None:
    # Two writers in parallel: the lock makes each read-modify-write whole.
    def writer(prefix: str) -> None:
        for i in range(20):
            OverrideStore(store.runtime_file, store.persistent_file).pin(
                [f"{prefix}{i}"], OverrideState.ON, until=None, source=ROOT, persist=False, now=T0
            )

    threads = [threading.Thread(target=writer, args=(p,)) for p in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.load(T0).pins) == 40


# --- bad files -----------------------------------------------------------------------------

BAD_FILES = {
    "empty": b"",
    "blank": b"  \n",
    "truncated": b'{"version": 1, "overrides": {"gaming": {"state": "o',
    "binary": bytes(range(256)) * 4,
    "not an object": b"[1, 2]",
    "wrong version": b'{"version": 7, "overrides": {}}',
    "bad state": b'{"version": 1, "overrides": {"g": {"state": "maybe", "source": {"uid": 0, '
    b'"user": "root"}, "created": "2026-01-01T00:00:00Z"}}}',
    "bad name": b'{"version": 1, "overrides": {"a\\"b${x}": {"state": "on", "source": '
    b'{"uid": 0, "user": "root"}, "created": "2026-01-01T00:00:00Z"}}}',
    "naive time": b'{"version": 1, "overrides": {"g": {"state": "on", "source": {"uid": 0, '
    b'"user": "root"}, "created": "2026-01-01T00:00:00"}}}',
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_runtime_file_is_set_aside_with_a_warning(
    store: OverrideStore, warnings: list[str], content: bytes
) -> None:
    store.pin(["keep"], OverrideState.ON, until=None, source=ROOT, persist=True, now=T0)
    store.runtime_file.write_bytes(content)
    view = store.load(T0)
    assert set(view.pins) == {"keep"}  # the other layer is unaffected
    assert len(warnings) == 1
    assert str(store.runtime_file) in warnings[0]
    assert "ignoring its overrides" in warnings[0]
    aside = list(store.runtime_file.parent.glob("overrides.json.bad-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == content
    assert aside[0].name in warnings[0]
    # And the store works on: the next change writes a good file.
    store.pin(["new"], OverrideState.OFF, until=None, source=ROOT, persist=False, now=T0)
    assert set(store.load(T0).pins) == {"keep", "new"}


def test_huge_file_is_not_read_whole(store: OverrideStore, warnings: list[str]) -> None:
    store.runtime_file.parent.mkdir(parents=True)
    with store.runtime_file.open("wb") as f:
        f.truncate(64 * MAX_FILE_BYTES)  # sparse: cheap to make, huge to read
    assert dict(store.load(T0).pins) == {}
    assert "over 1024 KiB" in warnings[0]


def test_only_a_few_bad_copies_are_kept(store: OverrideStore, warnings: list[str]) -> None:
    store.runtime_file.parent.mkdir(parents=True)
    for _ in range(8):
        store.runtime_file.write_bytes(b"\0")
        store.load(T0)
    assert len(list(store.runtime_file.parent.glob("overrides.json.bad-*"))) == 5


def test_unreadable_file_warns_and_does_not_crash(
    store: OverrideStore, warnings: list[str]
) -> None:
    store.runtime_file.mkdir(parents=True)  # a directory where the file should be: EISDIR
    assert dict(store.load(T0).pins) == {}
    assert "cannot read overrides" in warnings[0]


def test_full_disk_leaves_the_previous_file(store: OverrideStore, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)]
    proc = subprocess.run(mount, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        small = OverrideStore(mnt / "overrides.json", mnt / "p.json")
        small.pin(["a"], OverrideState.ON, until=None, source=ROOT, persist=False, now=T0)
        before = (mnt / "overrides.json").read_bytes()
        (mnt / "filler").write_bytes(b"x" * 12 * 1024)
        big = OverrideSource(uid=0, user="root", command="x" * 4096)
        with pytest.raises(StateError, match="cannot write overrides: No space"):
            small.pin(
                [f"m{i}" for i in range(40)],
                OverrideState.ON,
                until=None,
                source=big,
                persist=False,
                now=T0,
            )
        assert (mnt / "overrides.json").read_bytes() == before
        assert [p.name for p in mnt.iterdir() if p.name.endswith(".tmp")] == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_file_in_place_of_a_directory_is_named(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    persistent = OverrideStore(tmp_path / "run" / "overrides.json", afile / "overrides.json")
    with pytest.raises(ConfigError) as info:
        persistent.pin(["a"], OverrideState.ON, until=None, source=ROOT, persist=True, now=T0)
    assert str(info.value) == (
        f"{afile / 'overrides.json'}: cannot write overrides: {afile} or a folder above it is a "
        "file, not a directory; give a directory with RUNTIME_MODULES_PERSIST_DIR (default "
        "/var/lib/runtime-modules), or move the file"
    )
    runtime = OverrideStore(afile / "run" / "overrides.json", tmp_path / "lib" / "overrides.json")
    with pytest.raises(ConfigError) as info:
        runtime.pin(["a"], OverrideState.ON, until=None, source=ROOT, persist=False, now=T0)
    assert str(info.value) == (
        f"{afile / 'run' / 'overrides.json.lock'}: cannot write overrides: {afile / 'run'} or a "
        "folder above it is a file, not a directory; give a directory with --state-dir or "
        "RUNTIME_MODULES_STATE_DIR (default /run/runtime-modules), or move the file"
    )


def test_unprivileged_writer_gets_a_clear_message() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to write as nobody")
    code = (
        "import sys; from pathlib import Path\n"
        "from runtime_modules._overrides import OverrideStore\n"
        "s = OverrideStore(Path(sys.argv[1]) / 'overrides.json', Path(sys.argv[1]) / 'p.json')\n"
        "try:\n"
        "    s.set_paused(True, now=0.0)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    # A directory nobody may enter and list but not write, as /run/runtime-modules is.
    run = Path(tempfile.mkdtemp(prefix="rmovr-", dir="/tmp"))
    try:
        run.chmod(0o755)
        proc = subprocess.run(
            [
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                sys.executable,
                "-c",
                code,
                str(run),
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        )
    finally:
        shutil.rmtree(run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(PermissionDeniedError.__name__)
    assert "overrides.json.lock: changing overrides needs root; run the command with sudo" in (
        proc.stdout
    )


# --- clocks --------------------------------------------------------------------------------


def test_monotonic_deadline_keeps_the_remaining_time() -> None:
    assert monotonic_deadline(T0 + 90, wall_now=T0, mono_now=5000.0) == 5090.0
    assert monotonic_deadline(T0 - 1, wall_now=T0, mono_now=5000.0) == 4999.0


def test_reconciler_takes_the_store_on_its_own_clock(store: OverrideStore) -> None:
    """Precedence on a virtual clock: the pin wins until it expires, then the rules have it."""
    store.pin(["gaming"], OverrideState.ON, until=T0 + 7200, source=ROOT, persist=False, now=T0)
    store.pin(["vm"], OverrideState.OFF, until=None, source=ROOT, persist=True, now=T0)
    mono = 100.0  # the reconciler's clock reads 100 when the wall clock reads T0
    overrides, paused = store.load(T0).reconciler_inputs(wall_now=T0, mono_now=mono)
    assert overrides.overrides["gaming"].until == mono + 7200
    assert overrides.overrides["vm"].until is None
    assert overrides.overrides["vm"].source == "root (uid 0): enable gaming (persistent)"
    assert paused.paused is False
    rec = Reconciler()
    rec.handle(overrides, mono)
    rec.handle(paused, mono)
    wanted = rec.snapshot(mono + 1).wanted
    assert "gaming" in wanted and "vm" not in wanted
    actions = rec.tick(mono + 7200)
    assert [type(a).__name__ for a in actions if type(a).__name__ == "OverrideExpired"] == [
        "OverrideExpired"
    ]
    assert "gaming" not in rec.snapshot(mono + 7200).wanted  # no rule wants it
    gone, view = store.expire(T0 + 7200)
    assert gone == ["gaming"] and set(view.pins) == {"vm"}


# --- --for and --until ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2h", 7200), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("1.5h", 5400), (" 1h 5s ", 3605)],
)
def test_for_durations(text: str, seconds: float) -> None:
    assert parse_for(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a duration; write e.g. 2h"),
        ("90", "give a unit: 90s, 90m or 90h"),
        ("-1h", "a duration cannot be negative; write e.g. 2h"),
        ("٣h", "not a duration; write e.g. 2h"),
        ("0m", "more than 0 seconds"),
        ("8d", "not a duration"),
        ("200h", "at most a week; for longer, use --until"),
    ],
)
def test_bad_for_says_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^--for {text!r}: .*{message}"):
        parse_for(text)


@given(st.text(max_size=40) | st.from_regex(r"[0-9 .hms]{0,30}", fullmatch=True))
def test_for_parser_raises_only_its_error(text: str) -> None:
    try:
        seconds = parse_for(text)
    except ConfigError as exc:
        assert str(exc).startswith("--for ")
    else:
        assert 0 < seconds <= 7 * 86400


def test_until_from_flags() -> None:
    assert until_from_flags(None, None, now=T0) is None
    assert until_from_flags("2h", None, now=T0) == T0 + 7200
    assert until_from_flags(None, "2027-01-15T10:00:00+00:00", now=T0) == T0 + 7200
    with pytest.raises(ConfigError, match="not both"):
        until_from_flags("2h", "18:00", now=T0)


@given(st.text(max_size=40))
def test_until_parser_raises_only_its_error(text: str) -> None:
    now = datetime.fromtimestamp(T0, UTC)
    try:
        moment = parse_until(text, now)
    except ConfigError as exc:
        assert str(exc).startswith("--until ")
    else:
        assert moment > now


def test_until_time_of_day_is_today_or_tomorrow() -> None:
    now = datetime(2026, 5, 1, 12, 0).astimezone()
    later = parse_until("18:00", now)
    assert later - now == timedelta(hours=6)
    earlier = parse_until("09:30", now)
    assert earlier - now == timedelta(hours=21, minutes=30)
    assert parse_until("12:00", now) - now == timedelta(days=1)  # "now" has passed


def test_until_iso_moment() -> None:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_until("2026-05-01T18:00+00:00", now) == datetime(2026, 5, 1, 18, tzinfo=UTC)
    assert parse_until("2026-05-02 06:00Z", now) == datetime(2026, 5, 2, 6, tzinfo=UTC)
    naive = parse_until("2026-05-03T08:00", now)
    assert naive == datetime(2026, 5, 3, 8).astimezone()  # local time


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("25:00", "expected a time of day like 18:00"),
        ("6pm", "expected a time of day like 18:00"),
        ("2026-13-01T00:00", "expected a time of day like 18:00"),
        ("2026-04-30T00:00Z", "has passed"),
        ("2027-05-03T00:00Z", "more than a year from now"),
        ("9999-12-31T23:59:59-14:00", "more than a year from now"),  # past year 9999 in UTC
    ],
)
def test_bad_until_says_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_until(text, datetime(2026, 5, 1, 12, 0, tzinfo=UTC))
