"""The module registry: which runtime modules exist, and which base system they extend.

The NixOS module writes it as JSON (``/etc/runtime-modules/modules.json``)::

    {"host": "laptop", "flake": "path:/nix/store/…-source?narHash=…",
     "modules": [{"name": "gaming", "description": "Steam and friends"}]}

Extra fields are kept for later use. The base flake reference is the one value that reaches Nix
source (a flake's inputs must be literals), so it is held to a strict character set here.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._errors import RegistryError, UnknownModuleError

# Module names are data (they reach Nix only through JSON), but they are also file names in
# logs, journal fields and CLI arguments: keep them to a tame set, like NixOS attribute names.
MODULE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
# Flake references: URL-ish text with no quote, backslash, dollar, whitespace or control char.
FLAKE_REF = re.compile(r"^[A-Za-z0-9+.:/_?=&%@~,#-]{1,4096}$")
HOST_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$")


class ModuleInfo(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(description="the module's name, as the CLI and rules use it")
    description: str = ""
    # Kernel-level NixOS options the module changes (boot.kernelModules, boot.kernelParams, …):
    # they do not take effect under `nixos-rebuild test`. Filled by the NixOS module when known.
    kernel_changes: tuple[str, ...] = ()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not MODULE_NAME.fullmatch(v):
            raise ValueError(
                "must be 1-128 of letters, digits and _ . + - (not starting with . + -)"
            )
        return v


class Registry(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    host: str = Field(description="the nixosConfigurations attribute of the base system")
    flake: str = Field(description="the pinned reference of the base flake")
    modules: tuple[ModuleInfo, ...] = ()

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not HOST_NAME.fullmatch(v):
            raise ValueError("must be a nixosConfigurations name: letters, digits and _ . -")
        return v

    @field_validator("flake")
    @classmethod
    def _flake(cls, v: str) -> str:
        if not FLAKE_REF.fullmatch(v):
            raise ValueError("must be a flake reference without quotes, backslashes, '$' or spaces")
        return v

    @field_validator("modules")
    @classmethod
    def _unique(cls, v: tuple[ModuleInfo, ...]) -> tuple[ModuleInfo, ...]:
        seen: set[str] = set()
        for m in v:
            if m.name in seen:
                raise ValueError(f"module {m.name!r} is listed twice")
            seen.add(m.name)
        return v

    @property
    def names(self) -> frozenset[str]:
        return frozenset(m.name for m in self.modules)

    def module(self, name: str) -> ModuleInfo:
        for m in self.modules:
            if m.name == name:
                return m
        raise UnknownModuleError(unknown_module_message(name, self.names))

    def check_known(self, names: Iterable[str]) -> None:
        """Raise UnknownModuleError for the first name that is not in the registry."""
        for name in names:
            if name not in self.names:
                raise UnknownModuleError(unknown_module_message(name, self.names))


def unknown_module_message(name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    text = f"unknown module {name!r}"
    if close:
        text += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    elif known:
        text += f"; known modules: {', '.join(known)}"
    else:
        text += "; the registry lists no modules"
    return text + " (see `runtime-modules list`)"


def field_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as people write it: "modules[2].name" ("" at the top)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_registry(text: str | bytes, source: str) -> Registry:
    """Validate registry JSON; errors name ``source`` and the field."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{source}: not valid JSON ({exc}); regenerate it or fix it") from None
    except RecursionError:
        raise RegistryError(
            f"{source}: nested too deeply to be a module registry; regenerate it"
        ) from None
    try:
        return Registry.model_validate(data)
    except RecursionError:
        raise RegistryError(
            f"{source}: nested too deeply to be a module registry; regenerate it"
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        where = field_path(first["loc"]) or "(top level)"
        raise RegistryError(
            f"{source}: {where}{_module_of(data, first['loc'])}: {_message(first)}{more}; "
            "the NixOS module writes this file from services.runtimeModules: fix the "
            "configuration and rebuild (or, for a hand-written registry, the file)"
        ) from None


# pydantic's wording of the usual type errors, as the rest of the product says it.
_TYPE_MESSAGES = {
    "missing": "is missing",
    "string_type": "must be a string",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
}


def _message(error: Any) -> str:
    kind = error["type"]
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind]
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _module_of(data: object, loc: Sequence[int | str]) -> str:
    """ " (module gaming)" when ``loc`` points into a module entry that has a name."""
    if len(loc) < 3 or loc[0] != "modules" or not isinstance(loc[1], int):
        return ""
    modules = data.get("modules") if isinstance(data, dict) else None
    entry = modules[loc[1]] if isinstance(modules, list) and loc[1] < len(modules) else None
    name = entry.get("name") if isinstance(entry, dict) else None
    return f" (module {name})" if isinstance(name, str) and MODULE_NAME.fullmatch(name) else ""


def load_registry(path: Path) -> Registry:
    """Read and validate the registry at ``path``."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(
            f"{path}: no module registry; enable services.runtimeModules in your NixOS "
            "configuration, or point --registry / RUNTIME_MODULES_REGISTRY at one"
        ) from None
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the module registry: {exc.strerror}") from None
    if len(text) > 16 * 1024 * 1024:
        raise RegistryError(f"{path}: the registry is over 16 MiB; it is not one we wrote")
    return parse_registry(text, str(path))
