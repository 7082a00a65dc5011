"""The example hooks in hooks/, run by the real hook runner (runtime_modules._hooks).

Each hook is installed in a hooks folder and run the way an apply runs it. What cannot be had
here is faked at the edge only: the desktop (`notify-send` records what it was asked to show, and
as whom) and systemd as PID 1 (`systemctl` records its arguments). Privileges are dropped for
real with setpriv, and power supplies are a sysfs-like folder.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime_modules._hooks import HookPhase, HookResult, run_hooks
from runtime_modules._journal import Journal
from tests.fixtures.system import REPO, is_root

HOOKS = REPO / "hooks"


def install(hooks_dir: Path, phase: HookPhase, name: str, source: str) -> None:
    folder = hooks_dir / phase.dirname
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).symlink_to(HOOKS / source)  # as NixOS does: a link to the file


def run(
    hooks_dir: Path, phase: HookPhase, before: list[str], after: list[str], **env: str
) -> list[HookResult]:
    result = env.pop("RESULT", None)
    payload: dict[str, Any] = {
        "phase": phase.value,
        "apply_id": "test-apply",
        "host": "laptop",
        "reason": "rule gaming-on-nvidia-gpu",
        "before": before,
        "after": after,
        "target": after,
        "result": result,
        "force": False,
    }
    full_env = {
        "RUNTIME_MODULES_APPLY_ID": "test-apply",
        "RUNTIME_MODULES_BEFORE": " ".join(before),
        "RUNTIME_MODULES_AFTER": " ".join(after),
        "RUNTIME_MODULES_REASON": "rule gaming-on-nvidia-gpu",
        **({"RUNTIME_MODULES_RESULT": result} if result else {}),
        **env,
    }
    journal = Journal(socket_path=hooks_dir / "no-journal", stderr=io.StringIO())
    return run_hooks(phase, hooks_dir, payload, full_env, 10.0, journal)


def test_examples_are_executable() -> None:
    for name in ("veto-on-battery", "notify-users", "restart-units"):
        assert os.access(HOOKS / name, os.X_OK), name


# --- veto-on-battery --------------------------------------------------------------------------


def power_supplies(root: Path, **supplies: tuple[str, str | None]) -> Path:
    """A power_supply class folder: name -> (type, online or None).

    A name starting with ``hidpp_`` is a peripheral's battery (a wireless mouse), which the kernel
    marks ``scope`` Device, as hid-logitech-hidpp does.
    """
    for name, (kind, online) in supplies.items():
        (root / name).mkdir(parents=True)
        (root / name / "type").write_text(kind + "\n")
        if online is not None:
            (root / name / "online").write_text(online + "\n")
        if name.startswith("hidpp_"):
            (root / name / "scope").write_text("Device\n")
    return root


@pytest.mark.parametrize(
    ("supplies", "before", "after", "vetoed"),
    [
        ({"AC": ("Mains", "0"), "BAT0": ("Battery", None)}, [], ["rt.gaming"], True),
        ({"AC": ("Mains", "1"), "BAT0": ("Battery", None)}, [], ["rt.gaming"], False),
        # USB-C power delivery counts as mains.
        ({"ucsi-source-psy-1": ("USB", "1"), "BAT0": ("Battery", None)}, [], ["lab"], False),
        # Switching off is always allowed.
        ({"AC": ("Mains", "0"), "BAT0": ("Battery", None)}, ["lab", "rt.gaming"], ["lab"], False),
        ({}, [], ["rt.gaming"], False),  # a desktop: no battery at all
        # A desktop with a wireless mouse: the mouse's battery does not power the machine.
        ({"hidpp_battery_0": ("Battery", None)}, [], ["rt.gaming"], False),
        # A laptop on battery with such a mouse is still on battery.
        (
            {"AC": ("Mains", "0"), "BAT0": ("Battery", None), "hidpp_battery_0": ("Battery", None)},
            [],
            ["rt.gaming"],
            True,
        ),
    ],
    ids=["battery", "mains", "usb-pd", "switching-off", "desktop", "mouse", "battery-and-mouse"],
)
def test_veto_on_battery(
    tmp_path: Path,
    supplies: dict[str, tuple[str, str | None]],
    before: list[str],
    after: list[str],
    vetoed: bool,
) -> None:
    install(tmp_path / "hooks", HookPhase.PRE_APPLY, "10-veto-on-battery", "veto-on-battery")
    power = power_supplies(tmp_path / "power", **supplies)
    [result] = run(
        tmp_path / "hooks", HookPhase.PRE_APPLY, before, after, POWER_SUPPLY_DIR=str(power)
    )
    assert result.ok is not vetoed
    if vetoed:
        # What to do, since nothing retries it when the charger is plugged in.
        assert result.describe().endswith(
            "on battery: not switching on rt.gaming now; once on mains power, run "
            "`runtime-modules rebuild` (without the daemon: the same `runtime-modules enable` "
            "again)"
        )


def test_a_veto_stops_the_later_pre_apply_hooks(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    install(hooks, HookPhase.PRE_APPLY, "10-veto-on-battery", "veto-on-battery")
    install(hooks, HookPhase.PRE_APPLY, "20-veto-on-battery-again", "veto-on-battery")
    power = power_supplies(tmp_path / "power", BAT0=("Battery", None))
    results = run(hooks, HookPhase.PRE_APPLY, [], ["lab"], POWER_SUPPLY_DIR=str(power))
    assert [r.name for r in results] == ["10-veto-on-battery"]


# --- notify-users -----------------------------------------------------------------------------


@pytest.fixture
def desktop() -> Iterator[Path]:
    """A folder outside pytest's private tmp: the fake notify-send runs as another user."""
    root = Path(tempfile.mkdtemp(prefix="rm-hooks-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


FAKE_NOTIFY_SEND = """#!/bin/sh
# Records one notification: who sent it, to which bus, and its arguments.
{ echo "uid=$(id -u) bus=$DBUS_SESSION_BUS_ADDRESS"; printf '%s\\n' "$@"; echo --; } >> "$RECORD"
"""


def fake_desktop(root: Path) -> tuple[dict[str, str], Path]:
    """notify-send on PATH, a record file anyone may write, /run/user with one session bus."""
    if not is_root() or shutil.which("setpriv") is None:
        pytest.skip("notify-users drops privileges with setpriv: needs root and util-linux")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "notify-send"
    fake.write_text(FAKE_NOTIFY_SEND)
    fake.chmod(0o755)
    record = root / "record"
    record.touch()
    record.chmod(0o666)
    run_user = root / "run-user"
    (run_user / "65534").mkdir(parents=True)  # nobody, whom every Debian system has
    bus = socket.socket(socket.AF_UNIX)
    bus.bind(str(run_user / "65534" / "bus"))
    bus.close()  # the socket file stays: enough for the hook's test -S
    (run_user / "1000").mkdir()  # logged in without a session bus: skipped
    (run_user / "not-a-uid").mkdir()
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "NOTIFY_RUN_USER_DIR": str(run_user),
        "RECORD": str(record),
    }
    return env, record


def notifications(record: Path) -> list[list[str]]:
    return [
        chunk.strip().splitlines() for chunk in record.read_text().split("--\n") if chunk.strip()
    ]


def test_notify_users_tells_each_session_as_its_user(tmp_path: Path, desktop: Path) -> None:
    env, record = fake_desktop(desktop)
    install(tmp_path / "hooks", HookPhase.POST_APPLY, "50-notify-users", "notify-users")
    [result] = run(
        tmp_path / "hooks", HookPhase.POST_APPLY, ["lab"], ["rt.gaming"], RESULT="succeeded", **env
    )
    assert result.ok, result.describe()
    bus = desktop / "run-user" / "65534" / "bus"
    assert notifications(record) == [
        [
            f"uid=65534 bus=unix:path={bus}",
            "--app-name=runtime-modules",
            "--urgency=normal",
            "Runtime modules switched",
            "On: rt.gaming. Off: lab. (rule gaming-on-nvidia-gpu)",
        ]
    ]


def test_notify_users_says_a_failed_switch_was_rolled_back(tmp_path: Path, desktop: Path) -> None:
    env, record = fake_desktop(desktop)
    install(tmp_path / "hooks", HookPhase.POST_APPLY, "50-notify-users", "notify-users")
    run(tmp_path / "hooks", HookPhase.POST_APPLY, [], ["lab"], RESULT="timed-out", **env)
    [note] = notifications(record)
    assert note[2:4] == ["--urgency=critical", "Runtime modules: switch failed (timed-out)"]
    assert note[4].startswith("The system is the previous one (never switched, or switched back)")


@pytest.mark.parametrize(
    ("before", "after", "result"),
    [
        (["lab"], ["lab"], "succeeded"),  # `runtime-modules rebuild`: the same modules
        ([], ["lab"], "vetoed"),  # results no post-apply hook is given: nothing to tell
        ([], ["lab"], "unchanged"),
    ],
    ids=["same-modules", "vetoed", "unchanged"],
)
def test_notify_users_is_quiet_when_nothing_changed(
    tmp_path: Path, desktop: Path, before: list[str], after: list[str], result: str
) -> None:
    env, record = fake_desktop(desktop)
    install(tmp_path / "hooks", HookPhase.POST_APPLY, "50-notify-users", "notify-users")
    [hook] = run(tmp_path / "hooks", HookPhase.POST_APPLY, before, after, RESULT=result, **env)
    assert hook.ok
    assert notifications(record) == []


# --- restart-units ----------------------------------------------------------------------------

FAKE_SYSTEMCTL = """#!/bin/sh
# systemd is not PID 1 here: record what would have been asked of it.
echo "$*" >> "$RECORD"
"""


@pytest.fixture
def systemctl(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "systemctl.log"
    record.touch()
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD": str(record),
        "RESTART_AFTER_MODULE": "lab",
        "RESTART_UNITS": "nginx.service wg-quick-lab.service",
    }
    return env, record


RESTART_CASES = {
    "came-up": ([], ["lab"], "succeeded", True),
    "came-up-next-to-another": (["rt.gaming"], ["lab", "rt.gaming"], "succeeded", True),
    "already-up": (["lab"], ["lab", "rt.gaming"], "succeeded", False),
    "failed": ([], ["lab"], "failed", False),  # it did not come up: the old system is back
    "went-away": (["lab"], [], "succeeded", False),
}


@pytest.mark.parametrize("case", RESTART_CASES)
def test_restart_units_after_the_module_comes_up(
    tmp_path: Path, systemctl: tuple[dict[str, str], Path], case: str
) -> None:
    before, after, result, restarted = RESTART_CASES[case]
    env, record = systemctl
    install(tmp_path / "hooks", HookPhase.POST_APPLY, "60-restart-units", "restart-units")
    [hook] = run(tmp_path / "hooks", HookPhase.POST_APPLY, before, after, RESULT=result, **env)
    assert hook.ok, hook.describe()
    # --no-block: a restart that waits for its job could outlast the hook timeout.
    expected = ["try-restart --no-block nginx.service wg-quick-lab.service"] if restarted else []
    assert record.read_text().splitlines() == expected


def test_restart_units_says_what_is_missing(
    tmp_path: Path, systemctl: tuple[dict[str, str], Path]
) -> None:
    env, record = systemctl
    del env["RESTART_UNITS"]
    install(tmp_path / "hooks", HookPhase.POST_APPLY, "60-restart-units", "restart-units")
    [hook] = run(tmp_path / "hooks", HookPhase.POST_APPLY, [], ["lab"], RESULT="succeeded", **env)
    assert not hook.ok
    assert "set RESTART_UNITS to the units to restart" in hook.describe()
    assert record.read_text() == ""
