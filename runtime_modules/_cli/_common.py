"""What every CLI verb shares: the common flags, settings from flags, and printing."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .._settings import Settings, settings_from_env


def common_parser() -> argparse.ArgumentParser:
    """Flags accepted by every verb; each overrides its environment variable."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("settings (each overrides its RUNTIME_MODULES_* variable)")
    g.add_argument("--registry", type=Path, help="module registry JSON [RUNTIME_MODULES_REGISTRY]")
    g.add_argument("--state-dir", type=Path, help="state directory [RUNTIME_MODULES_STATE_DIR]")
    g.add_argument(
        "--nixos-rebuild", help="the nixos-rebuild command [RUNTIME_MODULES_NIXOS_REBUILD]"
    )
    return p


def add_verb(
    sub: Any, common: argparse.ArgumentParser, name: str, **kw: Any
) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` to ``sub``, taking the common flags after the verb too.

    With ``parents=[common]`` alone, a subparser writes its defaults (None) over the same flags
    given before the verb (``runtime-modules --state-dir X status`` would lose X); suppressing
    the subparser's defaults keeps what the main parser read.
    """
    p: argparse.ArgumentParser = sub.add_parser(name, parents=[common], **kw)
    shared = {a.dest for a in common._actions}
    for action in p._actions:
        if action.dest in shared:
            action.default = argparse.SUPPRESS
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    import shlex

    s = settings_from_env()
    changes: dict[str, object] = {}
    if getattr(args, "registry", None) is not None:
        changes["registry"] = args.registry
    if getattr(args, "state_dir", None) is not None:
        changes["state_dir"] = args.state_dir
    if getattr(args, "nixos_rebuild", None):
        changes["nixos_rebuild"] = tuple(shlex.split(args.nixos_rebuild))
    if getattr(args, "rules_paths", None):
        changes["rules"] = tuple(args.rules_paths)
    return s.with_(**changes) if changes else s


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def current_user() -> str:
    """Who runs the command: SUDO_USER under sudo (the person; the uid recorded stays the real
    one), else the real uid's name, else the uid itself, as the daemon records its peers."""
    import pwd

    if user := os.environ.get("SUDO_USER"):
        return user
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def format_duration(seconds: float) -> str:
    """Seconds as "45s", "12m05s", "2h03m": short, for progress and history."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
