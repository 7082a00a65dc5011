"""Settings: each from a command-line flag, else an environment variable, else the NixOS default.

The defaults are the paths the NixOS module writes (``/etc/runtime-modules/…``) and the runtime
state directory that ends at reboot (``/run/runtime-modules``); overrides given with ``--persist``
live under ``/var/lib/runtime-modules``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ._errors import ConfigError

ENV_REGISTRY = "RUNTIME_MODULES_REGISTRY"
ENV_STATE_DIR = "RUNTIME_MODULES_STATE_DIR"
ENV_RULES = "RUNTIME_MODULES_RULES"
ENV_NIXOS_REBUILD = "RUNTIME_MODULES_NIXOS_REBUILD"
ENV_PERSIST_DIR = "RUNTIME_MODULES_PERSIST_DIR"
ENV_HOOKS_DIR = "RUNTIME_MODULES_HOOKS_DIR"
ENV_APPLY_TIMEOUT = "RUNTIME_MODULES_APPLY_TIMEOUT"
ENV_HOOK_TIMEOUT = "RUNTIME_MODULES_HOOK_TIMEOUT"
ENV_CONTROL_GROUP = "RUNTIME_MODULES_CONTROL_GROUP"
ENV_CURRENT_SYSTEM = "RUNTIME_MODULES_CURRENT_SYSTEM"
ENV_LOG_LEVEL = "RUNTIME_MODULES_LOG_LEVEL"
ENV_SETTLE = "RUNTIME_MODULES_SETTLE"
ENV_LINGER = "RUNTIME_MODULES_LINGER"

DEFAULT_REGISTRY = Path("/etc/runtime-modules/modules.json")
DEFAULT_STATE_DIR = Path("/run/runtime-modules")
DEFAULT_RULES = (Path("/etc/runtime-modules/rules"),)
DEFAULT_PERSIST_DIR = Path("/var/lib/runtime-modules")
DEFAULT_HOOKS_DIR = Path("/etc/runtime-modules/hooks")
DEFAULT_CURRENT_SYSTEM = Path("/run/current-system")
DEFAULT_APPLY_TIMEOUT = 30 * 60.0  # a full rebuild of a heavy module on a laptop fits in 30 min
DEFAULT_HOOK_TIMEOUT = 30.0
DEFAULT_SETTLE = 3.0  # a GPU's driver binds within ~1 s of the device; docks enumerate in ~2 s
DEFAULT_LINGER = 30.0  # long enough to re-seat a cable or move a desk without a rebuild


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    registry: Path = DEFAULT_REGISTRY
    state_dir: Path = DEFAULT_STATE_DIR
    rules: tuple[Path, ...] = DEFAULT_RULES
    nixos_rebuild: tuple[str, ...] = ("nixos-rebuild",)
    persist_dir: Path = DEFAULT_PERSIST_DIR
    hooks_dir: Path = DEFAULT_HOOKS_DIR  # holds pre-apply.d/ and post-apply.d/
    current_system: Path = DEFAULT_CURRENT_SYSTEM  # the link whose target is recorded for rollback
    apply_timeout: float = DEFAULT_APPLY_TIMEOUT
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT
    control_group: str | None = None  # members may change state besides root
    log_level: str = "info"
    default_settle: float = DEFAULT_SETTLE  # for rules that give no `settle`
    default_linger: float = DEFAULT_LINGER  # for rules that give no `linger`
    extra: Mapping[str, str] = field(default_factory=dict)

    # Files inside the state directory, named once here.
    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "apply.lock"

    @property
    def flake_dir(self) -> Path:
        return self.state_dir / "flake"

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def overrides_file(self) -> Path:
        return self.state_dir / "overrides.json"

    @property
    def persistent_overrides_file(self) -> Path:
        return self.persist_dir / "overrides.json"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


def _seconds(name: str, text: str, *, allow_zero: bool = False) -> float:
    """A duration as rule files write it ("3s", "1m30s", 1800): finite, at most a week."""
    from ._rules import parse_duration  # pydantic is loaded only when a variable is set

    # A plain number is seconds here (rule files, being typed, need no such reading).
    plain = text.strip().replace(".", "", 1).isdigit() and text.strip().isascii()
    try:
        value = parse_duration(float(text) if plain else text)
    except ValueError as exc:
        raise ConfigError(f"{name}={text!r}: {exc}") from None
    if value == 0 and not allow_zero:
        raise ConfigError(f"{name}={text!r} must be more than 0 seconds; set it to e.g. 1800")
    return value


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, defaults where a variable is unset or empty."""
    env = os.environ if env is None else env
    s = Settings()
    changes: dict[str, object] = {}
    if v := env.get(ENV_REGISTRY):
        changes["registry"] = Path(v)
    if v := env.get(ENV_STATE_DIR):
        changes["state_dir"] = Path(v)
    if v := env.get(ENV_RULES):
        changes["rules"] = tuple(Path(p) for p in v.split(":") if p)
    if v := env.get(ENV_NIXOS_REBUILD):
        argv = tuple(shlex.split(v))
        if not argv:
            raise ConfigError(f"{ENV_NIXOS_REBUILD} is blank; unset it or name the command")
        changes["nixos_rebuild"] = argv
    if v := env.get(ENV_PERSIST_DIR):
        changes["persist_dir"] = Path(v)
    if v := env.get(ENV_HOOKS_DIR):
        changes["hooks_dir"] = Path(v)
    if v := env.get(ENV_CURRENT_SYSTEM):
        changes["current_system"] = Path(v)
    if v := env.get(ENV_APPLY_TIMEOUT):
        changes["apply_timeout"] = _seconds(ENV_APPLY_TIMEOUT, v)
    if v := env.get(ENV_HOOK_TIMEOUT):
        changes["hook_timeout"] = _seconds(ENV_HOOK_TIMEOUT, v)
    if v := env.get(ENV_CONTROL_GROUP):
        changes["control_group"] = v
    if v := env.get(ENV_SETTLE):
        changes["default_settle"] = _seconds(ENV_SETTLE, v, allow_zero=True)
    if v := env.get(ENV_LINGER):
        changes["default_linger"] = _seconds(ENV_LINGER, v, allow_zero=True)
    if v := env.get(ENV_LOG_LEVEL):
        changes["log_level"] = v.lower()
    return s.with_(**changes) if changes else s
