"""rules check, rules schema, simulate, explain: the rule verbs.

``simulate`` evaluates rules on recorded machines (udev database dumps, umockdev recordings,
``ip -j link`` output) and, with ``--events``, replays a capture through the reconciler
(``_replay``). ``explain`` answers the same question for the live machine, or for a recording,
with the reasons. Every option of ``simulate`` is added in ``add_simulate_arguments`` and every
file it reads is read in ``_world_from_args``: one place each for a new option.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import (
    ConfigError,
    ExitCode,
    RuleError,
    RuntimeModulesError,
    UnknownModuleError,
)
from .._registry import load_registry, unknown_module_message
from .._settings import ENV_REGISTRY, Settings
from ._common import add_verb, non_empty, path_arg, print_json

if TYPE_CHECKING:  # the verbs import the core lazily (startup time of every command)
    from .._evaluate import Evaluation
    from .._rules import Needs, RuleSet
    from .._world import World

__all__ = ["add_simulate_arguments", "live_world", "no_rule_file", "register"]


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add this group's subcommands to ``sub``."""
    rules = _add(sub, common, "rules", "Check rule files, or print their JSON Schema.")
    actions = rules.add_subparsers(dest="rules_action", metavar="ACTION", required=True)

    p = _add(
        actions,
        common,
        "check",
        "Validate rule files and print every problem (exit 1 on any), like `nginx -t`.",
    )
    p.add_argument(
        "rules_paths",
        nargs="*",
        type=path_arg,
        metavar="PATH",
        help="rule files or folders (default: the configured rules, RUNTIME_MODULES_RULES)",
    )
    p.set_defaults(func=cmd_check)

    p = _add(actions, common, "schema", "Print the JSON Schema of rule files, for editors.")
    p.set_defaults(func=cmd_schema)

    p = _add(
        sub,
        common,
        "simulate",
        "Evaluate rules on a recorded machine and print the modules they want.",
    )
    add_simulate_arguments(p)
    p.set_defaults(func=cmd_simulate)

    p = _add(
        sub,
        common,
        "explain",
        "Say why each module is or is not wanted by the rules, on this machine or a recording.",
    )
    p.add_argument("modules", nargs="*", metavar="MODULE", help="only these modules")
    # PATH... as for watch and simulate. It also takes the MODULEs written after it
    # (`explain --rules rules/ gaming`): _explain_paths sorts them out. Its own dest, so that
    # the configured rules are replaced only by what are paths.
    p.add_argument(
        "--rules",
        dest="explain_rules",
        type=non_empty,
        nargs="+",
        action="append",
        metavar="PATH",
        help="rule files or folders (default: the configured rules); after the first PATH, a "
        "bare name (no '/', no .toml/.json) is a MODULE: write ./NAME for a folder here",
    )
    _add_world_arguments(p, many=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_explain)


def _add(sub: Any, common: argparse.ArgumentParser, name: str, text: str) -> Any:
    return add_verb(sub, common, name, help=text, description=text)


def _add_world_arguments(p: argparse.ArgumentParser, *, many: bool = True) -> None:
    """The recording options; ``many``: each takes several files (else one, repeatable)."""
    g = p.add_argument_group("a recorded machine (all files describe one machine)")
    files: dict[str, Any] = {"nargs": "+", "action": "extend"} if many else {"action": "append"}
    g.add_argument(
        "--udev-db",
        dest="udev_dbs",
        type=path_arg,
        default=[],
        metavar="FILE",
        help="`udevadm info --export-db` output",
        **files,
    )
    g.add_argument(
        "--umockdev",
        dest="umockdevs",
        type=path_arg,
        default=[],
        metavar="FILE",
        help="`umockdev-record` output",
        **files,
    )
    g.add_argument(
        "--links",
        dest="link_files",
        action="append",
        type=path_arg,
        default=[],
        metavar="FILE",
        help="`ip -j -d link` output, or `ip -j -d addr` for rules that test addresses",
    )


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of ``simulate``."""
    _add_world_arguments(p)
    p.add_argument(
        "--rules",
        dest="rules_paths",
        nargs="+",
        action="extend",
        type=path_arg,
        required=True,
        metavar="PATH",
        help="rule files or folders",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    from .._replay import add_events_option

    add_events_option(p)


# --- shared ---------------------------------------------------------------------------------


def _known_modules(
    args: argparse.Namespace, settings: Settings, *, implicit: bool
) -> frozenset[str] | None:
    """Module names of the registry, or None when rules may name any module.

    A registry given with ``--registry`` is always read. With ``implicit``, so is the one named
    by RUNTIME_MODULES_REGISTRY, or the NixOS default when it exists (a machine with the NixOS
    module checks against its own modules without being told).
    """
    explicit = getattr(args, "registry", None) is not None
    if explicit or (implicit and (os.environ.get(ENV_REGISTRY) or settings.registry.exists())):
        return load_registry(settings.registry).names
    return None


def _load(settings: Settings, known: frozenset[str] | None) -> RuleSet:
    """The rules of ``settings.rules``; ConfigError when those paths hold no rule file at all
    (a folder of other files, a typo'd folder): nothing would be checked or evaluated."""
    from .._rules import load_rules

    rules = load_rules(
        settings.rules,
        known_modules=known,
        default_settle=settings.default_settle,
        default_linger=settings.default_linger,
    )
    if not rules.sources:
        raise no_rule_file(settings.rules)
    return rules


def no_rule_file(paths: Sequence[Path]) -> ConfigError:
    """The error for rule paths that name no rule file."""
    named = ", ".join(str(p) for p in paths) or "(no path)"
    return ConfigError(
        f"no rule file in {named}: rule files end in .toml or .json (a folder is read for "
        "those, hidden ones skipped); name such files, or folders that hold them"
    )


def _recorded(args: argparse.Namespace) -> bool:
    return bool(args.udev_dbs or args.umockdevs or args.link_files)


def _world_from_args(args: argparse.Namespace, rules: RuleSet) -> World:
    from .._dumps import records_addresses, world_from_files

    if rules.needs().addresses:
        for path in args.link_files:
            if not records_addresses(path):
                print(
                    f"runtime-modules: warning: {path} holds no addresses (made with `ip -j "
                    "link`?), and some rules test `ip`: they see links without any; record "
                    "with `ip -j -d addr > FILE`",
                    file=sys.stderr,
                )
    return world_from_files(udev_dbs=args.udev_dbs, umockdevs=args.umockdevs, links=args.link_files)


def live_world(needs: Needs | None) -> World:
    """The devices and links of this machine now (only what ``needs`` asks for, when given).

    Enumerated with the daemon's own sources, so ``explain`` sees what the daemon sees.
    """
    from .._world import World

    devices = []
    links = []
    if needs is None or needs.devices:
        import pyudev

        from .._udev_source import enumerate_devices

        try:
            devices = enumerate_devices(pyudev.Context(), needs)
        except OSError as exc:
            raise RuntimeModulesError(
                f"cannot enumerate udev devices: {exc}; explain a recording with --udev-db FILE"
            ) from None
    if needs is None or needs.links:
        from .._netlink_source import enumerate_links

        try:
            links = enumerate_links(addresses=needs is None or needs.addresses)
        except OSError as exc:
            raise RuntimeModulesError(
                f"cannot read the network links: {exc}; explain a recording with --links FILE"
            ) from None
    return World.of(devices, links)


def _module_names(rules: RuleSet, known: frozenset[str] | None) -> list[str]:
    return sorted(known if known is not None else rules.modules)


# --- rules check / schema -------------------------------------------------------------------


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    known = _known_modules(args, settings, implicit=True)
    try:
        rules = _load(settings, known)
    except RuleError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        bad = {p.file for p in exc.problems}
        n = len(exc.problems)
        print(
            f"rules check failed: {n} problem{'s' * (n != 1)} in "
            f"{len(bad)} file{'s' * (len(bad) != 1)}",
            file=sys.stderr,
        )
        return int(ExitCode.FAILURE)
    files = rules.sources
    names = ", ".join(sorted(rules.modules)) or "none"
    checked = (
        f"checked against {settings.registry}"
        if known is not None
        else "not checked (no registry; give --registry)"
    )
    print(
        f"rules OK: {len(rules.rules)} rule{'s' * (len(rules.rules) != 1)} in "
        f"{len(files)} file{'s' * (len(files) != 1)}; modules {names}; module names {checked}"
    )
    return int(ExitCode.OK)


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from .._rules import rules_json_schema

    print_json(rules_json_schema())
    return int(ExitCode.OK)


# --- simulate -------------------------------------------------------------------------------


def simulation(
    rules: RuleSet, evaluation: Evaluation, modules: list[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """The JSON of ``simulate``: each module, whether rules want it, and each rule's matches."""
    wanted = evaluation.wanted_modules()
    return {
        "modules": {m: {"enabled": m in wanted, "rules": list(wanted.get(m, ()))} for m in modules},
        "rules": {
            r.name: {
                "active": evaluation.active(r.name),
                "matches": list(evaluation[r.name].matches),
            }
            for r in rules.rules
        },
    }


def _print_simulation(rules: RuleSet, data: dict[str, dict[str, dict[str, Any]]]) -> None:
    width = max((len(m) for m in data["modules"]), default=0)
    for name, module in data["modules"].items():
        state = "enabled " if module["enabled"] else "disabled"
        by = f"  by {', '.join(module['rules'])}" if module["rules"] else ""
        print(f"{name:<{width}}  {state}{by}")
    if data["modules"] and rules.rules:
        print()
    for rule in rules.rules:
        entry = data["rules"][rule.name]
        state = "active" if entry["active"] else "inactive"
        if not rule.enabled:
            state += " (enabled = false" + ("; its condition holds)" if entry["matches"] else ")")
        print(f"rule {rule.name}: {state}")
        for match in entry["matches"]:
            print(f"  {match}")


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from .._evaluate import evaluate

    known = _known_modules(args, settings, implicit=False)
    rules = _load(settings, known)
    world = _world_from_args(args, rules)
    if not _recorded(args):
        print(
            "simulate: no --udev-db, --umockdev or --links given: starting from an empty machine",
            file=sys.stderr,
        )
    if getattr(args, "events", None):
        from .._replay import run_events

        return run_events(args, rules, world)
    evaluation = evaluate(rules, world)
    data = simulation(rules, evaluation, _module_names(rules, known))
    if args.json:
        print_json(data)
    else:
        _print_simulation(rules, data)
    return int(ExitCode.OK)


# --- explain --------------------------------------------------------------------------------


def _explain_paths(groups: list[list[str]]) -> tuple[list[Path], list[str]]:
    """The rule paths and the MODULEs among the values of ``--rules PATH...``.

    The first value of each ``--rules`` is a path; a later one is a MODULE when it is a bare
    name: a module name's shape, no '/' and no .toml/.json suffix, as in ``explain --rules
    rules/ gaming``. Whether a file of that name exists does not matter, so the reading never
    depends on the current directory: a folder here is written ``./lab`` or ``lab/``.
    """
    from .._registry import MODULE_NAME

    paths: list[Path] = []
    modules: list[str] = []
    for first, *rest in groups:
        paths.append(Path(first))
        for text in rest:
            if MODULE_NAME.fullmatch(text) and Path(text).suffix not in (".toml", ".json"):
                modules.append(text)
            else:
                paths.append(Path(text))
    return paths, modules


def cmd_explain(args: argparse.Namespace, settings: Settings) -> int:
    from .._evaluate import evaluate
    from .._explain import explain

    paths, after_rules = _explain_paths(args.explain_rules or [])
    if paths:
        settings = settings.with_(rules=tuple(paths))
    known = _known_modules(args, settings, implicit=True)
    rules = _load(settings, known)
    asked: list[str] = list(dict.fromkeys([*args.modules, *after_rules]))
    names = set(known if known is not None else rules.modules)
    for module in asked:
        if module in names:
            continue
        # A typo in a path after --rules reads as a module: say which reading was made.
        taken = (
            f" (a bare name after --rules is a module; write ./{module} for a folder)"
            if module in after_rules
            else ""
        )
        if known is not None:
            raise UnknownModuleError(unknown_module_message(module, known) + taken)
        close = difflib.get_close_matches(module, sorted(names), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"rules name: {', '.join(sorted(names))}"
        raise UnknownModuleError(f"no rule names module {module!r}; {hint}{taken}")
    world = _world_from_args(args, rules) if _recorded(args) else live_world(rules.needs())
    evaluation = evaluate(rules, world)
    explanations = explain(rules, world, evaluation, asked or None)
    modules = asked or _module_names(rules, known)
    wanted = evaluation.wanted_modules()
    if args.json:
        print_json(
            {
                "modules": {
                    m: {"wanted": m in wanted, "rules": list(wanted.get(m, ()))} for m in modules
                },
                "rules": {e.rule: e.to_json() for e in explanations},
            }
        )
        return int(ExitCode.OK)
    for module in modules:
        mine = [e for e in explanations if module in e.modules]
        if module in wanted:
            print(f"{module}: wanted")
        elif mine:
            print(f"{module}: not wanted")
        else:
            print(f"{module}: not wanted: no rule names it (it changes only by hand)")
        for e in mine:
            for line in e.text().splitlines():
                print(f"  {line}")
    return int(ExitCode.OK)
