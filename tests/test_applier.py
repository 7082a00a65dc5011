"""The applier against the fake nixos-rebuild (which evaluates with the real nix) and fake systems.

Every failure mode ends with: the system on a known set (the previous one after a rollback), the
state file telling the truth, one clear line for the user, and the details in the journal/log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runtime_modules._applier import Applier, ApplyOutcome, ApplyResult
from runtime_modules._errors import ConfigError, LockBusyError, StateError, UnknownModuleError
from runtime_modules._flake import FLAKE_LOCK, FLAKE_NIX
from runtime_modules._journal import Journal, JournalEvent
from runtime_modules._lock import ApplyLock
from runtime_modules._process import process_alive
from runtime_modules._runner import JOURNAL_OUTPUT_LINES, LOG_HEAD_BYTES, LOG_TAIL_BYTES
from runtime_modules._state import InProgress, ModuleStatus, load_state, save_state
from tests.fakes.fakesystem import make_system
from tests.fixtures.applier import FakeSystem, Tmpfs
from tests.fixtures.system import REPO, journal_entries


def _applier(fake: FakeSystem, **kwargs: Any) -> Applier:
    kwargs.setdefault("journal", fake.journal())
    return Applier(fake.settings, fake.registry(), **kwargs)


def _assert_consistent(fake: FakeSystem, outcome: ApplyOutcome) -> None:
    """The state says what runs, and nothing is left in progress."""
    state = load_state(fake.settings)
    assert state.in_progress is None
    assert state.applied == outcome.after
    assert state.last_apply is not None and state.last_apply.apply_id == outcome.apply_id
    assert state.last_apply.result is outcome.result
    assert sorted(fake.current_imports()) == sorted(outcome.after)
    assert "\n" not in outcome.message


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_enable_reaches_nix_and_switches(fake_system: FakeSystem) -> None:
    applier = _applier(fake_system)
    lines: list[str] = []
    outcome = applier.apply(frozenset({"gaming", "podman"}), reason="test", on_output=lines.append)
    assert outcome.result is ApplyResult.SUCCEEDED, outcome.message
    assert outcome.after == {"gaming", "podman"}
    assert outcome.system_before == str(fake_system.initial_system)
    assert outcome.system_after == str(fake_system.current())
    assert outcome.system_after != outcome.system_before
    (start,) = fake_system.records("start")
    assert start["argv"] == ["build", "--flake", f"path:{fake_system.settings.flake_dir}#testhost"]
    assert start["cwd"] == str(fake_system.settings.state_dir / "build")  # its `result` link
    # Phase 2 is ours: the built system's activation, run once, with `test`.
    (switch,) = fake_system.records("switch")
    assert (switch["system"], switch["action"]) == (outcome.system_after, "test")
    # Exactly the enabled modules' imports reached Nix, through extendModules.
    assert fake_system.current_imports() == ["gaming", "podman"]
    assert any("activating" in line for line in lines)
    _assert_consistent(fake_system, outcome)
    state = load_state(fake_system.settings)
    assert state.module_status("gaming").status is ModuleStatus.ENABLED
    assert state.module_status("virtualization").status is ModuleStatus.DISABLED
    assert outcome.log_path is not None and "activating" in outcome.log_path.read_text()


def test_flake_and_lock_stay_between_applies(fake_system: FakeSystem) -> None:
    applier = _applier(fake_system)
    applier.apply(frozenset({"gaming"}), reason="one")
    flake_dir = fake_system.settings.flake_dir
    text, lock = (flake_dir / FLAKE_NIX).read_bytes(), (flake_dir / FLAKE_LOCK).read_bytes()
    outcome = applier.apply(frozenset({"podman"}), reason="two")
    assert outcome.result is ApplyResult.SUCCEEDED
    assert (flake_dir / FLAKE_NIX).read_bytes() == text
    assert (flake_dir / FLAKE_LOCK).read_bytes() == lock
    assert fake_system.current_imports() == ["podman"]


def test_no_change_no_rebuild_unless_forced(fake_system: FakeSystem) -> None:
    applier = _applier(fake_system)
    applier.apply(frozenset({"gaming"}), reason="first")
    unchanged = applier.apply(frozenset({"gaming"}), reason="again")
    assert unchanged.result is ApplyResult.UNCHANGED
    assert unchanged.message == "nothing to do: gaming already applied"
    assert len(fake_system.records("start")) == 1
    forced = applier.apply(frozenset({"gaming"}), reason="rebuild", force=True)
    assert forced.result is ApplyResult.SUCCEEDED
    assert forced.message.startswith("rebuilt with gaming")
    assert len(fake_system.records("start")) == 2


def test_unknown_module_is_refused_before_anything(fake_system: FakeSystem) -> None:
    with pytest.raises(UnknownModuleError, match="did you mean 'gaming'"):
        _applier(fake_system).apply(frozenset({"gamin"}), reason="typo")
    assert not fake_system.settings.state_file.exists()


def test_failure_rolls_back_to_the_previous_system(fake_system: FakeSystem) -> None:
    applier = _applier(fake_system)
    applier.apply(frozenset({"gaming"}), reason="first")
    previous = fake_system.current()
    fake_system.control(mode="fail-after-switch")  # it switched, then failed: must go back
    outcome = applier.apply(frozenset({"gaming", "podman"}), reason="second")
    assert outcome.result is ApplyResult.FAILED
    assert outcome.after == {"gaming"}
    assert fake_system.current() == previous
    switches = fake_system.records("switch")
    assert switches[-1]["system"] == str(previous) and switches[-1]["action"] == "test"
    assert outcome.message.startswith(
        "could not enable podman: switch-to-configuration test of "
        f"{switches[-2]['system']} exited with status 4"
    )
    assert f"rolled back to {previous}; full log: {outcome.log_path}" in outcome.message
    _assert_consistent(fake_system, outcome)
    state = load_state(fake_system.settings)
    assert state.module_status("podman").status is ModuleStatus.FAILED
    assert state.module_status("podman").message == outcome.message
    assert state.module_status("gaming").status is ModuleStatus.ENABLED
    # A later success that changes podman clears its failure.
    fake_system.control()
    assert applier.apply(frozenset({"gaming", "podman"}), reason="retry").ok
    assert load_state(fake_system.settings).module_status("podman").status is ModuleStatus.ENABLED


def test_a_broken_flake_fails_in_nix_and_rolls_back(fake_system: FakeSystem) -> None:
    # The registry offers a module the base system does not define: the real evaluation fails.
    fake_system.write_registry(
        [{"name": n} for n in ("gaming", "podman", "ghost")], base_modules=["gaming", "podman"]
    )
    outcome = _applier(fake_system).apply(frozenset({"ghost"}), reason="ghost")
    assert outcome.result is ApplyResult.FAILED
    assert outcome.log_path is not None
    assert 'defines no runtime module "ghost"' in outcome.log_path.read_text()
    assert fake_system.current() == fake_system.initial_system
    _assert_consistent(fake_system, outcome)


def test_timeout_kills_the_build_and_touches_nothing(fake_system: FakeSystem) -> None:
    fake_system.settings = fake_system.settings.with_(apply_timeout=1.0)
    fake_system.control(mode="hang")
    start = time.monotonic()
    outcome = _applier(fake_system).apply(frozenset({"gaming"}), reason="hang")
    assert time.monotonic() - start < 8
    assert outcome.result is ApplyResult.TIMED_OUT
    assert "nixos-rebuild build timed out after 1 s and was killed" in outcome.message
    assert "the running system was not touched" in outcome.message
    (hang,) = fake_system.records("hang")
    assert not process_alive(hang["child"], None)  # the rebuild's child died with it
    assert fake_system.records("switch") == []  # the build changed nothing: nothing to undo
    _assert_consistent(fake_system, outcome)
    assert load_state(fake_system.settings).module_status("gaming").status is ModuleStatus.FAILED


@pytest.mark.parametrize("phase", ["build", "activation"])
def test_a_sigkilled_phase_fails_and_only_activation_rolls_back(
    fake_system: FakeSystem, phase: str
) -> None:
    fake_system.control(**({"mode": "sigkill"} if phase == "build" else {"switch": "sigkill"}))
    outcome = _applier(fake_system).apply(frozenset({"podman"}), reason="kill")
    assert outcome.result is ApplyResult.FAILED
    assert "was killed by signal SIGKILL" in outcome.message
    name = "nixos-rebuild build" if phase == "build" else "switch-to-configuration test of"
    assert f"could not enable podman: {name}" in outcome.message
    systems = [r["system"] for r in fake_system.records("switch")]
    if phase == "build":
        assert systems == []
    else:  # the built system's activation, killed; then the previous one's: the rollback
        assert len(systems) == 2 and systems[0] != systems[1] == str(fake_system.initial_system)
    _assert_consistent(fake_system, outcome)


def test_a_rollback_is_never_cut_off_by_the_build_timeout(fake_system: FakeSystem) -> None:
    # The previous system's activation takes longer than --timeout allows the build: the
    # rollback must still run to its end, never be killed half-way.
    (fake_system.initial_system / "switch-mode").write_text("sleep:2")
    fake_system.control(switch="fail")
    s = fake_system.settings.with_(apply_timeout=1.0)
    outcome = Applier(s, fake_system.registry(), journal=fake_system.journal()).apply(
        frozenset({"podman"}), reason="slow rollback"
    )
    assert outcome.result is ApplyResult.FAILED, outcome.message
    assert f"rolled back to {fake_system.initial_system}" in outcome.message
    assert fake_system.records("switched")[-1]["system"] == str(fake_system.initial_system)
    _assert_consistent(fake_system, outcome)


def test_ten_megabytes_of_output_are_capped(fake_system: FakeSystem) -> None:
    fake_system.control(mode="fail", output_mb=10)
    seen = 0

    def count(line: str) -> None:
        nonlocal seen
        seen += 1

    start = time.monotonic()
    outcome = _applier(fake_system).apply(frozenset({"gaming"}), reason="chatty", on_output=count)
    assert time.monotonic() - start < 30
    assert outcome.result is ApplyResult.FAILED
    assert seen > 80_000  # the caller saw every line (10 MiB of ~120-byte lines)
    assert "builder for" in outcome.message  # the last line explains, not the flood
    assert outcome.log_path is not None
    log = outcome.log_path.read_bytes()
    assert len(log) < LOG_HEAD_BYTES + LOG_TAIL_BYTES + 64 * 1024
    assert b"lines (" in log and b"omitted" in log
    assert b"error: builder for" in log  # the end is kept
    # journald is absent here, and the caller shows the lines: none went to stderr twice.
    assert fake_system.stderr.getvalue().count("chatty.drv") == 0
    _assert_consistent(fake_system, outcome)


def test_output_to_the_journal_is_capped(fake_system: FakeSystem) -> None:
    fake_system.control(output_mb=3)  # ~30,000 lines
    outcome = _applier(fake_system).apply(frozenset({"gaming"}), reason="chatty")
    assert outcome.ok
    lines = fake_system.stderr.getvalue().splitlines()
    output = [ln for ln in lines if "chatty.drv" in ln]
    assert len(output) == JOURNAL_OUTPUT_LINES
    assert any("more lines of output are not in the journal" in ln for ln in lines)


def test_rollback_failure_is_reported_and_forces_the_next_apply(fake_system: FakeSystem) -> None:
    applier = _applier(fake_system)
    fake_system.switch_fails()  # the activation fails, and so does the rollback's
    outcome = applier.apply(frozenset({"gaming"}), reason="double fault")
    assert outcome.result is ApplyResult.ROLLBACK_FAILED
    assert "rolling back to" in outcome.message and "failed too" in outcome.message
    assert "run `runtime-modules rebuild`" in outcome.message
    state = load_state(fake_system.settings)
    assert state.uncertain is not None and state.applied == frozenset()
    fake_system.control()
    fake_system.switch_fails(False)
    again = applier.apply(frozenset(), reason="repair")  # same set, but the state is uncertain
    assert again.result is ApplyResult.SUCCEEDED
    assert load_state(fake_system.settings).uncertain is None


def _cancelled_once(fake_system: FakeSystem, when: Callable[[], bool]) -> ApplyOutcome:
    """Apply gaming in a thread, set its cancel event once ``when`` holds, and return the end."""
    cancel = threading.Event()
    result: list[ApplyOutcome] = []
    thread = threading.Thread(
        target=lambda: result.append(
            _applier(fake_system).apply(frozenset({"gaming"}), reason="stop", cancel=cancel)
        )
    )
    thread.start()
    _wait_for(when)
    cancel.set()
    thread.join(15)
    (outcome,) = result
    return outcome


def test_cancel_stops_the_build_and_touches_nothing(fake_system: FakeSystem) -> None:
    fake_system.control(mode="hang")
    outcome = _cancelled_once(fake_system, lambda: bool(fake_system.records("hang")))
    assert outcome.result is ApplyResult.CANCELLED
    assert "nixos-rebuild build was stopped on request" in outcome.message
    assert not process_alive(fake_system.records("hang")[0]["child"], None)
    assert fake_system.records("switch") == []
    _assert_consistent(fake_system, outcome)


def test_busy_lock_names_its_holder(fake_system: FakeSystem) -> None:
    lock = ApplyLock(fake_system.settings.lock_file)
    lock.acquire(apply_id="holder-42", command="runtime-modules daemon")
    try:
        with pytest.raises(LockBusyError) as exc:
            _applier(fake_system).apply(frozenset({"gaming"}), reason="x", wait=False)
        message = str(exc.value)
        assert f"pid {os.getpid()} (runtime-modules daemon), apply holder-42, since" in message
        cancel = threading.Event()
        cancel.set()
        waited = _applier(fake_system).apply(frozenset({"gaming"}), reason="x", cancel=cancel)
        assert waited.result is ApplyResult.CANCELLED and waited.after == frozenset()
    finally:
        lock.release()
    assert fake_system.records("start") == []


def test_a_target_function_sees_what_is_applied_under_the_lock(fake_system: FakeSystem) -> None:
    applier = _applier(fake_system)
    applier.apply(frozenset({"gaming"}), reason="first")
    outcome = applier.apply(lambda applied: applied | {"podman"}, reason="add")
    assert outcome.after == {"gaming", "podman"}
    # A module the registry dropped is dropped from what is applied.
    fake_system.write_registry([{"name": "podman"}, {"name": "virtualization"}])
    outcome = _applier(fake_system).apply(lambda applied: applied, reason="same")
    assert outcome.result is ApplyResult.SUCCEEDED and outcome.after == {"podman"}


def test_a_system_switched_by_hand_makes_the_next_apply_rebuild(fake_system: FakeSystem) -> None:
    applier = _applier(fake_system)
    applier.apply(frozenset({"gaming"}), reason="first")
    fake_system.link.unlink()
    fake_system.link.symlink_to(fake_system.initial_system)  # `nixos-rebuild switch` by hand
    outcome = applier.apply(frozenset({"gaming"}), reason="same set")
    assert outcome.result is ApplyResult.SUCCEEDED
    assert fake_system.current_imports() == ["gaming"]


def test_dry_run_writes_the_flake_but_neither_runs_nor_records(fake_system: FakeSystem) -> None:
    save_state(fake_system.settings, load_state(fake_system.settings).with_(uncertain="x"))
    before = fake_system.settings.state_file.read_bytes()
    dry = _applier(fake_system, dry_run=True)
    outcome = dry.apply(frozenset({"gaming"}), reason="dry")
    assert outcome.result is ApplyResult.DRY_RUN
    assert outcome.message.startswith("dry run: would enable gaming")
    assert fake_system.records() == []
    enabled = json.loads((fake_system.settings.flake_dir / "enabled.json").read_text())
    assert enabled == {"host": "testhost", "modules": ["gaming"]}
    # The state file describes the real system, which did not change.
    assert fake_system.settings.state_file.read_bytes() == before
    again = dry.apply(frozenset({"gaming"}), reason="dry")
    assert again.result is ApplyResult.UNCHANGED  # a daemon in dry-run mode does not loop
    # The real apply that follows is not fooled into UNCHANGED.
    real = _applier(fake_system).apply(frozenset({"gaming"}), reason="real")
    assert real.result is ApplyResult.SUCCEEDED
    assert fake_system.current_imports() == ["gaming"]
    assert load_state(fake_system.settings).uncertain is None


def test_dry_run_with_an_unwritable_flake_dir_says_so(fake_system: FakeSystem) -> None:
    fake_system.settings.state_dir.mkdir(parents=True, exist_ok=True)
    fake_system.settings.flake_dir.write_text("a file, not a folder")
    outcome = _applier(fake_system, dry_run=True).apply(frozenset({"gaming"}), reason="dry")
    assert outcome.result is ApplyResult.FAILED
    assert f"cannot write the generated flake in {fake_system.settings.flake_dir}" in (
        outcome.message
    )


def test_a_missing_nixos_rebuild_fails_without_a_rollback(fake_system: FakeSystem) -> None:
    fake_system.settings = fake_system.settings.with_(nixos_rebuild=("/nonexistent/nixos-rebuild",))
    outcome = _applier(fake_system).apply(frozenset({"gaming"}), reason="t")
    assert outcome.result is ApplyResult.FAILED
    assert "nixos-rebuild build could not be started" in outcome.message
    assert "RUNTIME_MODULES_NIXOS_REBUILD" in outcome.message
    assert "rolled back" not in outcome.message
    assert fake_system.records("switch") == []  # the running system was not re-activated
    _assert_consistent(fake_system, outcome)


def test_no_current_system_stops_before_any_hook_or_journal_entry(
    fake_system: FakeSystem,
) -> None:
    hook = fake_system.settings.hooks_dir / "pre-apply.d" / "10-mark"
    hook.parent.mkdir(parents=True)
    hook.write_text(f"#!/bin/sh\ntouch {fake_system.root / 'hook-ran'}\n")
    hook.chmod(0o755)
    fake_system.link.unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        _applier(fake_system).apply(frozenset({"gaming"}), reason="t")
    assert not (fake_system.root / "hook-ran").exists()
    assert "applying" not in fake_system.stderr.getvalue()


def test_cancel_during_activation_waits_for_it_and_ends_normally(fake_system: FakeSystem) -> None:
    fake_system.control(switch="sleep:1")
    outcome = _cancelled_once(fake_system, lambda: bool(fake_system.records("switch")))
    assert outcome.result is ApplyResult.SUCCEEDED
    assert [r["system"] for r in fake_system.records("switched")] == [outcome.system_after]
    _assert_consistent(fake_system, outcome)


def test_an_activation_past_its_bound_is_not_killed(
    fake_system: FakeSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runtime_modules._applier.ACTIVATION_REPORT_AFTER", 0.3)
    fake_system.settings = fake_system.settings.with_(apply_timeout=0.5)
    fake_system.control(switch="sleep:1")
    outcome = _applier(fake_system).apply(frozenset({"gaming"}), reason="slow")
    assert outcome.result is ApplyResult.SUCCEEDED
    assert "the activation runs for more than 0.3 s; it is not stopped" in (
        fake_system.stderr.getvalue()
    )


def test_a_hand_switch_during_a_failed_activation_is_not_rolled_back(
    fake_system: FakeSystem,
) -> None:
    by_hand = make_system(
        fake_system.systems_dir,
        imports=[],
        record_file=fake_system.record_file,
        link=fake_system.link,
        control_dir=fake_system.control_file.parent,
    )
    fake_system.control(switch="fail-later:1")
    result: list[ApplyOutcome] = []
    thread = threading.Thread(
        target=lambda: result.append(
            _applier(fake_system).apply(frozenset({"gaming"}), reason="raced")
        )
    )
    thread.start()
    _wait_for(lambda: fake_system.records("switch"))
    # Someone's `nixos-rebuild switch` finishes while our activation runs, which then fails.
    fake_system.link.unlink()
    fake_system.link.symlink_to(by_hand)
    thread.join(15)
    (outcome,) = result
    assert outcome.result is ApplyResult.FAILED
    assert "switched by hand meanwhile and is not rolled back" in outcome.message
    assert len(fake_system.records("switch")) == 1  # no rollback ran
    assert fake_system.current() == by_hand
    state = load_state(fake_system.settings)
    assert state.uncertain is not None and state.applied == frozenset()


def test_read_only_state_dir_stops_before_anything_runs(
    fake_system: FakeSystem, tmpfs: Tmpfs
) -> None:
    fake_system.settings = fake_system.settings.with_(state_dir=tmpfs.path / "state")
    applier = _applier(fake_system)
    applier.apply(frozenset({"gaming"}), reason="first")
    before = fake_system.settings.state_file.read_bytes()
    tmpfs.remount("ro")
    with pytest.raises(StateError, match="read-only file system; remount it read-write"):
        applier.apply(frozenset({"podman"}), reason="second")
    assert fake_system.settings.state_file.read_bytes() == before
    assert len(fake_system.records("start")) == 1


def test_full_state_dir_stops_before_anything_runs(fake_system: FakeSystem, tmpfs: Tmpfs) -> None:
    fake_system.settings = fake_system.settings.with_(state_dir=tmpfs.path / "state")
    applier = _applier(fake_system)
    applier.apply(frozenset({"gaming"}), reason="first")
    before = fake_system.settings.state_file.read_bytes()
    tmpfs.fill()
    with pytest.raises(StateError, match="is full; free some space"):
        applier.apply(frozenset({"gaming", "podman"}), reason="second")
    assert fake_system.settings.state_file.read_bytes() == before
    assert len(fake_system.records("start")) == 1
    assert fake_system.current_imports() == ["gaming"]


_KILLED_APPLIER = """
import sys
from runtime_modules._applier import Applier
from runtime_modules._journal import Journal
from runtime_modules._registry import load_registry
from runtime_modules._settings import Settings
from pathlib import Path
settings = Settings(
    registry=Path(sys.argv[1]), state_dir=Path(sys.argv[2]), current_system=Path(sys.argv[3]),
    hooks_dir=Path(sys.argv[4]), nixos_rebuild=tuple(sys.argv[5:]),
)
journal = Journal(socket_path=Path("/nonexistent"))
Applier(settings, load_registry(settings.registry), journal=journal).apply(
    frozenset({"gaming"}), reason="to be killed")
"""


def _hanging_applier(fake: FakeSystem) -> subprocess.Popen[bytes]:
    """Another process, applying {gaming} with a rebuild that hangs; returns once it hangs."""
    fake.control(mode="hang")
    proc = _applier_process(fake)
    _wait_for(lambda: fake.records("hang"))
    s = fake.settings
    _wait_for(lambda: (ip := load_state(s).in_progress) is not None and ip.rebuild_pgid is not None)
    return proc


def _applier_process(fake: FakeSystem) -> subprocess.Popen[bytes]:
    """Another process, applying {gaming} (to be killed)."""
    s = fake.settings
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLED_APPLIER,
            str(s.registry),
            str(s.state_dir),
            str(s.current_system),
            str(s.hooks_dir),
            *s.nixos_rebuild,
        ],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )


def test_recover_after_the_applier_was_killed(fake_system: FakeSystem) -> None:
    s = fake_system.settings
    proc = _hanging_applier(fake_system)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (hang,) = fake_system.records("hang")
    assert process_alive(hang["child"], None)  # the orphaned rebuild still runs, holding the lock
    fake_system.control()
    outcome = _applier(fake_system).recover()
    assert outcome is not None
    assert outcome.result is ApplyResult.FAILED
    assert "was interrupted: its process" in outcome.message
    # Killed while building: nothing was activated, so nothing is switched back either.
    assert "while building; the running system was not touched; full log: " in outcome.message
    _wait_for(lambda: not process_alive(hang["child"], None), timeout=5)
    assert fake_system.records("switch") == []
    assert os.path.realpath(s.current_system) == str(fake_system.initial_system)
    state = load_state(s)
    assert state.in_progress is None and state.applied == frozenset()
    assert state.module_status("gaming").status is ModuleStatus.FAILED
    assert _applier(fake_system).recover() is None
    # And the machine works again.
    assert _applier(fake_system).apply(frozenset({"gaming"}), reason="again").ok


def test_recover_after_the_applier_was_killed_while_activating(fake_system: FakeSystem) -> None:
    s = fake_system.settings
    fake_system.control(switch="sleep:1")  # the activation outlives its applier, never killed
    proc = _applier_process(fake_system)
    _wait_for(lambda: fake_system.records("switch"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    fake_system.control()
    outcome = _applier(fake_system).recover()  # waits for the activation's lock, then repairs
    assert outcome is not None and outcome.result is ApplyResult.FAILED
    assert "was interrupted: its process" in outcome.message
    assert f"; rolled back to {fake_system.initial_system}; full log: " in outcome.message
    first, back = fake_system.records("switched")
    assert first["system"] != back["system"] == str(fake_system.initial_system)
    state = load_state(s)
    assert state.in_progress is None and state.applied == frozenset()
    assert state.module_status("gaming").status is ModuleStatus.FAILED
    assert state.last_apply is not None and state.last_apply.reason == "to be killed"
    assert state.last_apply.duration >= 1  # the apply's whole span, from its own start


def test_a_waiting_apply_outlives_a_holder_that_dies(fake_system: FakeSystem) -> None:
    proc = _hanging_applier(fake_system)
    result: list[ApplyOutcome] = []
    waiter = threading.Thread(
        target=lambda: result.append(
            _applier(fake_system).apply(frozenset({"podman"}), reason="waits")
        )
    )
    waiter.start()
    time.sleep(0.3)
    assert not result  # it waits for the lock
    fake_system.control()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    waiter.join(15)
    (outcome,) = result
    assert outcome.result is ApplyResult.SUCCEEDED
    assert not process_alive(fake_system.records("hang")[0]["child"], None)
    state = load_state(fake_system.settings)
    assert state.applied == {"podman"}
    assert state.module_status("gaming").status is ModuleStatus.FAILED  # the interrupted one
    assert fake_system.current_imports() == ["podman"]


def test_an_apply_finds_an_interrupted_one_and_rolls_it_back_first(
    fake_system: FakeSystem,
) -> None:
    applier = _applier(fake_system)
    applier.apply(frozenset({"gaming"}), reason="first")
    state = load_state(fake_system.settings)
    # What a SIGKILL between "in progress" and the end leaves: the record, a dead pid.
    save_state(
        fake_system.settings,
        state.with_(
            in_progress=InProgress(
                apply_id="dead-1",
                pid=2**22 + 1,  # above pid_max's default: no such process
                pid_start=None,
                started=time.time(),
                reason="killed",
                before=frozenset({"gaming"}),
                target=frozenset({"gaming", "virtualization"}),
                system_before=str(fake_system.current()),
            )
        ),
    )
    outcome = applier.apply(frozenset({"gaming", "podman"}), reason="next")
    assert outcome.result is ApplyResult.SUCCEEDED
    state = load_state(fake_system.settings)
    assert state.module_status("virtualization").status is ModuleStatus.FAILED
    assert state.applied == {"gaming", "podman"}


def test_journal_entries_of_one_apply(
    fake_system: FakeSystem, journald: Path, journal_tag: str
) -> None:
    applier = _applier(fake_system, journal=Journal(identifier=journal_tag))
    ok = applier.apply(frozenset({"gaming"}), reason="journal test")
    entries = journal_entries(RUNTIME_MODULES_APPLY_ID=ok.apply_id)
    ids = [e["MESSAGE_ID"] for e in entries]
    assert ids[0] == JournalEvent.APPLY_STARTED.message_id
    assert ids[-1] == JournalEvent.APPLY_SUCCEEDED.message_id
    assert JournalEvent.APPLY_OUTPUT.message_id in ids
    done = entries[-1]
    assert done["SYSLOG_IDENTIFIER"] == journal_tag
    assert done["RUNTIME_MODULES_BEFORE"] == ""
    assert done["RUNTIME_MODULES_AFTER"] == "gaming"
    assert done["RUNTIME_MODULES_RESULT"] == "succeeded"
    assert done["RUNTIME_MODULES_REASON"] == "journal test"
    assert done["RUNTIME_MODULES_SYSTEM_BEFORE"] == str(fake_system.initial_system)
    assert done["RUNTIME_MODULES_SYSTEM_AFTER"] == str(fake_system.current())
    assert int(done["RUNTIME_MODULES_DURATION_MS"]) >= 0

    fake_system.control(switch="fail")
    bad = applier.apply(frozenset({"gaming", "podman"}), reason="journal fail")
    ids = [e["MESSAGE_ID"] for e in journal_entries(RUNTIME_MODULES_APPLY_ID=bad.apply_id)]
    failed = ids.index(JournalEvent.APPLY_FAILED.message_id)
    assert ids.index(JournalEvent.APPLY_ROLLED_BACK.message_id) > failed
    entries = journal_entries(RUNTIME_MODULES_APPLY_ID=bad.apply_id)
    assert entries[failed]["RUNTIME_MODULES_PHASE"] == "activation"
    last = journal_entries(RUNTIME_MODULES_APPLY_ID=bad.apply_id)[-1]
    assert last["RUNTIME_MODULES_RESULT"] == "failed"
    assert last["RUNTIME_MODULES_AFTER"] == "gaming"
    assert last["MESSAGE"] == bad.message


@pytest.mark.parametrize("running", ["built", "by hand"])
def test_recovery_rolls_back_the_built_system_but_not_a_hand_switch(
    fake_system: FakeSystem, running: str
) -> None:
    def system() -> Path:
        return make_system(
            fake_system.systems_dir,
            imports=[],
            record_file=fake_system.record_file,
            link=fake_system.link,
            control_dir=fake_system.control_file.parent,
        )

    built, by_hand = system(), system()
    # What a SIGKILL during the activation leaves, the activation having finished (or someone
    # having run `nixos-rebuild switch` meanwhile).
    save_state(
        fake_system.settings,
        load_state(fake_system.settings).with_(
            in_progress=InProgress(
                apply_id="dead-2",
                pid=2**22 + 1,  # above pid_max's default: no such process
                pid_start=None,
                started=time.time(),
                reason="killed",
                before=frozenset(),
                target=frozenset({"gaming"}),
                system_before=str(fake_system.initial_system),
                built=str(built),
            )
        ),
    )
    fake_system.link.unlink()
    fake_system.link.symlink_to(built if running == "built" else by_hand)
    outcome = _applier(fake_system).recover()
    assert outcome is not None and outcome.result is ApplyResult.FAILED
    state = load_state(fake_system.settings)
    assert state.in_progress is None and state.applied == frozenset()
    if running == "built":
        assert "rolled back to" in outcome.message
        assert fake_system.current() == fake_system.initial_system
        assert state.uncertain is None
    else:
        assert "switched by hand meanwhile and is not rolled back" in outcome.message
        assert fake_system.records("switch") == []
        assert fake_system.current() == by_hand
        assert state.uncertain is not None
