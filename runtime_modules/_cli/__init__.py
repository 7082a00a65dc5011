"""The ``runtime-modules`` command: a thin shell that parses, calls the core, and prints.

Each verb group lives in its own module and registers its subcommands here; every handler takes
``(args, settings)`` and returns an exit code. Errors of the tree in ``_errors`` become one line on
stderr and their exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._errors import ExitCode, RuntimeModulesError
from ._common import TerminalSafe, common_parser, settings_from_args

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(
        prog="runtime-modules",
        description="Switch NixOS runtime modules on and off, by hand or by rules.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    # Imported here so that `runtime-modules --help` stays cheap and each group stays separate.
    from . import _modules, _overrides, _rules, _watch

    for group in (_modules, _rules, _watch, _overrides):
        group.register(sub, common)
    return parser


# The flags whose value is a duration (``parse_seconds``).
_DURATION_FLAGS = ("--for", "--timeout")


def _joined_negative_durations(argv: Sequence[str]) -> list[str]:
    """``--for -1h`` as ``--for=-1h`` (and ``--timeout``): argparse would take ``-1h`` for an
    option and say only "expected one argument"; joined, the value reaches the check that says
    what is wrong."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            out += [arg, *args]
            break
        if arg in _DURATION_FLAGS:
            value = next(args, None)
            if value is not None and value[:1] == "-" and value[1:2] in tuple("0123456789."):
                out.append(f"{arg}={value}")
                continue
            out += [arg] if value is None else [arg, value]
            continue
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_joined_negative_durations(sys.argv[1:] if argv is None else argv))
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TerminalSafe(stdout), TerminalSafe(stderr)
    try:
        settings = settings_from_args(args)
        code: int = args.func(args, settings)
    except RuntimeModulesError as exc:
        print(f"runtime-modules: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return int(ExitCode.OK)
    finally:
        sys.stdout, sys.stderr = stdout, stderr
    return code
