"""What every CLI verb shares: the common flags, settings from flags, and printing."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from .._settings import Settings, parse_command, settings_from_env


def non_empty(text: str) -> str:
    """An argparse ``type`` refusing an empty value (``--state-dir ''``: a variable that
    expanded to nothing), which would otherwise be the current directory."""
    if not text:
        raise argparse.ArgumentTypeError(
            "an empty value; give a path, or leave the option out for its default"
        )
    return text


def path_arg(text: str) -> Path:
    """An argparse ``type`` for a path: a non-empty one (``non_empty``)."""
    return Path(non_empty(text))


def common_parser() -> argparse.ArgumentParser:
    """Flags accepted by every verb; each overrides its environment variable."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("settings (each overrides its RUNTIME_MODULES_* variable)")
    g.add_argument(
        "--registry", type=path_arg, help="module registry JSON [RUNTIME_MODULES_REGISTRY]"
    )
    g.add_argument("--state-dir", type=path_arg, help="state directory [RUNTIME_MODULES_STATE_DIR]")
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
    s = settings_from_env()
    changes: dict[str, object] = {}
    if getattr(args, "registry", None) is not None:
        changes["registry"] = args.registry
    if getattr(args, "state_dir", None) is not None:
        changes["state_dir"] = args.state_dir
    if getattr(args, "nixos_rebuild", None) is not None:
        changes["nixos_rebuild"] = parse_command(args.nixos_rebuild, "--nixos-rebuild")
    if getattr(args, "rules_paths", None):
        changes["rules"] = tuple(args.rules_paths)
    return s.with_(**changes) if changes else s


def check_state_dir(settings: Settings) -> None:
    """Refuse a state directory that is a file, or under one (exit 2), before anything uses it:
    what would fail later reads as a missing daemon or a missing permission."""
    _check_dir(
        settings.state_dir,
        "the state directory",
        "--state-dir or RUNTIME_MODULES_STATE_DIR (default /run/runtime-modules)",
    )


def check_persist_dir(settings: Settings) -> None:
    """As ``check_state_dir``, for the directory of the pins kept with ``--persist``."""
    _check_dir(
        settings.persist_dir,
        "the persistent directory",
        "RUNTIME_MODULES_PERSIST_DIR (default /var/lib/runtime-modules)",
    )


def _check_dir(directory: Path, name: str, how: str) -> None:
    from .._errors import ConfigError

    for path in (directory, *directory.parents):
        try:
            found = path.exists()
        except OSError:  # a parent that cannot be searched: the command's own access check says
            return
        if found:
            if not path.is_dir():
                what = (
                    f"{name} must be one"
                    if path == directory
                    else f"it cannot hold {name} {directory}"
                )
                raise ConfigError(
                    f"{path} is not a directory: {what}; give a directory with {how}, or move "
                    "the file"
                )
            return


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


# Characters that a terminal would act on rather than show: C0 controls but newline and tab,
# DEL, C1 controls, and the bidirectional overrides (a name that reads backwards). Device names,
# interface names and udev values reach our plain output, and any of them may carry these.
_TERMINAL_ESCAPES = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in (
        *range(0x20),
        0x7F,
        *range(0x80, 0xA0),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    )
    if chr(c) not in "\n\t"
}


def escape_controls(text: str) -> str:
    """``text`` with every character a terminal would act on written as an escape."""
    return text.translate(_TERMINAL_ESCAPES)


class TerminalSafe(io.TextIOBase):
    """A text stream that writes through ``escape_controls``: what the CLI prints is shown,
    never obeyed, whatever names it contains (JSON output is escaped by ``json`` already)."""

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(escape_controls(text))
        return len(text)

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def isatty(self) -> bool:
        return self.raw.isatty()

    def writable(self) -> bool:
        return True
