"""Settings: each from a command-line flag, else an environment variable, else the NixOS default.

The defaults are the paths the NixOS module writes (``/etc/runtime-modules/…``) and the runtime
state directory that ends at reboot (``/run/runtime-modules``); overrides given with ``--persist``
live under ``/var/lib/runtime-modules``.
"""

from __future__ import annotations

import os
import re
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


_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
_WITH_UNITS = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?\s*(?:ms|s|m|h)\s*)+", re.ASCII)


def parse_seconds(
    text: str,
    name: str,
    *,
    number_is_seconds: bool,
    allow_zero: bool = False,
    examples: str = "20m, 1h30m or 45s",
    longer: str = "",
) -> float:
    """Seconds in a duration given by a flag (``name`` "--for") or a variable ("RUNTIME_…").

    The rules' format ("500ms", "3s", "1m30s", "1.5h"), finite, at most a week. A bare number
    is seconds where ``number_is_seconds`` (the variables, which the NixOS module writes in
    seconds); on the command line it is refused with the units to choose from, since "--for 2"
    or "--timeout 30" may mean any of them. ``longer`` follows "at most a week" (what to do
    instead). Every bad value raises ConfigError naming the flag or variable and what to write.
    """
    from ._rules import parse_duration  # pydantic is loaded only when a duration is given

    label = f"{name} {text!r}" if name.startswith("-") else f"{name}={text!r}"
    write = f"write e.g. {examples}"
    t = text.strip()
    if t.startswith("-"):
        raise ConfigError(f"{label}: a duration cannot be negative; {write}")
    plain = _NUMBER.fullmatch(t) is not None
    if not plain and _WITH_UNITS.fullmatch(t) is None:
        raise ConfigError(f"{label}: not a duration; {write}")
    try:
        seconds = parse_duration(float(t) if plain else t)
    except ValueError:  # well formed, so only too long (or too many digits for a float)
        raise ConfigError(f"{label}: at most a week{longer}") from None
    if plain and not number_is_seconds and seconds != 0:
        raise ConfigError(f"{label}: give a unit: {t}s, {t}m or {t}h")
    if seconds == 0 and not allow_zero:
        raise ConfigError(f"{label}: the duration must be more than 0 seconds; {write}")
    return seconds


def _env_seconds(name: str, text: str, *, allow_zero: bool = False) -> float:
    return parse_seconds(
        text,
        name,
        number_is_seconds=True,
        allow_zero=allow_zero,
        examples="3 (seconds), 500ms or 1m30s" if allow_zero else "1800 (seconds), 30m or 1h",
    )


def parse_command(text: str, name: str) -> tuple[str, ...]:
    """The argv in a ``--nixos-rebuild`` value or RUNTIME_MODULES_NIXOS_REBUILD, split as a
    shell would ("sudo nixos-rebuild", "'/opt/my rebuild'"); ConfigError if it names none."""
    flag = name.startswith("-")
    label = f"{name} {text!r}" if flag else f"{name}={text!r}"
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise ConfigError(
            f"{label}: {str(exc).lower()}; write the command as for a shell, e.g. "
            "nixos-rebuild or 'nixos-rebuild --fast', quoting a path with spaces"
        ) from None
    if not argv:
        raise ConfigError(
            f"{label}: names no command; give one (e.g. nixos-rebuild), or "
            f"{'leave it out' if flag else 'unset it'} for the default, nixos-rebuild"
        )
    return argv


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
        changes["nixos_rebuild"] = parse_command(v, ENV_NIXOS_REBUILD)
    if v := env.get(ENV_PERSIST_DIR):
        changes["persist_dir"] = Path(v)
    if v := env.get(ENV_HOOKS_DIR):
        changes["hooks_dir"] = Path(v)
    if v := env.get(ENV_CURRENT_SYSTEM):
        changes["current_system"] = Path(v)
    if v := env.get(ENV_APPLY_TIMEOUT):
        changes["apply_timeout"] = _env_seconds(ENV_APPLY_TIMEOUT, v)
    if v := env.get(ENV_HOOK_TIMEOUT):
        changes["hook_timeout"] = _env_seconds(ENV_HOOK_TIMEOUT, v)
    if v := env.get(ENV_CONTROL_GROUP):
        changes["control_group"] = v
    if v := env.get(ENV_SETTLE):
        changes["default_settle"] = _env_seconds(ENV_SETTLE, v, allow_zero=True)
    if v := env.get(ENV_LINGER):
        changes["default_linger"] = _env_seconds(ENV_LINGER, v, allow_zero=True)
    if v := env.get(ENV_LOG_LEVEL):
        changes["log_level"] = v.lower()
    return s.with_(**changes) if changes else s
