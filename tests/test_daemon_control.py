"""The CLI and the daemon, end to end: the real daemon loop with its control socket, the real
applier against the fake nixos-rebuild, links in a network namespace of the test's, and the CLI
itself (in-process, or as processes when they must run at once or as another user)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import selectors
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime_modules._cli import main
from runtime_modules._control_client import ControlClient
from runtime_modules._control_protocol import EventMessage, EventsRequest
from runtime_modules._daemon import Daemon
from runtime_modules._errors import ExitCode
from runtime_modules._overrides import OverrideSource, OverrideState, OverrideStore
from runtime_modules._reconciler import Reconciler
from runtime_modules._reconciler_events import (
    AppliedKnown,
    ConditionsChanged,
    OverrideExpired,
    RulesLoaded,
    RuleTiming,
    StartApply,
)
from runtime_modules._settings import Settings
from runtime_modules._state import load_state
from tests.fixtures.applier import FakeSystem
from tests.fixtures.control import public_dir
from tests.fixtures.daemon import LINK_RULE
from tests.fixtures.system import REPO, eventually, ip_netns

pytestmark = pytest.mark.root

RULE = LINK_RULE.format(settle=0.1, linger=0.3)
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


class DaemonThread:
    """A real ``Daemon`` whose loop runs in a thread, as ``watch`` runs it in its process.

    ``call(fn)`` runs ``fn`` in the loop (the daemon is not thread-safe) and returns its result.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = False
        self._started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> DaemonThread:
        self.thread.start()
        self._started.wait(30)
        if self.error is not None:
            raise self.error
        return self

    def _run(self) -> None:
        try:
            self.daemon.start()
            self.daemon.add_reader(self._r, self._drain)
        except BaseException as exc:
            self.error = exc
            self._started.set()
            self.daemon.close()
            return
        self._started.set()
        try:
            while not self._stop and not self.daemon.stopped:
                self.daemon.step()
        except BaseException as exc:  # surfaced at teardown: a loop crash fails the test
            self.error = exc
        finally:
            self.daemon.close()

    def _drain(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            fn()

    def call(self, fn: Callable[[], Any]) -> Any:
        answer: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._calls.put(lambda: answer.put(fn()))
        os.write(self._w, b"x")
        return answer.get(timeout=10)

    def stop(self) -> None:
        if self._r < 0:
            return  # stopped before: its descriptors' numbers may be someone else's by now
        if self.thread.is_alive():
            self._stop = True
            with contextlib.suppress(OSError):
                os.write(self._w, b"x")
            self.thread.join(timeout=60)
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._r = self._w = -1


@pytest.fixture
def public_state(fake_system: FakeSystem) -> Iterator[Settings]:
    """The fake machine's settings with the state dir where every user can reach the socket."""
    with public_dir() as d:
        yield fake_system.settings.with_(state_dir=d / "run")


@pytest.fixture
def cli_env(
    fake_system: FakeSystem, public_state: Settings, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The CLI's environment (also set in this process, for in-process ``main``)."""
    env = {**fake_system.env, "RUNTIME_MODULES_STATE_DIR": str(public_state.state_dir)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def start_daemon(
    fake_system: FakeSystem, public_state: Settings, netns: str, tmp_path: Path
) -> Iterator[Callable[..., DaemonThread]]:
    """Start daemons on the fake machine (watching ``netns``); all are stopped afterwards."""
    started: list[DaemonThread] = []
    rules = tmp_path / "rules.toml"
    rules.write_text(RULE)

    def start(**kwargs: Any) -> DaemonThread:
        kwargs.setdefault("reconciler", Reconciler(quiet=0.05, backoff=0.5, backoff_cap=1.0))
        kwargs.setdefault("journal", fake_system.journal())
        daemon = Daemon(public_state, rules=[rules], netns=netns, **kwargs)
        run = DaemonThread(daemon)
        started.append(run)
        return run.start()

    yield start
    for run in started:
        run.stop()
        assert run.error is None, run.error


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_process(env: dict[str, str], *argv: str, prefix: tuple[str, ...] = ()) -> Any:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "runtime_modules", *argv],
        cwd=REPO,
        env={**os.environ, **env, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def status(capsys: pytest.CaptureFixture[str], *modules: str) -> dict[str, Any]:
    code, out, err = cli(capsys, "status", "--json", *modules)
    assert code == ExitCode.OK, err
    data: dict[str, Any] = json.loads(out)
    return data


def why(data: dict[str, Any], module: str) -> dict[str, Any]:
    (row,) = [m for m in data["modules"] if m["name"] == module]
    result: dict[str, Any] = row["why"]
    return result


def applied(settings: Settings) -> frozenset[str]:
    return load_state(settings).applied


def idle(run: DaemonThread) -> bool:
    """Wait until the daemon has nothing running and no timer at all: nothing more happens
    without a new event (every decision is taken when its input arrives)."""
    return eventually(
        lambda: run.call(lambda: run.daemon.applying is None and run.daemon.wait_time() is None)
    )


def veth_up(netns: str) -> None:
    ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    ip_netns(netns, "link", "set", "va", "up")
    ip_netns(netns, "link", "set", "vb", "up")


def no_overlap(fake: FakeSystem) -> list[str]:
    """The fake's starts and ends in time order (an apply at a time: start, end, start, …)."""
    runs = [(r["time"], r["event"]) for r in fake.records() if r["event"] in ("start", "end")]
    return [event for _, event in sorted(runs)]


# --- with the daemon -----------------------------------------------------------------------


@pytest.mark.usefixtures("cli_env")
def test_enable_returns_when_applied_and_shows_its_progress(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    public_state: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_daemon()
    code, out, err = cli(capsys, "enable", "gaming")
    assert code == ExitCode.OK, err
    assert out.startswith("enabled gaming")  # the applier's own result line
    lines = err.splitlines()
    assert lines[0] == "apply #1 starts: {gaming} (+gaming)"
    assert any(ln.startswith("[    0s] building the system configuration") for ln in lines)
    assert applied(public_state) == {"gaming"}  # done when the command returns
    assert fake_system.current_imports() == ["gaming"]
    data = status(capsys)
    assert data["daemon"]["pid"] == os.getpid() and data["daemon"]["wanted"] == ["gaming"]
    gaming = why(data, "gaming")
    assert gaming["kind"] == "override-on"
    assert gaming["text"] == "pinned on by root (enable gaming)"
    code, _, err = cli(capsys, "status", "gamng")
    assert code == ExitCode.USAGE and "did you mean 'gaming'" in err  # the daemon's answer
    assert [m["name"] for m in status(capsys, "podman")["modules"]] == ["podman"]
    assert why(data, "podman") == {
        "kind": "no-rule",
        "text": "no rule wants it",
        "rules": [],
        "override": None,
    }
    (pin,) = data["overrides"]
    assert (pin["module"], pin["state"], pin["until"], pin["persistent"]) == (
        "gaming",
        "on",
        None,
        False,
    )
    # Already so: answered at once, no apply. Flags for applying directly say they do not apply.
    code, out, err = cli(capsys, "enable", "gaming", "--timeout", "5m")
    assert (code, out) == (ExitCode.OK, "nothing to do: gaming already applied\n")
    assert "--timeout is not used: the daemon applies with its own timeout" in err
    code, _, err = cli(capsys, "enable", "podman", "--dry-run")
    assert code == ExitCode.USAGE
    assert err.startswith("runtime-modules: --dry-run applies without the daemon, and the daemon")
    assert len(fake_system.records("start")) == 1


def test_two_clis_at_once_end_right_with_one_apply_at_a_time(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    public_state: Settings,
    cli_env: dict[str, str],
) -> None:
    run = start_daemon()
    fake_system.hold()  # the rebuilds wait for release(): the calls overlap on any load
    first = cli_process(cli_env, "enable", "gaming")
    assert eventually(lambda: run.call(lambda: run.daemon.applying) == 1)
    same = cli_process(cli_env, "enable", "gaming")  # where apply #1 goes already
    assert same.stderr is not None
    assert same.stderr.readline() == "apply #1, under way, carries this change\n"
    second = cli_process(cli_env, "enable", "podman")  # one more: it needs a follow-up
    assert second.stderr is not None
    queued = second.stderr.readline()  # answered while #1 is held
    fake_system.release()
    results = {}
    for name, proc in (("first", first), ("same", same), ("second", second)):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.OK, err
        results[name] = (out, queued + err if proc is second else err)
    # Each is answered by the apply that carries its change: #1, #1, and the follow-up #2.
    assert results["first"][0].startswith("enabled gaming")
    assert results["same"][0].startswith("enabled gaming")
    assert results["second"][1].startswith(
        "apply #1 is under way; {gaming, podman} is applied right after it\n"
        "apply #2 starts: {gaming, podman} (+podman)\n"
    )
    assert results["second"][0].startswith("enabled podman")
    assert no_overlap(fake_system) == ["start", "end", "start", "end"]
    assert applied(public_state) == {"gaming", "podman"}


@pytest.mark.usefixtures("cli_env")
def test_no_wait_returns_at_once(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    public_state: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_daemon()
    fake_system.hold()  # the apply cannot end before release(): returning proves no wait
    code, out, err = cli(capsys, "enable", "gaming", "--no-wait")
    assert (code, out, err) == (ExitCode.OK, "", "apply #1 starts: {gaming} (+gaming)\n")
    assert applied(public_state) == frozenset()
    fake_system.release()
    assert eventually(lambda: applied(public_state) == {"gaming"})


def test_a_silent_apply_still_shows_the_elapsed_time(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    cli_env: dict[str, str],
) -> None:
    run = start_daemon()
    run.call(lambda: setattr(run.daemon.control, "heartbeat", 0.2))  # 5 s in production
    fake_system.hold()  # silent until released: after three heartbeats
    proc = cli_process(cli_env, "enable", "gaming")
    assert proc.stderr is not None
    beats = 0
    seen = []
    while beats < 3:  # the held build gives up after 60 s: this ends
        line = proc.stderr.readline()
        assert line, seen
        seen.append(line)
        beats += line.endswith("s] still applying\n")
    fake_system.release()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.OK, "".join(seen) + err


def test_a_change_queued_behind_another_apply_shows_the_elapsed_time_too(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    cli_env: dict[str, str],
) -> None:
    run = start_daemon()
    run.call(lambda: setattr(run.daemon.control, "heartbeat", 0.2))  # 5 s in production
    fake_system.hold()  # apply #1 is silent until released
    first = cli_process(cli_env, "enable", "gaming")
    assert eventually(lambda: run.call(lambda: run.daemon.applying) == 1)
    queued = cli_process(cli_env, "enable", "podman")  # waits for the follow-up, #2
    assert queued.stderr is not None
    seen = [queued.stderr.readline()]
    assert seen[0] == "apply #1 is under way; {gaming, podman} is applied right after it\n"
    while len(seen) < 4:  # the held build gives up after 60 s: this ends
        line = queued.stderr.readline()
        assert line, seen
        seen.append(line)
    # Nothing but the elapsed time of the apply it waits behind, while that one is silent.
    assert all(re.fullmatch(r"\[ +\d+s\] still applying\n", ln) for ln in seen[1:]), seen
    fake_system.release()
    out, err = queued.communicate(timeout=60)
    assert queued.returncode == ExitCode.OK, "".join(seen) + err
    assert out.startswith("enabled podman")
    assert "apply #2 starts: {gaming, podman} (+podman)\n" in err
    first.communicate(timeout=60)
    assert first.returncode == ExitCode.OK


def test_a_daemon_that_stops_tells_who_still_waits(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    public_state: Settings,
    cli_env: dict[str, str],
) -> None:
    run = start_daemon()
    fake_system.hold()  # apply #1 lasts until released, on any load
    first = cli_process(cli_env, "enable", "gaming")
    assert eventually(lambda: run.call(lambda: run.daemon.applying) == 1)
    queued = cli_process(cli_env, "enable", "podman")
    assert queued.stderr is not None
    assert queued.stderr.readline().startswith("apply #1 is under way")
    run.call(run.daemon.stop)  # SIGTERM: the apply under way may finish, no follow-up starts
    fake_system.release()
    out, err = first.communicate(timeout=30)
    assert first.returncode == ExitCode.OK and out.startswith("enabled gaming"), err
    out, err = queued.communicate(timeout=30)
    assert queued.returncode == ExitCode.FAILURE
    assert err == (
        "runtime-modules: the daemon stopped before applying this change; it is recorded and "
        "applied when the daemon starts again (see `runtime-modules status`)\n"
    )
    assert applied(public_state) == {"gaming"}
    pins = OverrideStore.from_settings(public_state).load(time.time()).pins
    assert set(pins) == {"gaming", "podman"}


def test_disable_beats_a_rule_auto_hands_back_and_a_pin_for_1s_expires(
    start_daemon: Callable[..., DaemonThread],
    *,
    fake_system: FakeSystem,
    public_state: Settings,
    netns: str,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_system.write_registry(
        [
            {"name": "gaming"},
            {"name": "podman"},
            {"name": "virtualization", "kernel_changes": ["boot.kernelModules"]},
        ]
    )
    start_daemon()
    veth_up(netns)
    assert eventually(lambda: applied(public_state) == {"virtualization"})
    data = status(capsys)
    rule = why(data, "virtualization")
    assert rule["kind"] == "rules" and rule["text"] == "rule lab-link-up active (link va)"
    assert rule["rules"] == [
        {"name": "lab-link-up", "phase": "active", "matches": ["va"], "until": None}
    ]
    assert any("virtualization changes boot.kernelModules" in w for w in data["warnings"])

    code, out, err = cli(capsys, "disable", "virtualization")
    assert code == ExitCode.OK, err
    assert out.startswith("disabled virtualization")
    assert applied(public_state) == frozenset()  # the pin beats the rule
    off = why(status(capsys), "virtualization")
    assert off["kind"] == "override-off"
    assert off["text"] == (
        "pinned off by root (disable virtualization); "
        "the rules alone: rule lab-link-up active (link va)"
    )

    code, out, err = cli(capsys, "auto", "virtualization")
    assert code == ExitCode.OK, err
    assert applied(public_state) == {"virtualization"}  # handed back: the rule wants it
    assert status(capsys)["overrides"] == []

    code, _, err = cli(capsys, "disable", "virtualization", "--for", "1s")
    assert code == ExitCode.OK, err
    assert applied(public_state) == frozenset()
    (pin,) = status(capsys)["overrides"]
    assert pin["until"] is not None
    assert eventually(lambda: applied(public_state) == {"virtualization"})  # expired: the rule
    assert OverrideStore.from_settings(public_state).load(time.time()).pins == {}
    assert len(fake_system.records("start")) == 5


def test_pause_resume_and_reset(
    start_daemon: Callable[..., DaemonThread],
    *,
    fake_system: FakeSystem,
    public_state: Settings,
    netns: str,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = start_daemon()
    code, out, _ = cli(capsys, "pause")
    assert (code, out) == (ExitCode.OK, "automation paused; keeping the base system\n")
    veth_up(netns)
    assert eventually(lambda: run.call(lambda: run.daemon.snapshot().rules[0].phase.value)
                      == "active")  # fmt: skip
    data = status(capsys)
    assert data["paused"] is True and why(data, "virtualization")["text"] == (
        "automation paused: kept off; the rules alone: rule lab-link-up active (link va)"
    )
    assert applied(public_state) == frozenset() and fake_system.records("start") == []

    code, _, err = cli(capsys, "resume")
    assert code == ExitCode.OK, err
    assert applied(public_state) == {"virtualization"}

    code, out, err = cli(capsys, "reset")
    assert code == ExitCode.OK, err
    assert applied(public_state) == frozenset()
    assert "automation is paused: rules bring no module back" in err
    assert idle(run)  # nothing due: the rule that holds does not bring it back
    assert applied(public_state) == frozenset()
    assert status(capsys)["paused"] is True

    code, _, err = cli(capsys, "resume")
    assert code == ExitCode.OK, err
    assert applied(public_state) == {"virtualization"}
    assert no_overlap(fake_system) == ["start", "end"] * 3


@pytest.mark.usefixtures("cli_env")
def test_a_pin_over_a_persistent_one_gives_way_to_it_when_it_ends(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    public_state: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_daemon()
    assert cli(capsys, "enable", "gaming", "--persist")[0] == ExitCode.OK
    assert cli(capsys, "disable", "gaming", "--for", "1s")[0] == ExitCode.OK
    assert applied(public_state) == frozenset()
    (pin,) = status(capsys)["overrides"]
    assert (pin["state"], pin["persistent"]) == ("off", False)
    # When the runtime pin ends, the persistent one is in force again: one apply, to it.
    assert eventually(lambda: applied(public_state) == {"gaming"})
    time.sleep(0.2)
    assert len(fake_system.records("start")) == 3
    (pin,) = status(capsys)["overrides"]
    assert (pin["state"], pin["persistent"], pin["until"]) == ("on", True, None)


@pytest.mark.usefixtures("cli_env")
def test_a_failed_apply_exits_1_and_says_what_the_daemon_does_next(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    public_state: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_daemon()
    fake_system.control(switch="fail")
    code, out, err = cli(capsys, "enable", "podman")
    assert code == ExitCode.FAILURE and out == ""
    last = err.splitlines()[-1]
    assert last.startswith("runtime-modules: could not enable podman: switch-to-configuration")
    assert re.search(r"rolled back .*; the daemon tries again in 0\.\ds$", last), last
    assert applied(public_state) == frozenset()


@pytest.mark.usefixtures("cli_env")
def test_status_text_says_why_and_what_comes_next(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A long backoff, so the failed apply's retry is still pending when status is asked.
    start_daemon(reconciler=Reconciler(quiet=0.05, backoff=60.0, backoff_cap=120.0))
    code, _, err = cli(capsys, "enable", "gaming", "--for", "2h")
    assert code == ExitCode.OK, err
    fake_system.control(mode="fail")
    assert cli(capsys, "enable", "podman")[0] == ExitCode.FAILURE
    data = status(capsys)
    assert list(data["daemon"]) == [
        "pid", "since", "dry_run", "dry_run_applied", "wanted", "paused_modules", "rules",
        "applying", "pending", "backoff", "given_up",
    ]  # fmt: skip
    assert data["daemon"]["dry_run_applied"] is None  # a real daemon: `applied` says it
    assert data["daemon"]["backoff"]["failures"] == 1
    assert data["daemon"]["pending"]["target"] == ["gaming", "podman"]
    code, out, err = cli(capsys, "status")
    assert code == ExitCode.OK, err
    lines = out.splitlines()
    assert lines[1].startswith(f"daemon pid {os.getpid()} since ")
    assert lines[2] == "applied: gaming"
    at = r"(\d\d:\d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d)"  # the date only on another day
    rows = {ln.split()[0]: ln for ln in lines if ln.startswith("  ")}
    assert re.fullmatch(
        rf"  gaming +enabled +wanted: pinned on by root until {at} \(enable gaming --for 2h\)",
        rows["gaming"],
    ), rows["gaming"]
    assert rows["podman"].startswith("  podman          failed    wanted: pinned on by root")
    assert rows["virtualization"].endswith("not wanted: no rule wants it")
    assert any(
        re.fullmatch(
            rf"next: gaming podman at {at} \(held back after 1 failed apply in a row\)", ln
        )
        for ln in lines
    ), lines
    assert any(ln.startswith("last apply ") and ": failed, " in ln for ln in lines), lines


@pytest.mark.usefixtures("cli_env")
def test_status_of_a_dry_run_says_what_it_would_have_applied(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    netns: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_daemon(dry_run=True, out=io.StringIO())  # its decision lines, not in the CLI's output
    veth_up(netns)
    assert eventually(lambda: status(capsys)["daemon"]["dry_run_applied"] == ["virtualization"])
    data = status(capsys)
    assert data["applied"] == [] and data["daemon"]["dry_run"] is True  # no state written
    assert fake_system.records() == []  # nixos-rebuild never ran
    code, out, err = cli(capsys, "status")
    assert code == ExitCode.OK, err
    lines = out.splitlines()
    assert lines[1].endswith(", dry run")
    assert lines[2:4] == [
        "applied: (none: the base system)",
        "dry run, applied by now if it were not: virtualization",
    ]


def test_events_stream_what_happens(
    start_daemon: Callable[..., DaemonThread],
    netns: str,
    public_state: Settings,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = start_daemon()
    seen = subscribe_events(run, public_state)
    assert cli(capsys, "enable", "gaming")[0] == ExitCode.OK
    veth_up(netns)
    assert eventually(lambda: applied(public_state) == {"gaming", "virtualization"})
    assert eventually(lambda: sum(e.text.startswith("apply #2 succeeded") for e in seen) == 1)
    kinds = {(e.kind, e.text.split(":")[0]) for e in seen}
    assert ("override", "gaming pinned on") in kinds
    assert ("apply", "apply #1 starts") in kinds
    assert ("link", "add va (veth)") in kinds
    assert ("rule", "rule lab-link-up activated (va)") in kinds
    output = [e for e in seen if e.kind == "apply" and "line" in e.data]
    assert any("building the system configuration" in e.data["line"] for e in output)
    (done,) = [e for e in seen if e.text.startswith("apply #1 succeeded")]
    assert done.data["after"] == ["gaming"] and done.data["journal_id"]


def subscribe_events(run: DaemonThread, settings: Settings) -> list[EventMessage]:
    """Follow the daemon's events stream; the list grows as they come."""
    seen: list[EventMessage] = []
    client = ControlClient(settings.control_socket, idle_timeout=30)

    def listen() -> None:
        with contextlib.suppress(Exception):
            for answer in client.request(EventsRequest()):
                if isinstance(answer, EventMessage):
                    seen.append(answer)

    threading.Thread(target=listen, daemon=True).start()
    assert eventually(lambda: run.call(lambda: run.daemon.control.server.subscribers) == 1)
    return seen


@pytest.mark.usefixtures("cli_env")
def test_each_pin_that_ends_is_one_event(
    start_daemon: Callable[..., DaemonThread],
    public_state: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = start_daemon()
    seen = subscribe_events(run, public_state)
    assert cli(capsys, "enable", "gaming", "--for", "1s")[0] == ExitCode.OK
    assert eventually(lambda: applied(public_state) == frozenset())  # back to the rules
    assert cli(capsys, "enable", "podman", "--persist")[0] == ExitCode.OK
    assert cli(capsys, "disable", "podman", "--for", "1s")[0] == ExitCode.OK
    assert eventually(lambda: applied(public_state) == {"podman"})  # the persistent pin again
    assert idle(run)
    ended = [
        (e.text, e.data) for e in seen if e.kind == "override" and e.data.get("change") == "expired"
    ]
    assert ended == [
        (
            "override of gaming expired: back to the rules",
            {"modules": ["gaming"], "change": "expired", "revealed": False},
        ),
        (
            "override of podman expired: its persistent pin is in force again",
            {"modules": ["podman"], "change": "expired", "revealed": True},
        ),
    ]
    assert sum("expired" in e.text or "ended" in e.text for e in seen) == 2


def test_pins_that_end_together_end_once_each_and_reveal_the_persistent_one(
    start_daemon: Callable[..., DaemonThread], public_state: Settings
) -> None:
    store = OverrideStore.from_settings(public_state)
    root = OverrideSource(uid=0, user="root")
    now = time.time()
    end = now + 2.0
    store.pin(["podman"], OverrideState.ON, until=None, source=root, persist=True, now=now)
    for module, state in (("podman", OverrideState.OFF), ("gaming", OverrideState.ON)):
        store.pin([module], state, until=end, source=root, persist=False, now=now)
    run = start_daemon()
    seen = subscribe_events(run, public_state)
    assert eventually(lambda: applied(public_state) == {"gaming"})
    # Both end at the same moment: gaming by the reconciler's timer, podman's runtime pin by
    # the handler's; whichever goes first, podman goes to its persistent pin.
    assert eventually(lambda: applied(public_state) == {"podman"})
    assert idle(run)
    ended = sorted(
        (e.data["modules"], e.data["revealed"])
        for e in seen
        if e.kind == "override" and e.data.get("change") == "expired"
    )
    assert ended == [(["gaming"], False), (["podman"], True)]
    assert set(store.load(time.time()).pins) == {"podman"}


def test_a_pin_past_a_year_is_refused_by_the_daemon_too(
    start_daemon: Callable[..., DaemonThread], public_state: Settings
) -> None:
    from datetime import datetime, timedelta, timezone

    from runtime_modules._control_protocol import EnableRequest
    from runtime_modules._errors import ConfigError

    start_daemon()
    client = ControlClient(public_state.control_socket, answer_timeout=10.0, idle_timeout=10.0)
    far = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-14)))
    with pytest.raises(ConfigError, match="more than a year from now"):  # not "internal error"
        client.call(EnableRequest(modules=["gaming"], until=far))


def test_pins_follow_the_wall_clock_when_it_is_set(
    start_daemon: Callable[..., DaemonThread],
    public_state: Settings,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    shift = [0.0]
    start_daemon(wall=lambda: time.time() + shift[0])
    assert cli(capsys, "enable", "gaming", "--for", "1h")[0] == ExitCode.OK
    assert applied(public_state) == {"gaming"}
    # The wall clock is set 1 h minus 3 s ahead (NTP at boot): the pin ends 3 s from now, not
    # in an hour (3 s: the status request below comes before it even on a loaded machine).
    # The daemon notices at its next wakeup, here the status request.
    shift[0] = 3600 - 3.0
    assert status(capsys)["overrides"]
    assert eventually(lambda: applied(public_state) == frozenset(), timeout=15)
    assert status(capsys)["overrides"] == []


def test_wall_clock_watch_notices_a_set_clock() -> None:
    from runtime_modules._clocks import WallClockWatch

    hits: list[int] = []
    watch = WallClockWatch.open(lambda: hits.append(1))
    if watch is None:
        pytest.skip("no timerfd on this system")
    try:
        try:  # set to what it is: a change of microseconds, yet a set clock for the kernel
            time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME))
        except PermissionError:
            pytest.skip("setting the clock needs CAP_SYS_TIME")
        selector = selectors.DefaultSelector()
        selector.register(watch, selectors.EVENT_READ)
        assert selector.select(5)
        watch.on_ready(selectors.EVENT_READ)
        assert hits == [1]
        assert selector.select(0) == []  # armed again, quiet until the next set
        selector.close()
    finally:
        watch.close()


# --- who may change ------------------------------------------------------------------------


def test_an_unprivileged_user_reads_status_but_may_not_change(
    start_daemon: Callable[..., DaemonThread],
    fake_system: FakeSystem,
    cli_env: dict[str, str],
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed (Debian package util-linux)")
    start_daemon()
    reader = cli_process(cli_env, "status", "--json", prefix=tuple(NOBODY))
    out, err = reader.communicate(timeout=30)
    if reader.returncode != 0 and "Permission denied" in err and "import" in err:
        pytest.skip(f"nobody cannot run this Python: {err.strip()[-200:]}")
    assert reader.returncode == ExitCode.OK, err
    assert json.loads(out)["daemon"]["pid"] == os.getpid()
    changer = cli_process(cli_env, "enable", "gaming", prefix=tuple(NOBODY))
    out, err = changer.communicate(timeout=30)
    assert changer.returncode == ExitCode.PERMISSION
    assert err == (
        "runtime-modules: nobody (uid 65534) may not enable: only root may change runtime "
        "modules; run it with sudo\n"
    )
    assert fake_system.records("start") == []


# --- without the daemon --------------------------------------------------------------------


def test_without_a_daemon_the_verbs_apply_directly_and_a_daemon_keeps_them(
    start_daemon: Callable[..., DaemonThread],
    *,
    fake_system: FakeSystem,
    public_state: Settings,
    netns: str,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = cli(capsys, "enable", "gaming", "podman", "--for", "1h")
    assert code == ExitCode.OK, err
    assert out.startswith("enabled gaming, podman")
    assert applied(public_state) == {"gaming", "podman"}
    code, out, _ = cli(capsys, "disable", "podman")
    assert code == ExitCode.OK and applied(public_state) == {"gaming"}
    local = status(capsys)
    assert local["daemon"] is None
    assert why(local, "gaming")["text"].startswith("pinned on by root until ")
    assert why(local, "podman")["kind"] == "override-off"
    assert why(local, "virtualization") is None  # no daemon: no rule is followed
    code, _, _ = cli(capsys, "rebuild")
    assert code == ExitCode.OK and len(fake_system.records("start")) == 3

    veth_up(netns)  # the rule wants virtualization, and a daemon starts: the pins hold
    run = start_daemon()
    assert eventually(lambda: applied(public_state) == {"gaming", "virtualization"})
    assert run.call(lambda: run.daemon.snapshot().wanted) == {"gaming", "virtualization"}
    run.stop()

    code, _, err = cli(capsys, "reset")
    assert code == ExitCode.OK, err
    assert applied(public_state) == frozenset()
    run = start_daemon()  # reset paused automation: the rule brings nothing back
    assert idle(run)
    assert applied(public_state) == frozenset()
    assert cli(capsys, "resume")[0] == ExitCode.OK
    assert applied(public_state) == {"virtualization"}


# --- the store and the reconciler on a virtual clock ---------------------------------------


def test_pins_from_the_store_on_a_virtual_clock(tmp_path: Path) -> None:
    """What the handler does with the store, step by step: a runtime pin over a persistent one
    is fed without its end (its end is no hand-back to the rules: the handler's own timer then
    feeds the persistent pin), and a plain pin ends by the reconciler's timer, at its time."""
    store = OverrideStore(tmp_path / "run.json", tmp_path / "lib.json")
    root = OverrideSource(uid=0, user="root")
    wall, mono = 1_800_000_000.0, 100.0
    rec = Reconciler(quiet=0.0)
    rule = RuleTiming(name="gpu", modules=frozenset({"gaming"}), settle=0, linger=0, fingerprint="")
    rec.handle(RulesLoaded(rules=(rule,)), mono)
    rec.handle(AppliedKnown(applied=frozenset({"gaming"})), mono)
    actions = rec.handle(ConditionsChanged(holding={"gpu": ("/devices/gpu",)}), mono)
    assert not any(isinstance(a, StartApply) for a in actions)  # gaming is applied already

    store.pin(["gaming"], OverrideState.OFF, until=None, source=root, persist=True, now=wall)
    view = store.pin(
        ["gaming"], OverrideState.ON, until=wall + 60, source=root, persist=False, now=wall
    )
    changed, _ = view.reconciler_inputs(wall_now=wall, mono_now=mono)
    assert changed.overrides["gaming"].until is None and view.next_reveal() == wall + 60
    assert rec.handle(changed, mono) == []  # on, as the rule wants anyway
    assert rec.tick(mono + 3600) == []  # the reconciler never ends it by itself

    _, view = store.expire(wall + 60)  # the handler's timer, at next_reveal()
    assert view.pins["gaming"].persistent and view.next_reveal() is None
    changed, _ = view.reconciler_inputs(wall_now=wall + 60, mono_now=mono + 3600)
    (start,) = rec.handle(changed, mono + 3600)  # straight to the persistent pin: off
    assert isinstance(start, StartApply) and start.target == frozenset()

    view = store.unpin(["gaming"], now=wall + 70)
    view = store.pin(
        ["gaming"], OverrideState.OFF, until=wall + 80, source=root, persist=False, now=wall + 70
    )
    changed, _ = view.reconciler_inputs(wall_now=wall + 70.5, mono_now=mono + 70.5)
    assert changed.overrides["gaming"].until == pytest.approx(mono + 80)
    plain = Reconciler()
    plain.handle(changed, mono + 70.5)
    assert plain.tick(mono + 79.9) == []
    assert plain.tick(mono + 80) == [OverrideExpired(module="gaming")]
