"""auto, pause, resume, events, history: through a real control socket, the real journal, or
directly on the override store when no daemon runs."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from runtime_modules._cli import build_parser, main
from runtime_modules._cli._overrides import add_pin_flags, change_request, record_change
from runtime_modules._control_protocol import (
    AutoRequest,
    DisableRequest,
    EnableRequest,
    EventMessage,
    PauseRequest,
    ResetRequest,
    ResumeRequest,
)
from runtime_modules._errors import ConfigError, ExitCode
from runtime_modules._overrides import OverrideSource, OverrideState, OverrideStore
from runtime_modules._settings import Settings, settings_from_env
from runtime_modules._state import State, save_state
from tests.fixtures.control import Running, eventually, public_dir, servers
from tests.fixtures.system import REPO

ROOT = OverrideSource(uid=0, user="root", command="enable gaming")
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings (through the environment, as the CLI reads them) in a fresh public directory."""
    with public_dir() as d:
        registry = d / "modules.json"
        registry.write_text(
            json.dumps(
                {
                    "host": "laptop",
                    "flake": "path:/nix/store/abc-source",
                    "modules": [{"name": n} for n in ("gaming", "vm", "failing")],
                }
            )
        )
        monkeypatch.setenv("RUNTIME_MODULES_STATE_DIR", str(d / "run"))
        monkeypatch.setenv("RUNTIME_MODULES_PERSIST_DIR", str(d / "lib"))
        monkeypatch.setenv("RUNTIME_MODULES_REGISTRY", str(registry))
        (d / "run").mkdir(mode=0o755)
        yield settings_from_env()


@pytest.fixture
def daemon(env: Settings) -> Iterator[Running]:
    with servers(env.state_dir) as start:
        yield start()


# --- with the daemon -----------------------------------------------------------------------


def test_auto_shows_progress_until_done(
    daemon: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["auto", "gaming", "vm", "gaming"]) == ExitCode.OK
    out, err = capsys.readouterr()
    assert "gaming is on in 0s" in out
    assert err.startswith("applying\n")  # the daemon's accepted message
    assert "[    0s] building" in err  # the rebuild's output, with the elapsed time
    request = daemon.daemon.seen[0][0]
    assert request == AutoRequest(modules=["gaming", "vm"], command="auto gaming vm")


def test_failed_apply_exits_with_the_daemons_code(
    daemon: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["auto", "failing"]) == ExitCode.FAILURE
    assert "runtime-modules: nixos-rebuild failed; rolled back" in capsys.readouterr().err


def test_no_wait_returns_when_accepted(daemon: Running, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.daemon.apply_delay = 5.0  # the apply would take seconds: we do not wait for it
    t0 = time.monotonic()
    assert main(["resume", "--no-wait"]) == ExitCode.OK
    assert time.monotonic() - t0 < 2.0
    out, err = capsys.readouterr()
    assert err == "applying\n" and "gaming is on" not in out
    assert daemon.daemon.seen[0][0] == ResumeRequest(wait=False, command="resume")


def test_pause_goes_to_the_daemon(daemon: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pause"]) == ExitCode.OK
    assert capsys.readouterr().out == "automation paused\n"
    assert daemon.daemon.seen[0][0] == PauseRequest(command="pause")


def test_unknown_module_from_the_daemon(
    daemon: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["auto", "gamin"]) == ExitCode.USAGE
    assert "did you mean 'gaming'" in capsys.readouterr().err


def test_unprivileged_user_is_refused(daemon: Running) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running the CLI as nobody needs root and setpriv")
    proc = subprocess.run(
        [*NOBODY, sys.executable, "-m", "runtime_modules", "auto", "gaming"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=30,
    )
    assert proc.returncode == ExitCode.PERMISSION, proc.stderr
    assert proc.stderr.startswith("runtime-modules: nobody (uid 65534) may not auto: only root")
    assert "Traceback" not in proc.stderr
    assert daemon.daemon.seen == []


def test_too_many_modules_for_one_request(
    daemon: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [f"m{i}" for i in range(1025)]
    for argv in (["auto", *names], ["enable", *names], ["status", *names, "m1"]):
        assert main(argv) == ExitCode.USAGE
        assert capsys.readouterr().err == (
            "runtime-modules: 1025 modules named; at most 1024 fit in one command: name them in "
            "several commands\n"
        )
    long = [f"m{i:04d}" + "x" * 100 for i in range(1000)]  # few enough, but 100 KiB of names
    for argv in (["auto", *long], ["disable", *long], ["status", *long]):
        assert main(argv) == ExitCode.USAGE
        err = capsys.readouterr().err
        assert err.startswith("runtime-modules: the module names make a request of ")
        assert err.endswith(" bytes, over the 65536 the control socket takes; name fewer modules "
                            "at once\n")  # fmt: skip
    assert daemon.daemon.seen == []


def test_a_long_command_line_reaches_the_daemon_cut(
    daemon: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [f"m{i:03d}" + "x" * 60 for i in range(100)]  # 6.4 KiB of command line
    assert main(["enable", *names, "--no-wait"]) == ExitCode.USAGE  # the fake knows none
    assert "unknown module" in capsys.readouterr().err
    request = daemon.daemon.seen[0][0]
    assert isinstance(request, EnableRequest) and request.modules == names
    assert len(request.command) == 4096 and request.command.endswith("…")
    assert request.command.startswith(f"enable {names[0]} {names[1]} ")


def test_events_streams_like_udevadm_monitor(daemon: Running) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime_modules", "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert eventually(lambda: daemon.loop.call(lambda: daemon.server.subscribers) == 1, 10)
        for kind, text in (("device", "add /devices/pci0000:00/egpu"), ("rule", "egpu: active")):
            event = EventMessage(time=time.time(), kind=kind, text=text)
            daemon.loop.call(lambda e=event: daemon.server.broadcast(e))
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.split(maxsplit=1)[1] == "DEVICE   add /devices/pci0000:00/egpu\n"
        assert second.split(maxsplit=1)[1] == "RULE     egpu: active\n"
        daemon.loop.stop()  # the daemon goes away: the stream ends with a clear error
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == ExitCode.FAILURE
    assert "closed the connection before the end of the event stream" in err


def test_events_json(daemon: Running, capsys: pytest.CaptureFixture[str]) -> None:
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(main(["events", "--json"])))
    t.start()
    assert eventually(lambda: daemon.loop.call(lambda: daemon.server.subscribers) == 1)
    event = EventMessage(time=1.5, kind="link", text="eth0 up", data={"ifname": "eth0"})
    daemon.loop.call(lambda: daemon.server.broadcast(event))
    out: list[str] = []

    def printed() -> bool:
        out.append(capsys.readouterr().out)
        return "\n" in "".join(out)

    assert eventually(printed)
    daemon.loop.stop()
    t.join(timeout=10)
    assert codes == [ExitCode.FAILURE]  # the daemon stopped
    line = "".join(out).splitlines()[0]
    assert json.loads(line) == {
        "time": 1.5,
        "kind": "link",
        "text": "eth0 up",
        "data": {"ifname": "eth0"},
    }


# --- without the daemon --------------------------------------------------------------------


def test_events_needs_the_daemon(env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["events"]) == ExitCode.NO_DAEMON
    err = capsys.readouterr().err
    assert "no daemon is running" in err and "systemctl start runtime-modules" in err


def test_auto_without_daemon_edits_the_store(
    env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    store = OverrideStore.from_settings(env)
    store.pin(["gaming"], OverrideState.ON, until=None, source=ROOT, persist=True, now=time.time())
    store.pin(["gone"], OverrideState.ON, until=None, source=ROOT, persist=False, now=time.time())
    # "gone" is no longer in the registry, but a pin on it can still be handed back.
    assert main(["auto", "gaming", "gone", "vm"]) == ExitCode.OK
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "gaming: handed back to the rules",
        "gone: handed back to the rules",
        "vm: had no override",
    ]
    assert "no daemon is running" in err and "takes effect when it starts" in err
    assert dict(store.load(time.time()).pins) == {}


def test_auto_without_daemon_checks_names(
    env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["auto", "gamng"]) == ExitCode.USAGE
    assert "did you mean 'gaming'" in capsys.readouterr().err


def test_pause_and_resume_without_daemon(env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    save_state(env, State(applied=frozenset({"vm"})))
    assert main(["pause"]) == ExitCode.OK
    assert "keeping vm" in capsys.readouterr().out
    view = OverrideStore.from_settings(env).load(time.time())
    assert (view.paused, view.paused_modules) == (True, frozenset({"vm"}))
    assert main(["resume"]) == ExitCode.OK
    assert OverrideStore.from_settings(env).load(time.time()).paused is False


@pytest.mark.parametrize("argv", [["auto", "gaming"], ["pause"], ["resume"]])
def test_without_write_access_the_store_verbs_need_root(env: Settings, argv: list[str]) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop the capabilities that bypass permissions")
    os.chown(env.state_dir, 65534, 65534)  # nobody's: root without CAP_DAC_OVERRIDE cannot write
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    cmd = [*drop, sys.executable, "-m", "runtime_modules", *argv]
    run_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, check=False)
    assert done.returncode == ExitCode.PERMISSION, done.stderr
    assert done.stderr == (
        f"runtime-modules: changing modules needs root ({env.state_dir} is not writable by "
        "root); run `sudo runtime-modules …`, or add --sudo\n"
    )
    if shutil.which("sudo") is None:  # --sudo is taken, as by enable and disable
        done = subprocess.run(
            [*cmd, "--sudo"], cwd=REPO, env=run_env, capture_output=True, text=True, check=False
        )
        assert done.returncode == ExitCode.PERMISSION, done.stderr
        assert "sudo is not installed; run the command as root" in done.stderr
    assert list(env.state_dir.iterdir()) == []  # not even the overrides' lock file


# --- history -------------------------------------------------------------------------------


def _send(identifier: str, kind: str, message: str, **fields: object) -> None:
    from runtime_modules._journal import JournalEvent
    from systemd import journal

    journal.sendv(
        f"MESSAGE={message}",
        f"MESSAGE_ID={JournalEvent[kind].message_id}",
        f"SYSLOG_IDENTIFIER={identifier}",
        *(f"RUNTIME_MODULES_{k.upper()}={v}" for k, v in fields.items()),
    )


@pytest.fixture
def recorded(journald: Path, journal_tag: str) -> None:
    """Three applies in the real journal, as the applier writes them: one that succeeded, one
    rolled back, one still running; plus an unrelated entry."""
    a, b, c = (f"{journal_tag}-{n}" for n in "abc")
    entries: list[tuple[str, str, dict[str, object]]] = [
        ("APPLY_STARTED", "enabling gaming", {"apply_id": a, "before": "", "after": "gaming"}),
        ("APPLY_SUCCEEDED", "gaming enabled", {"apply_id": a, "before": "", "after": "gaming",
                                               "result": "succeeded", "duration_ms": 83000}),
        ("APPLY_STARTED", "enabling vm", {"apply_id": b, "before": "gaming",
                                          "after": "gaming vm", "reason": "rule dock"}),
        ("APPLY_FAILED", "nixos-rebuild failed", {"apply_id": b, "before": "gaming",
                                                  "after": "gaming vm", "result": "failed",
                                                  "duration_ms": 4000}),
        ("APPLY_ROLLED_BACK", "rolled back to gaming", {"apply_id": b, "before": "gaming",
                                                        "after": "gaming", "result": "failed",
                                                        "duration_ms": 5000}),
        ("RULE_ACTIVATED", "rule dock active", {"rule": "dock"}),
        ("APPLY_STARTED", "disabling gaming", {"apply_id": c, "before": "gaming", "after": "",
                                               "reason": "reset"}),
    ]  # fmt: skip
    entries[0][2]["reason"] = entries[1][2]["reason"] = "enable gaming"
    for kind, message, fields in entries:
        _send(journal_tag, kind, message, **fields)
    subprocess.run(["journalctl", "--sync"], check=False, capture_output=True)


@pytest.mark.usefixtures("recorded")
def test_history_json(journal_tag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history", "--identifier", journal_tag, "--json"]) == ExitCode.OK
    got = json.loads(capsys.readouterr().out)
    slim = [
        (e["apply_id"][-1], e["before"], e["after"], e["reason"], e["result"], e["duration"])
        for e in got
    ]
    assert slim == [
        ("a", [], ["gaming"], "enable gaming", "succeeded", 83.0),
        ("b", ["gaming"], ["gaming"], "rule dock", "failed", 5.0),
        ("c", ["gaming"], [], "reset", "in-progress", None),
    ]
    assert got[1]["message"] == "rolled back to gaming"
    assert abs(got[0]["started"] - time.time()) < 60


@pytest.mark.usefixtures("recorded")
def test_history_table_and_limit(journal_tag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history", "--identifier", journal_tag, "-n", "2"]) == ExitCode.OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "RESULT", "TOOK", "CHANGE", "[WHY]"]
    assert len(lines) == 3  # the newest two
    assert lines[1].split()[2:] == ["failed", "5s", "gaming", "->", "gaming", "[rule", "dock]"]
    assert lines[2].split()[2:] == ["in-progress", "-", "gaming", "->", "(base)", "[reset]"]


@pytest.mark.usefixtures("recorded")
def test_history_says_the_settings_select_nothing(
    journal_tag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--state-dir", "/nonexistent", "history", "--identifier", journal_tag, "--json"]
    assert main(argv) == ExitCode.OK
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == 3  # the journal's applies, whatever the state directory
    assert err == (
        "runtime-modules: note: --state-dir selects nothing here: history lists every apply in "
        f"this machine's journal with SYSLOG_IDENTIFIER={journal_tag}; narrow it with --since "
        "or --identifier\n"
    )
    with pytest.raises(SystemExit):
        main(["history", "--help"])
    shown = capsys.readouterr().out
    assert "--identifier" in shown and "--state-dir" not in shown and "--registry" not in shown
    with pytest.raises(SystemExit):
        main(["auto", "--help"])
    assert "--state-dir" in capsys.readouterr().out  # the other verbs still offer them


def test_history_shows_a_hostile_reason_escaped_and_cut(
    journald: Path, journal_tag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "rule dock: enx\x1b]0;pwned\x07" + "x" * 300
    _send(journal_tag, "APPLY_STARTED", "enabling vm", apply_id=f"{journal_tag}-z", before="",
          after="vm", reason=reason)  # fmt: skip
    subprocess.run(["journalctl", "--sync"], check=False, capture_output=True)
    assert main(["history", "--identifier", journal_tag]) == ExitCode.OK
    line = capsys.readouterr().out.splitlines()[1]
    assert "\x1b" not in line and "\x07" not in line  # no escape sequence reaches the terminal
    assert "enx\\x1b]0;pwned\\x07xx" in line
    assert line.endswith("…]") and len(line) < 200


def test_history_of_nothing(journald: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tag = f"rmtest-none-{uuid.uuid4().hex[:8]}"
    assert main(["history", "--identifier", tag]) == ExitCode.OK
    assert capsys.readouterr().out.startswith("no applies in the journal")
    assert main(["history", "--identifier", tag, "--since", "not a time"]) == ExitCode.USAGE
    assert "journalctl failed" in capsys.readouterr().err


def test_history_without_journal_access_needs_root_or_the_group() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running the CLI as nobody needs root and setpriv")
    proc = subprocess.run(
        [*NOBODY, sys.executable, "-m", "runtime_modules", "history"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=30,
    )
    if proc.returncode == ExitCode.OK:
        pytest.skip("nobody can read this machine's journal")
    assert proc.returncode == ExitCode.PERMISSION, proc.stderr
    assert proc.stderr == (
        "runtime-modules: journalctl: No journal files were opened due to insufficient "
        "permissions; the applies are in the system journal: run as root (`sudo runtime-modules "
        "history`) or as a member of systemd-journal\n"
    )


# --- what enable/disable/reset/rebuild use from here ---------------------------------------


def _pin_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("modules", nargs="*")
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-wait", action="store_true")
    add_pin_flags(p)
    return p.parse_args(argv)


def test_change_request_carries_the_pin_flags() -> None:
    now = 1_800_000_000.0
    req = change_request("enable", _pin_args("gaming", "gaming", "--for", "2h"), now=now)
    assert isinstance(req, EnableRequest)
    assert (req.modules, req.until, req.persist, req.wait) == (
        ["gaming"],
        datetime.fromtimestamp(now + 7200, UTC),
        False,
        True,
    )
    assert req.command == "enable gaming --for 2h"
    req = change_request("disable", _pin_args("vm", "--persist", "--no-wait"), now=now)
    assert isinstance(req, DisableRequest)
    assert (req.until, req.persist, req.wait, req.command) == (
        None,
        True,
        False,
        "disable vm --persist",
    )
    assert change_request("reset", _pin_args(), now=now) == ResetRequest(command="reset")
    with pytest.raises(ConfigError, match="--for 'soon'"):
        change_request("enable", _pin_args("vm", "--for", "soon"), now=now)
    with pytest.raises(SystemExit):
        _pin_args("vm", "--for", "2h", "--until", "18:00")  # argparse: not both


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--for '0': the duration must be more than 0 seconds; write e.g. 2h, 90m, "
              "1h30m or 45s"),
        ("0s", "--for '0s': the duration must be more than 0 seconds; write e.g. 2h, 90m, "
               "1h30m or 45s"),
        ("30", "--for '30': give a unit: 30s, 30m or 30h"),
        ("2x", "--for '2x': not a duration; write e.g. 2h, 90m, 1h30m or 45s"),
        ("-1h", "--for '-1h': a duration cannot be negative; write e.g. 2h, 90m, 1h30m or 45s"),
        ("200h", "--for '200h': at most a week; for longer, use --until, or pin without a time "
                 "limit (and `runtime-modules auto MODULE` to hand it back)"),
    ],
)  # fmt: skip
def test_a_bad_for_says_what_is_wrong(
    env: Settings, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    for argv in (["enable", "gaming", "--for", value], ["disable", f"--for={value}", "gaming"]):
        assert main(argv) == ExitCode.USAGE
        assert capsys.readouterr().err == f"runtime-modules: {message}\n"
    assert OverrideStore.from_settings(env).load(time.time()).pins == {}


def test_record_change_without_daemon(env: Settings) -> None:
    now = time.time()
    record_change(
        env, change_request("enable", _pin_args("gaming", "--for", "1h"), now=now), now=now
    )
    record_change(env, change_request("disable", _pin_args("vm", "--persist"), now=now), now=now)
    pins = OverrideStore.from_settings(env).load(now).pins
    assert pins["gaming"].state is OverrideState.ON and pins["gaming"].until == pytest.approx(
        now + 3600
    )
    assert pins["vm"].state is OverrideState.OFF and pins["vm"].persistent
    assert pins["gaming"].source.command == "enable gaming --for 1h"
    record_change(env, change_request("reset", _pin_args(), now=now), now=now)
    view = OverrideStore.from_settings(env).load(now)
    assert (dict(view.pins), view.paused, view.paused_modules) == ({}, True, frozenset())


def test_settings_flags_before_or_after_the_verb(
    env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "elsewhere"
    for argv in (["--state-dir", str(other), "events"], ["events", "--state-dir", str(other)]):
        assert main(argv) == ExitCode.NO_DAEMON
        assert f"{other}/control.sock does not exist" in capsys.readouterr().err


def test_watch_log_level_takes_what_the_service_takes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The NixOS option writes "error" into RUNTIME_MODULES_LOG_LEVEL; the flag takes it too.
    for given, level in (("error", "err"), ("warn", "warning"), ("ERROR", "err"), ("info", "info")):
        assert build_parser().parse_args(["watch", "--log-level", given]).log_level == level
    with pytest.raises(SystemExit) as info:
        main(["watch", "--log-level", "loud"])
    assert info.value.code == ExitCode.USAGE
    assert capsys.readouterr().err.endswith(
        "argument --log-level: 'loud' is not a log level: give debug, info, notice, warning "
        "(or warn) or err (or error)\n"
    )


def test_status_names_a_pin_the_registry_no_longer_lists(
    env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    # Such a pin has no module row; without this line nobody would know to `auto` it.
    store = OverrideStore.from_settings(env)
    store.pin(["oldmod"], OverrideState.ON, until=None, source=ROOT, persist=False, now=time.time())
    assert main(["status"]) == ExitCode.OK
    assert (
        "  oldmod: pinned on, but the registry has no such module; "
        "`runtime-modules auto oldmod` removes the pin"
    ) in capsys.readouterr().out.splitlines()
    assert main(["status", "gaming"]) == ExitCode.OK  # asked about one module: only that one
    assert "oldmod" not in capsys.readouterr().out


def test_the_user_is_named_as_the_daemon_names_its_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime_modules._cli._common import current_user

    monkeypatch.setenv("SUDO_USER", "alice")
    assert current_user() == "alice"  # the person behind sudo
    monkeypatch.delenv("SUDO_USER")
    assert current_user() == pwd.getpwuid(os.getuid()).pw_name
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return
    code = "from runtime_modules._cli._common import current_user; print(current_user())"
    done = subprocess.run(
        ["setpriv", "--reuid=54321", "--regid=54321", "--clear-groups", sys.executable, "-c", code],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "SUDO_USER"} | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"uid 54321 cannot run this Python: {done.stderr.strip()[-200:]}")
    assert done.stdout == "54321\n"  # no such user: the uid, as Peer.user says it
