"""The module verbs of the CLI: list, status, enable, disable, reset, rebuild."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runtime_modules._cli import main
from runtime_modules._errors import ExitCode
from runtime_modules._lock import ApplyLock
from runtime_modules._overrides import OverrideStore
from runtime_modules._state import ModuleStatus, load_state
from tests.fixtures.applier import FakeSystem, Tmpfs
from tests.fixtures.system import REPO, eventually

LIST_KEYS = ["name", "description", "state", "applied"]
STATUS_KEYS = [
    "version",
    "host",
    "system",
    "applied",
    "modules",
    "last_apply",
    "in_progress",
    "lock",
    "uncertain",
    "warnings",
    "paused",
    "overrides",
    "daemon",
]
MODULE_KEYS = [*LIST_KEYS, "message", "since", "kernel_changes", "wanted", "why"]
RECORD_KEYS = [
    "apply_id",
    "started",
    "duration",
    "result",
    "reason",
    "before",
    "after",
    "target",
    "system_before",
    "system_after",
    "log_path",
    "message",
]


@pytest.fixture
def cli(fake_system: FakeSystem, journald: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
    """The fake machine, with the CLI's settings in the environment; journald runs."""
    for key, value in fake_system.env.items():
        monkeypatch.setenv(key, value)
    return fake_system


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_text_and_json(cli: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list")
    assert code == ExitCode.OK
    assert out.splitlines() == [
        "gaming          disabled  the gaming module",
        "podman          disabled  the podman module",
        "virtualization  disabled  the virtualization module",
    ]
    assert run(capsys, "enable", "podman")[0] == ExitCode.OK
    code, out, _ = run(capsys, "list", "--json")
    data = json.loads(out)
    assert list(data) == ["version", "host", "modules"]
    assert data["version"] == 1 and data["host"] == "testhost"
    assert [list(m) for m in data["modules"]] == [LIST_KEYS] * 3
    assert data["modules"][1] == {
        "name": "podman",
        "description": "the podman module",
        "state": "enabled",
        "applied": True,
    }


def test_status_json_shape(cli: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", "--json")
    data = json.loads(out)
    assert code == ExitCode.OK and list(data) == STATUS_KEYS
    assert data["last_apply"] is None and data["applied"] == []
    run(capsys, "enable", "gaming")
    code, out, _ = run(capsys, "status", "--json", "gaming")
    data = json.loads(out)
    assert [m["name"] for m in data["modules"]] == ["gaming"]
    assert list(data["modules"][0]) == MODULE_KEYS
    assert list(data["last_apply"]) == RECORD_KEYS
    assert data["last_apply"]["result"] == "succeeded"
    assert data["last_apply"]["after"] == ["gaming"]
    assert data["system"] == str(cli.current())
    assert data["lock"] is None and data["in_progress"] is None and data["warnings"] == []


def test_status_text_and_warnings(cli: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    cli.write_registry(
        [
            {"name": "gaming", "description": "g", "kernel_changes": ["boot.kernelModules"]},
            {"name": "podman"},
        ]
    )
    run(capsys, "enable", "gaming")
    cli.control(mode="fail")
    assert run(capsys, "enable", "podman")[0] == ExitCode.FAILURE
    lock = ApplyLock(cli.settings.lock_file)
    lock.acquire(apply_id="held-7", command="runtime-modules daemon")
    try:
        code, out, _ = run(capsys, "status")
    finally:
        lock.release()
    assert code == ExitCode.OK
    lines = out.splitlines()
    assert lines[1].startswith("no daemon is running")
    assert lines[2] == "applied: gaming"
    # Without a daemon, a module's why is its pin, if any (enable pinned both).
    assert lines[3] == "  gaming  enabled   wanted: pinned on by root (enable gaming)"
    assert lines[4].startswith("  podman  failed    wanted: pinned on by root (enable podman)")
    assert "(could not enable podman" in lines[4]
    assert "failed" in lines[5] and lines[6].startswith("  could not enable podman")
    assert any(f"applying now: apply held-7 by pid {os.getpid()}" in ln for ln in lines)
    assert any("gaming changes boot.kernelModules" in ln for ln in lines)


def test_unknown_module_suggests(cli: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    for verb in ("enable", "disable", "status"):
        code, out, err = run(capsys, verb, "gamng")
        assert code == ExitCode.USAGE and out == ""
        assert err == (
            "runtime-modules: unknown module 'gamng'; did you mean 'gaming'? "
            "(see `runtime-modules list`)\n"
        )
    assert cli.records() == []


def test_enable_disable_reset_rebuild(cli: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "enable", "gaming", "podman")
    assert code == ExitCode.OK
    assert out.startswith("enabled gaming, podman (apply ")
    assert "activating" in err  # the rebuild's output, streamed to stderr
    assert cli.current_imports() == ["gaming", "podman"]
    code, out, _ = run(capsys, "enable", "gaming")
    assert out == "nothing to do: gaming, podman already applied\n"
    code, out, _ = run(capsys, "disable", "gaming")
    assert out.startswith("disabled gaming")
    assert cli.current_imports() == ["podman"]
    code, out, _ = run(capsys, "rebuild")
    assert code == ExitCode.OK and out.startswith("rebuilt with podman")
    code, out, _ = run(capsys, "reset")
    assert out.startswith("disabled podman") and cli.current_imports() == []
    assert len(cli.records("start")) == 4
    state = load_state(cli.settings)
    assert state.last_apply is not None
    assert state.last_apply.reason == "reset (runtime-modules by root)"


def test_rebuild_takes_force_like_the_reference(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "enable", "podman")[0] == ExitCode.OK
    code, out, err = run(capsys, "rebuild", "--force")
    assert (code, out.startswith("rebuilt with podman")) == (ExitCode.OK, True), err
    assert len(cli.records("start")) == 2  # rebuilt: --force changes nothing, rebuild always does


def test_flags_before_and_after_the_verb(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = tmp_path / "other-state"
    assert run(capsys, "--state-dir", str(other), "enable", "gaming")[0] == ExitCode.OK
    assert load_state(cli.settings.with_(state_dir=other)).applied == {"gaming"}
    assert not cli.settings.state_file.exists()
    code, out, _ = run(capsys, "status", "--json", "--state-dir", str(other))
    assert code == ExitCode.OK and json.loads(out)["applied"] == ["gaming"]


def test_failures_exit_codes_and_one_line(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.control(switch="fail")  # the activation fails: rolled back
    code, out, err = run(capsys, "enable", "gaming")
    assert code == ExitCode.FAILURE and out == ""
    last = err.splitlines()[-1]
    assert last.startswith("runtime-modules: could not enable gaming: switch-to-configuration test")
    assert "rolled back to" in last and "full log: " in last

    cli.control(mode="fail")  # the build fails: nothing to roll back
    code, out, err = run(capsys, "enable", "gaming")
    assert code == ExitCode.FAILURE and out == ""
    last = err.splitlines()[-1]
    assert last.startswith("runtime-modules: could not enable gaming: nixos-rebuild build exited")
    assert "the running system was not touched" in last and "full log: " in last

    cli.control(mode="hang")
    code, _, err = run(capsys, "enable", "gaming", "--timeout", "1s")
    assert code == ExitCode.FAILURE
    assert "timed out after 1 s" in err.splitlines()[-1]

    cli.control()
    cli.switch_fails()  # the activation fails, and so does the rollback
    code, _, err = run(capsys, "enable", "podman")
    assert code == ExitCode.ROLLBACK_FAILED
    assert "run `runtime-modules rebuild`" in err.splitlines()[-1]
    cli.switch_fails(False)

    hooks = cli.settings.hooks_dir / "pre-apply.d"
    hooks.mkdir(parents=True)
    (hooks / "deny").write_text("#!/bin/sh\necho 'not on battery'\nexit 1\n")
    (hooks / "deny").chmod(0o755)
    code, _, err = run(capsys, "enable", "podman")
    assert code == ExitCode.VETOED
    assert err.splitlines()[-1].endswith(
        "on battery (%s); nothing changed; the pin of podman is recorded all the same, for the "
        "daemon to apply when it runs; `runtime-modules auto podman` removes it" % (hooks / "deny")
    )
    code, out, _ = run(capsys, "status", "--json")
    assert json.loads(out)["last_apply"]["result"] == "vetoed"


def test_a_direct_apply_that_cannot_start_says_the_pin_is_kept(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNTIME_MODULES_CURRENT_SYSTEM", str(cli.root / "no-such-system"))
    code, out, err = run(capsys, "enable", "gaming", "--for", "1h")
    assert (code, out) == (ExitCode.USAGE, "")
    (line,) = err.splitlines()
    assert "does not exist, so there would be no system to roll back to" in line
    assert line.endswith(
        "; the pin of gaming is recorded all the same, for the daemon to apply when it runs; "
        "`runtime-modules auto gaming` removes it"
    )
    assert cli.records() == []  # nothing ran
    code, out, _ = run(capsys, "status", "--json")
    assert [p["module"] for p in json.loads(out)["overrides"]] == ["gaming"]  # as it said
    assert run(capsys, "auto", "gaming")[0] == ExitCode.OK
    code, out, _ = run(capsys, "status", "--json")
    assert json.loads(out)["overrides"] == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "--timeout 'soon': not a duration; write e.g. 20m, 1h or 90s"),
        ("30", "--timeout '30': give a unit: 30s, 30m or 30h"),
        ("-1s", "--timeout '-1s': a duration cannot be negative; write e.g. 20m, 1h or 90s"),
        ("0m", "--timeout '0m': the duration must be more than 0 seconds; write e.g. 20m, 1h "
               "or 90s"),
        ("200h", "--timeout '200h': at most a week"),
    ],
)  # fmt: skip
def test_bad_timeout_is_a_usage_error(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    # As --for: the same parser, a negative value said as such (not argparse's "expected one
    # argument"), and nothing recorded.
    for argv in (["enable", "gaming", "--timeout", value], ["rebuild", f"--timeout={value}"]):
        code, out, err = run(capsys, *argv)
        assert (code, out, err) == (ExitCode.USAGE, "", f"runtime-modules: {message}\n")
    assert cli.records() == []
    code, out, _ = run(capsys, "status", "--json")
    assert json.loads(out)["overrides"] == []


def test_no_wait_names_the_holder(cli: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    lock = ApplyLock(cli.settings.lock_file)
    lock.acquire(apply_id="busy-1", command="runtime-modules enable podman")
    try:
        code, _, err = run(capsys, "enable", "gaming", "--no-wait")
    finally:
        lock.release()
    assert code == ExitCode.BUSY
    assert f"pid {os.getpid()} (runtime-modules enable podman), apply busy-1" in err
    assert "drop --no-wait" in err


def test_dry_run(cli: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "enable", "gaming", "--dry-run")
    assert code == ExitCode.OK and out.startswith("dry run: would enable gaming")
    assert out.endswith("; nothing recorded (would pin gaming on)\n")
    assert cli.records() == []
    # The state describes the real system, which a dry run leaves alone.
    assert load_state(cli.settings).module_status("gaming").status is not ModuleStatus.ENABLED
    assert load_state(cli.settings).applied == frozenset()


def test_a_dry_run_says_it_records_nothing(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str]
) -> None:
    store = OverrideStore.from_settings(cli.settings)
    code, out, _ = run(capsys, "disable", "podman", "--for", "2h", "--persist", "--dry-run")
    assert code == ExitCode.OK
    assert re.search(
        r"; nothing recorded \(would pin podman off until [-0-9: ]+ across reboots\)\n$", out
    )
    assert store.load(time.time()).pins == {}
    code, out, err = run(capsys, "reset", "--dry-run")
    assert code == ExitCode.OK
    assert out.endswith("; nothing recorded (would remove every pin and pause automation)\n")
    assert not store.load(time.time()).paused and "paused" not in err
    with pytest.raises(SystemExit):
        main(["enable", "--help"])
    assert "record nothing (no pin" in " ".join(capsys.readouterr().out.split())


def _cli_process(cli: FakeSystem, *argv: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, **cli.env}
    return subprocess.Popen(
        [sys.executable, "-m", "runtime_modules", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _opened(path: Path) -> Callable[[], bool]:
    """A check that turns true once someone opens ``path`` after this call (inotify IN_OPEN)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(fd, str(path).encode(), 0x20) >= 0  # IN_OPEN
    seen = []

    def check() -> bool:
        if not seen:
            with contextlib.suppress(BlockingIOError):
                seen.append(os.read(fd, 4096))
            if seen:
                os.close(fd)
        return bool(seen)

    return check


def test_two_concurrent_enables_take_turns_and_both_land(cli: FakeSystem) -> None:
    cli.hold()  # the first rebuild lasts until released: the two overlap on any load
    first = _cli_process(cli, "enable", "gaming")
    assert eventually(lambda: cli.records("waiting") != [])  # first builds, under the lock
    opened = _opened(cli.settings.lock_file)  # the first holds it open: a new open is second's
    second = _cli_process(cli, "enable", "podman")
    assert eventually(opened)  # the second tries the lock (and waits: it is taken)
    assert len(cli.records("start")) == 1  # and did not build beside the first
    cli.release()
    for proc in (first, second):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.OK, err
        assert out.startswith("enabled "), out
    runs = [(r["time"], r["event"]) for r in cli.records() if r["event"] in ("start", "end")]
    assert [e for _, e in sorted(runs)] == ["start", "end", "start", "end"]  # never two at once
    assert load_state(cli.settings).applied == {"gaming", "podman"}
    assert cli.current_imports() == ["gaming", "podman"]


def test_without_write_access_it_needs_root(cli: FakeSystem) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop the capabilities that bypass permissions")
    state_dir = cli.settings.state_dir
    state_dir.mkdir()
    os.chown(state_dir, 65534, 65534)  # nobody's: root without CAP_DAC_OVERRIDE cannot write
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    env = {**os.environ, **cli.env}
    base = [*drop, sys.executable, "-m", "runtime_modules", "enable", "gaming"]
    done = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == ExitCode.PERMISSION, done.stderr
    assert done.stderr == (
        f"runtime-modules: changing modules needs root ({state_dir} is not writable by root); "
        "run `sudo runtime-modules …`, or add --sudo\n"
    )
    if shutil.which("sudo") is None:
        done = subprocess.run(
            [*base, "--sudo"], cwd=REPO, env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == ExitCode.PERMISSION
        assert "sudo is not installed; run the command as root" in done.stderr
    assert cli.records() == []


def test_a_state_dir_that_is_a_file(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    for where in (afile, afile / "state"):
        for argv in (["enable", "gaming", "--dry-run"], ["enable", "gaming"], ["status"]):
            code, out, err = run(capsys, "--state-dir", str(where), *argv)
            assert (code, out) == (ExitCode.USAGE, ""), err
            assert err.startswith(f"runtime-modules: {afile} is not a directory: ")
            assert "give a directory with --state-dir" in err
    assert cli.records() == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nixos-rebuild", '"x'], "--nixos-rebuild '\"x': no closing quotation; write the "
         "command as for a shell, e.g. nixos-rebuild or 'nixos-rebuild --fast', quoting a path "
         "with spaces"),
        (["--nixos-rebuild", ""], "--nixos-rebuild '': names no command; give one (e.g. "
         "nixos-rebuild), or leave it out for the default, nixos-rebuild"),
        (["--nixos-rebuild", "   "], "--nixos-rebuild '   ': names no command; give one (e.g. "
         "nixos-rebuild), or leave it out for the default, nixos-rebuild"),
    ],
)  # fmt: skip
def test_a_bad_nixos_rebuild_command_is_refused_before_anything(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv, "enable", "gaming")
    assert (code, out, err) == (ExitCode.USAGE, "", f"runtime-modules: {message}\n")
    assert not cli.settings.overrides_file.exists()  # no pin recorded before the failure
    assert cli.records() == []


@pytest.mark.parametrize("value", ['"x', "   "])
def test_a_bad_nixos_rebuild_variable_is_refused(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str], monkeypatch: Any, value: str
) -> None:
    monkeypatch.setenv("RUNTIME_MODULES_NIXOS_REBUILD", value)
    code, out, err = run(capsys, "enable", "gaming")
    assert (code, out) == (ExitCode.USAGE, "")
    assert err.startswith(f"runtime-modules: RUNTIME_MODULES_NIXOS_REBUILD={value!r}: "), err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not cli.settings.overrides_file.exists()
    assert cli.records() == []


@pytest.mark.parametrize("flag", ["--state-dir", "--registry"])
def test_an_empty_path_is_refused(
    cli: FakeSystem,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: Any,
    tmp_path: Path,
    flag: str,
) -> None:
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)  # an empty path would be this directory
    for argv in (
        [flag, "", "enable", "gaming"],
        ["enable", "gaming", flag, ""],
        [flag, "", "list"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == ExitCode.USAGE
        err = capsys.readouterr().err
        assert err.endswith(
            f"runtime-modules: error: argument {flag}: an empty value; give a path, or leave "
            "the option out for its default\n"
        ) or err.endswith(
            f"runtime-modules enable: error: argument {flag}: an empty value; give a path, or "
            "leave the option out for its default\n"
        ), err
    assert list(here.iterdir()) == []  # no apply.lock, no flake/ written here
    assert cli.records() == []


def test_too_many_modules_is_a_usage_error(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [f"m{i}" for i in range(1025)]
    for verb in ("enable", "disable", "status"):
        code, out, err = run(capsys, verb, *names, "gaming")
        assert (code, out) == (ExitCode.USAGE, ""), err
        assert err == (
            "runtime-modules: 1026 modules named; at most 1024 fit in one command: name them in "
            "several commands\n"
        )
    assert cli.records() == []


def test_a_long_command_line_is_recorded_cut(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [f"module{i:03d}-" + "x" * 110 for i in range(40)]  # 40 x 121 characters
    cli.write_registry([{"name": n, "description": "long"} for n in names])
    code, _, err = run(capsys, "enable", *names)
    assert code == ExitCode.OK, err
    pins = OverrideStore.from_settings(cli.settings).load(time.time()).pins
    assert sorted(pins) == names
    command = pins[names[0]].source.command
    assert len(command) == 4096 and command.startswith("enable module000-x") and command[-1] == "…"


def test_persist_into_a_file_is_a_usage_error(
    cli: FakeSystem, capsys: pytest.CaptureFixture[str], monkeypatch: Any, tmp_path: Path
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    for where, what in (
        (afile, "the persistent directory must be one"),
        (afile / "lib", f"it cannot hold the persistent directory {afile / 'lib'}"),
    ):
        monkeypatch.setenv("RUNTIME_MODULES_PERSIST_DIR", str(where))
        code, out, err = run(capsys, "enable", "gaming", "--persist")
        assert (code, out) == (ExitCode.USAGE, "")
        assert err == (
            f"runtime-modules: {afile} is not a directory: {what}; give a directory with "
            "RUNTIME_MODULES_PERSIST_DIR (default /var/lib/runtime-modules), or move the file\n"
        )
    assert not cli.settings.overrides_file.exists()  # nothing pinned, in either layer
    assert cli.records() == []


def test_read_only_state_dir(
    cli: FakeSystem, tmpfs: Tmpfs, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.setenv("RUNTIME_MODULES_STATE_DIR", str(tmpfs.path / "state"))
    assert run(capsys, "enable", "gaming")[0] == ExitCode.OK
    tmpfs.remount("ro")
    code, _, err = run(capsys, "enable", "podman")
    assert code == ExitCode.FAILURE
    assert err == (
        f"runtime-modules: {tmpfs.path / 'state'}: the state directory is on a read-only file "
        "system; remount it read-write\n"
    )
    code, out, _ = run(capsys, "status", "--json")
    assert code == ExitCode.OK and json.loads(out)["applied"] == ["gaming"]


@pytest.mark.root
def test_a_state_dir_below_one_the_user_cannot_search_is_no_traceback() -> None:
    from tests.fixtures.control import public_dir
    from tests.fixtures.system import REPO

    with public_dir() as top:
        locked = top / "locked"
        (locked / "x").mkdir(parents=True)
        locked.chmod(0o700)  # root's: nobody cannot even stat what is below
        proc = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
             "-m", "runtime_modules", "status", "--state-dir", str(locked / "x" / "state"),
             "--registry", str(REPO / "scripts" / "demo.d" / "registry.json")],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("runtime-modules: ") and "permission denied" in proc.stderr
