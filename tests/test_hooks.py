"""Apply hooks: order, environment, stdin JSON, timeout, veto; and through the applier."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest

from runtime_modules._applier import Applier, ApplyResult
from runtime_modules._hooks import HookPhase, find_hooks, run_hooks
from runtime_modules._journal import Journal
from runtime_modules._process import process_alive
from runtime_modules._state import load_state
from tests.fixtures.applier import FakeSystem

PAYLOAD = {"apply_id": "a1", "before": [], "after": ["gaming"], "reason": "test"}
ENV = {
    "RUNTIME_MODULES_BEFORE": "",
    "RUNTIME_MODULES_AFTER": "gaming",
    "RUNTIME_MODULES_REASON": "test",
}


def _hook(hooks_dir: Path, phase: HookPhase, name: str, body: str, mode: int = 0o755) -> Path:
    folder = hooks_dir / phase.dirname
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def _journal(tmp_path: Path) -> tuple[Journal, io.StringIO]:
    err = io.StringIO()
    return Journal(socket_path=tmp_path / "no-journal", stderr=err), err


def test_order_environment_and_stdin(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    out = tmp_path / "out"
    out.mkdir()
    body = (
        f'cat > "{out}/$(basename "$0").json"\n'
        'printf "%s|%s|%s|%s|%s\\n" "$(basename "$0")" "$RUNTIME_MODULES_BEFORE" '
        '"$RUNTIME_MODULES_AFTER" "$RUNTIME_MODULES_REASON" "$RUNTIME_MODULES_PHASE" '
        f'>> "{out}/order"\n'
    )
    for name in ("b-second", "10-first", "a~", ".hidden", "2-third"):
        _hook(hooks, HookPhase.POST_APPLY, name, body)
    _hook(hooks, HookPhase.POST_APPLY, "not-executable", body, mode=0o644)
    journal, err = _journal(tmp_path)
    results = run_hooks(HookPhase.POST_APPLY, hooks, PAYLOAD, ENV, 10.0, journal)
    # Byte order, like run-parts: digits before letters, "10" before "2".
    assert [r.name for r in results] == ["10-first", "2-third", "b-second"]
    assert all(r.ok for r in results)
    assert (out / "order").read_text().splitlines() == [
        "10-first||gaming|test|post-apply",
        "2-third||gaming|test|post-apply",
        "b-second||gaming|test|post-apply",
    ]
    assert json.loads((out / "10-first.json").read_text()) == PAYLOAD
    assert "not-executable: not executable, skipped" in err.getvalue()


def test_a_failing_pre_hook_vetoes_and_stops_the_rest(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    _hook(hooks, HookPhase.PRE_APPLY, "1-ok", "exit 0\n")
    _hook(hooks, HookPhase.PRE_APPLY, "2-veto", "echo 'battery at 5%: not now' >&2\nexit 3\n")
    _hook(hooks, HookPhase.PRE_APPLY, "3-never", f"touch {tmp_path}/ran\n")
    journal, err = _journal(tmp_path)
    results = run_hooks(HookPhase.PRE_APPLY, hooks, PAYLOAD, ENV, 10.0, journal)
    assert [(r.name, r.returncode) for r in results] == [("1-ok", 0), ("2-veto", 3)]
    assert results[-1].describe() == "hook 2-veto exited with status 3: battery at 5%: not now"
    assert not (tmp_path / "ran").exists()
    assert "pre-apply hook 2-veto exited with status 3" in err.getvalue()


def test_post_hook_failures_do_not_stop_the_others(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    _hook(hooks, HookPhase.POST_APPLY, "1-fails", "exit 1\n")
    _hook(hooks, HookPhase.POST_APPLY, "2-runs", "exit 0\n")
    journal, _ = _journal(tmp_path)
    results = run_hooks(HookPhase.POST_APPLY, hooks, PAYLOAD, ENV, 10.0, journal)
    assert [r.ok for r in results] == [False, True]


def test_timeout_kills_the_hook_and_its_children(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    pidfile = tmp_path / "child.pid"
    _hook(hooks, HookPhase.PRE_APPLY, "slow", f"sleep 600 &\necho $! > {pidfile}\nwait\n")
    journal, _ = _journal(tmp_path)
    start = time.monotonic()
    (result,) = run_hooks(HookPhase.PRE_APPLY, hooks, PAYLOAD, ENV, 0.5, journal)
    assert time.monotonic() - start < 5
    assert result.timed_out and not result.ok
    # The configured timeout, not the measured duration rounded ("1 s"), and where it is set.
    assert result.timeout == 0.5
    assert result.describe() == (
        "hook slow timed out after 0.5 s and was killed (the hook timeout: "
        "RUNTIME_MODULES_HOOK_TIMEOUT, on NixOS services.runtimeModules.hooks.timeout)"
    )
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while process_alive(child, None) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_alive(child, None)


def test_a_hooks_leftover_children_are_killed_when_it_exits(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    pidfile = tmp_path / "child.pid"
    _hook(hooks, HookPhase.POST_APPLY, "forks", f"sleep 600 &\necho $! > {pidfile}\nexit 0\n")
    journal, _ = _journal(tmp_path)
    (result,) = run_hooks(HookPhase.POST_APPLY, hooks, PAYLOAD, ENV, 10.0, journal)
    assert result.ok and not result.timed_out
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while process_alive(child, None) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_alive(child, None)


def test_entries_that_cannot_run_are_named_with_what_to_do(tmp_path: Path) -> None:
    """Not only a missing `chmod +x`: a folder, a link to nothing, a fifo are said, not skipped
    silently; a link to an executable (as NixOS installs hooks) runs."""
    hooks = tmp_path / "hooks"
    folder = hooks / HookPhase.PRE_APPLY.dirname
    real = _hook(tmp_path / "store", HookPhase.PRE_APPLY, "real", "exit 0\n")
    folder.mkdir(parents=True)
    (folder / "10-linked").symlink_to(real)
    (folder / "20-package").mkdir()  # a whole package linked where its executable was meant
    (folder / "30-dangling").symlink_to(tmp_path / "gone" / "bin" / "x")
    os.mkfifo(folder / "40-fifo")
    _hook(hooks, HookPhase.PRE_APPLY, "50-plain", "exit 0\n")
    journal, err = _journal(tmp_path)
    assert find_hooks(hooks, HookPhase.PRE_APPLY, journal) == [
        folder / "10-linked",
        folder / "50-plain",
    ]
    said = err.getvalue()
    assert f"{folder}/20-package: a folder, not an executable, skipped" in said
    assert '"${pkg}/bin/<program>"' in said
    assert (
        f"{folder}/30-dangling: a link to {tmp_path}/gone/bin/x, which does not exist, skipped"
        in said
    )
    assert f"{folder}/40-fifo: not a regular file, skipped" in said
    assert "10-linked" not in said and "50-plain" not in said


def test_a_hook_that_ignores_stdin_and_a_missing_folder(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    journal, _ = _journal(tmp_path)
    assert run_hooks(HookPhase.PRE_APPLY, hooks, PAYLOAD, ENV, 1.0, journal) == []
    _hook(hooks, HookPhase.PRE_APPLY, "quiet", "exit 0\n")
    big = {**PAYLOAD, "padding": "x" * 1_000_000}  # more than a pipe buffer
    (result,) = run_hooks(HookPhase.PRE_APPLY, hooks, big, ENV, 5.0, journal)
    assert result.ok
    assert find_hooks(hooks, HookPhase.POST_APPLY) == []


def test_pre_hook_veto_through_the_applier(fake_system: FakeSystem) -> None:
    settings = fake_system.settings
    _hook(settings.hooks_dir, HookPhase.PRE_APPLY, "50-no", "echo 'on battery'\nexit 1\n")
    applier = Applier(settings, fake_system.registry(), journal=fake_system.journal())
    outcome = applier.apply(frozenset({"gaming"}), reason="test veto")
    assert outcome.result is ApplyResult.VETOED
    assert outcome.after == frozenset()
    assert "vetoed: hook 50-no exited with status 1: on battery" in outcome.message
    assert fake_system.records("start") == []  # nothing was rebuilt
    state = load_state(settings)
    assert state.last_apply is not None
    assert state.last_apply.result is ApplyResult.VETOED
    assert state.last_apply.message == outcome.message
    assert state.in_progress is None


def test_post_hook_sees_the_result(fake_system: FakeSystem) -> None:
    settings = fake_system.settings
    out = fake_system.root / "post.json"
    _hook(
        settings.hooks_dir,
        HookPhase.POST_APPLY,
        "notify",
        f'cat > {out}\necho "$RUNTIME_MODULES_RESULT $RUNTIME_MODULES_AFTER" > {out}.env\n',
    )
    pre_env = fake_system.root / "pre.env"
    _hook(
        settings.hooks_dir,
        HookPhase.PRE_APPLY,
        "check",
        f'echo "${{RUNTIME_MODULES_RESULT-unset}} $RUNTIME_MODULES_AFTER" > {pre_env}\n',
    )
    applier = Applier(settings, fake_system.registry(), journal=fake_system.journal())
    outcome = applier.apply(frozenset({"gaming", "podman"}), reason="post")
    assert outcome.result is ApplyResult.SUCCEEDED
    assert pre_env.read_text() == "unset gaming podman\n"
    assert Path(f"{out}.env").read_text() == "succeeded gaming podman\n"
    payload = json.loads(out.read_text())
    assert payload["result"] == "succeeded"
    assert payload["after"] == ["gaming", "podman"]
    assert payload["system_after"] == os.path.realpath(fake_system.link)

    fake_system.control(mode="fail")
    failed = applier.apply(frozenset({"gaming"}), reason="post fail")
    assert failed.result is ApplyResult.FAILED
    assert Path(f"{out}.env").read_text() == "failed gaming podman\n"  # rolled back: still both


def test_an_unreadable_hooks_folder_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # root reads any folder whatever its mode, so the refusal is simulated.
    _hook(tmp_path, HookPhase.PRE_APPLY, "10-x", "exit 0\n")

    def refuse(self: Path) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", refuse)
    journal, err = _journal(tmp_path)
    assert find_hooks(tmp_path, HookPhase.PRE_APPLY, journal) == []
    assert "cannot list the hooks (Permission denied)" in err.getvalue()


def test_a_hook_killed_by_a_signal_is_named_like_a_rebuild(tmp_path: Path) -> None:
    _hook(tmp_path, HookPhase.POST_APPLY, "10-dies", "kill -TERM $$\n")
    journal, _ = _journal(tmp_path)
    (result,) = run_hooks(HookPhase.POST_APPLY, tmp_path, PAYLOAD, ENV, 10.0, journal)
    assert result.describe() == "hook 10-dies was killed by signal SIGTERM"
