"""watch: the daemon (what the systemd unit runs, and the README's first command with --dry-run)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .._settings import Settings
from ._common import add_verb, check_state_dir, path_arg


def log_level(text: str) -> str:
    """A ``--log-level`` value as RUNTIME_MODULES_LOG_LEVEL and the NixOS option take it (``warn``,
    ``error``, any case, 0-7 too), in its syslog name."""
    from .._errors import ConfigError
    from .._journal import Priority

    try:
        return Priority.parse(text).name.lower()
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log level: give debug, info, notice, warning (or warn) "
            "or err (or error)"
        ) from None


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add this group's subcommands to ``sub``."""
    p = add_verb(
        sub,
        common,
        "watch",
        help="run the daemon: follow udev and netlink, apply what the rules want",
        description=(
            "Enumerate devices and links, then follow udev and netlink events; rules decide "
            "the wanted modules (after settle, kept for linger) and one apply at a time makes "
            "them so. SIGHUP reloads the rules; SIGTERM stops cleanly. With --dry-run nothing "
            "is rebuilt and each decision is printed as it is made."
        ),
    )
    p.add_argument(
        "--rules",
        dest="rules_paths",
        type=path_arg,
        nargs="+",
        metavar="PATH",
        help="rule files or folders [RUNTIME_MODULES_RULES, default /etc/runtime-modules/rules]",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="everything but nixos-rebuild; print each decision to stdout",
    )
    p.add_argument(
        "--netns",
        metavar="NAME",
        help="watch the links of this network namespace (`ip netns list`) instead of ours",
    )
    p.add_argument(
        "--log-level",
        type=log_level,
        metavar="LEVEL",
        help="least important journal entries kept: debug (every event), info, notice, warning "
        "(or warn), err (or error) [RUNTIME_MODULES_LOG_LEVEL, default info]",
    )
    p.set_defaults(func=_watch)


def _watch(args: argparse.Namespace, settings: Settings) -> int:
    from .._daemon import Daemon
    from .._journal import Journal

    check_state_dir(settings)
    _check_rule_files(settings)
    if args.log_level:
        settings = settings.with_(log_level=args.log_level)
    journal = Journal.for_level(settings.log_level)
    level = logging.DEBUG if settings.log_level == "debug" else logging.INFO
    # Under systemd, stderr is the journal; a plain line per message is what journalctl shows.
    logging.basicConfig(level=level, stream=sys.stderr, format="%(name)s: %(message)s")
    daemon = Daemon(settings, dry_run=args.dry_run, netns=args.netns, journal=journal)
    return daemon.run()


def _check_rule_files(settings: Settings) -> None:
    """Refuse rule paths that hold no rule file (a folder of other files), as ``rules check``
    does; but empty folders are the NixOS module's when no rule is configured: the daemon runs
    for the changes by hand, and says so."""
    from .._rules import rule_files
    from ._rules import no_rule_file

    found = rule_files(settings.rules)
    if found[0] or found[1]:  # files, or problems (a missing path) the daemon reports itself
        return
    if settings.rules and all(p.is_dir() and not any(p.iterdir()) for p in settings.rules):
        print(
            f"runtime-modules: note: no rule file in {', '.join(map(str, settings.rules))}: "
            "no rule enables a module; modules change only by hand",
            file=sys.stderr,
        )
        return
    raise no_rule_file(settings.rules)
