"""systemd/runtime-modules.service: valid for systemd, and the NixOS module's unit is the same.

``systemd-analyze verify`` needs ExecStart= to exist, so it checks a copy whose ExecStart= is this
checkout's ``runtime-modules`` (the shipped file says /usr/local/bin, where docs/nixos.md links
it); every other line is the shipped one. The NixOS unit, evaluated with nixpkgs' lib, is compared
key by key with the file and rendered to a unit file that systemd-analyze verifies too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.system import REPO

UNIT = REPO / "systemd" / "runtime-modules.service"
# Keys the NixOS unit has on top of the file, on purpose (see nixos-module.nix).
NIXOS_ONLY_SERVICE = {"RestrictNamespaces"}  # safe there: builds go through nix-daemon
NIXOS_ONLY_ENV = {"NIX_REMOTE"}
DEFAULTS = (
    '[ { networking.hostName = "box"; services.runtimeModules = { enable = true; '
    'flakeUrl = "github:alice/nixos-config"; watch.enable = true; }; } ]'
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file: key -> every value given (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a key before any section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def script() -> str:
    exe = Path(sys.executable).with_name("runtime-modules")
    if not exe.exists():
        pytest.skip(f"{exe} is missing: install the package into the venv (scripts/setup)")
    return str(exe)


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return exe


def verify(systemd_analyze: str, text: str, tmp_path: Path) -> list[str]:
    """What `systemd-analyze verify` says about the unit file (its own lines only)."""
    path = tmp_path / "runtime-modules.service"
    path.write_text(text)
    proc = subprocess.run(
        [systemd_analyze, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if str(path) in ln]
    if proc.returncode != 0:
        said.append(f"exit status {proc.returncode}: {proc.stderr.strip()}")
    return said


def with_exec_start(text: str, exe: str) -> str:
    lines = text.splitlines()
    out = [f"ExecStart={exe} watch" if ln.startswith("ExecStart=") else ln for ln in lines]
    assert out != lines
    return "\n".join(out) + "\n"


def test_shipped_unit_runs_the_daemon_from_usr_local_bin() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    assert service["ExecStart"] == ["/usr/local/bin/runtime-modules watch"]


def test_unit_passes_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path) -> None:
    text = with_exec_start(UNIT.read_text(), script())
    assert verify(systemd_analyze, text, tmp_path) == []


def test_verify_would_catch_a_bad_line(systemd_analyze: str, tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are reported."""
    text = with_exec_start(UNIT.read_text(), script())
    text = text.replace("KillMode=mixed", "KillMode=mixd\nWatchdogSecs=60s")
    said = " ".join(verify(systemd_analyze, text, tmp_path))
    assert "Unknown key 'WatchdogSecs'" in said
    assert "kill mode specification" in said


def test_unit_shape() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["on-failure"]
    assert service["KillMode"] == ["mixed"]
    assert service["WatchdogSec"] == ["60s"]
    assert service["TimeoutStopSec"] == ["10min"]
    # A start may first finish an interrupted apply: the apply timeout (1800 s) plus 15 min.
    assert service["TimeoutStartSec"] == ["45min"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    env = dict(v.split("=", 1) for v in service["Environment"])
    assert env["RUNTIME_MODULES_STATE_DIR"] == "/run/runtime-modules"
    assert env["RUNTIME_MODULES_HOOKS_DIR"] == "/etc/runtime-modules/hooks"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # Nothing that would give the unit its own mount namespace: activation must reach the host's.
    namespaced = {
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProtectHostname",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "PrivateMounts",
    }
    assert not namespaced & set(service)


def test_unit_environment_is_read_by_the_settings() -> None:
    from runtime_modules._settings import Settings, settings_from_env

    service = parse_unit(UNIT.read_text())["Service"]
    env = dict(v.split("=", 1) for v in service["Environment"])
    s = settings_from_env(env)
    # The unit spells out the defaults: the same settings as no environment at all.
    assert s == Settings()


# --- The NixOS unit -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nixos_service(nixpkgs_lib: Path) -> dict[str, Any]:
    exe = shutil.which("nix-instantiate")
    if exe is None:
        pytest.skip("nix-instantiate is not installed (Debian package nix-bin)")
    argv = [exe, "--eval", "--strict", "--json", str(REPO / "tests" / "nix" / "eval.nix")]
    argv += ["--arg", "lib", f"import {nixpkgs_lib}", "--arg", "modules", DEFAULTS]
    argv += ["-A", "base.service"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    service: dict[str, Any] = json.loads(proc.stdout)
    return service


@pytest.mark.parametrize(("apply_timeout", "start_timeout"), [(3600, "75min"), (100, "17min")])
def test_nixos_start_timeout_follows_the_apply_timeout(
    nixpkgs_lib: Path, apply_timeout: int, start_timeout: str
) -> None:
    """Recovery before READY=1 may wait out an apply run by hand: the start allows for it."""
    exe = shutil.which("nix-instantiate")
    if exe is None:
        pytest.skip("nix-instantiate is not installed (Debian package nix-bin)")
    modules = DEFAULTS.replace(
        "watch.enable = true;", f"watch.enable = true; applyTimeout = {apply_timeout};"
    )
    argv = [exe, "--eval", "--strict", "--json", str(REPO / "tests" / "nix" / "eval.nix")]
    argv += ["--arg", "lib", f"import {nixpkgs_lib}", "--arg", "modules", modules]
    argv += ["-A", "base.service.serviceConfig.TimeoutStartSec"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == start_timeout


def _nix_values(value: object) -> list[str]:
    """A NixOS serviceConfig value as unit-file values (lists: one line per item)."""
    items = value if isinstance(value, list) else [value]
    return ["true" if v is True else "false" if v is False else str(v) for v in items]


def _normal(values: list[str]) -> list[str]:
    """Words, booleans spelt one way: `A B` on one line is the same list as `A` and `B` on two."""
    booleans = {"yes": "true", "true": "true", "on": "true", "no": "false", "false": "false"}
    return [booleans.get(w, w) for w in " ".join(values).split()]


def test_nixos_unit_mirrors_the_file(nixos_service: dict[str, Any]) -> None:
    unit = parse_unit(UNIT.read_text())
    file_service = {
        k: v
        for k, v in unit["Service"].items()
        if k not in {"ExecStart", "ExecReload", "Environment"}
    }
    nix_service = {
        k: v
        for k, v in nixos_service["serviceConfig"].items()
        if k not in {"ExecStart", "ExecReload"} | NIXOS_ONLY_SERVICE
    }
    assert set(nix_service) == set(file_service)
    for key, values in file_service.items():
        assert _normal(_nix_values(nix_service[key])) == _normal(values), key

    assert nixos_service["serviceConfig"]["ExecStart"].endswith("/bin/runtime-modules watch")
    assert nixos_service["serviceConfig"]["ExecReload"].endswith("/bin/kill -HUP $MAINPID")

    file_env = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    nix_env = {k: v for k, v in nixos_service["environment"].items() if k not in NIXOS_ONLY_ENV}
    assert nix_env == file_env

    assert nixos_service["after"] == unit["Unit"]["After"][0].split()
    assert nixos_service["wants"] == unit["Unit"]["Wants"][0].split()
    for key in ("StartLimitIntervalSec", "StartLimitBurst"):
        assert _nix_values(nixos_service["unitConfig"][key]) == unit["Unit"][key]
    assert nixos_service["wantedBy"] == unit["Install"]["WantedBy"]


def render(service: dict[str, Any], exe: str) -> str:
    """The NixOS unit as a unit file, the way NixOS writes one (lists: one line per item), with
    what nixpkgs' systemd-lib adds: the X-… switch keys and PATH from ``path``. The VM test
    (nix/vm-test.nix) verifies the unit NixOS really renders."""
    lines = ["[Unit]", f"Description={service['description']}"]
    lines += [f"After={' '.join(service['after'])}", f"Wants={' '.join(service['wants'])}"]
    lines += [f"{k}={v}" for k, v in service["unitConfig"].items()]
    lines += [f"X-ReloadIfChanged={str(service['reloadIfChanged']).lower()}"]
    lines += [f"X-RestartIfChanged={str(service['restartIfChanged']).lower()}"]
    lines += [f"X-Restart-Triggers={' '.join(service['restartTriggers'])}"]
    lines += ["", "[Service]"]
    path = [f"{p}/bin" for p in service["path"]] + [f"{p}/sbin" for p in service["path"]]
    lines += [f'Environment="PATH={":".join(path)}"']
    lines += [f'Environment="{k}={v}"' for k, v in service["environment"].items()]
    replaced = {"ExecStart": f"{exe} watch", "ExecReload": "/bin/kill -HUP $MAINPID"}
    for key, value in service["serviceConfig"].items():
        lines += [f"{key}={v}" for v in _nix_values(replaced.get(key, value))]
    lines += ["", "[Install]", f"WantedBy={' '.join(service['wantedBy'])}"]
    return "\n".join(lines) + "\n"


def test_nixos_unit_passes_systemd_analyze_verify(
    systemd_analyze: str, nixos_service: dict[str, Any], tmp_path: Path
) -> None:
    assert verify(systemd_analyze, render(nixos_service, script()), tmp_path) == []
