"""Rules: the file format, its validation, and the plain values the rest of the code uses.

A rule file is TOML, or JSON with the same structure (the NixOS module writes JSON)::

    [[rule]]
    name = "gaming-on-nvidia-gpu"
    modules = ["gaming"]
    settle = "3s"
    [rule.when.device]
    subsystem = "pci"
    properties = { PCI_ID = "10DE:*" }

The files are validated by the pydantic models of ``_rule_format`` (the boundary; they also give
the JSON Schema of ``rules schema``), then turned into frozen dataclasses with compiled globs
(``Rule``, ``DeviceCondition``, …) that evaluation uses. Every problem of every file is collected
and raised at once as a ``RuleError``, each naming the file, the rule and the dotted field, with a
hint. The format reference is docs/rules.md; these two modules are its implementation.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import RuleError, RuleProblem
from ._glob import Glob, compile_glob, fold
from ._registry import MODULE_NAME

__all__ = [
    "MAX_DURATION",
    "AllOf",
    "AnyOf",
    "Condition",
    "DeviceCondition",
    "LinkCondition",
    "Needs",
    "Networks",
    "Not",
    "Pattern",
    "Rule",
    "RuleSet",
    "load_rules",
    "parse_duration",
    "parse_rules",
    "rule_files",
    "rules_json_schema",
]

# Rule names are in logs, journal fields and CLI output: the same tame set as module names.
RULE_NAME = MODULE_NAME
# A settle or linger longer than a week is surely a typo (and would outlive most uptimes).
MAX_DURATION = 7 * 86400.0
# A rule file is written by hand or by the NixOS module; megabytes mean a wrong file.
MAX_FILE_SIZE = 4 * 1024 * 1024
# Deeper nesting than this is no rule anyone writes; the cap keeps validation off the C stack.
MAX_DEPTH = 32
# Sysfs attribute names are paths below the device ("boot_vga", "power/control").
ATTRIBUTE_NAME = re.compile(r"^[A-Za-z0-9_:.+-]+(/[A-Za-z0-9_:.+-]+)*$")

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Suffixes of files in a rules folder that were surely meant as rule files, but are not read.
_NEAR_SUFFIXES = frozenset({".toml", ".json", ".tml", ".yml", ".yaml"})
_DURATION_HELP = 'write e.g. "500ms", "3s", "2m", "1m30s" or a number of seconds'


# --- the values evaluation uses -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pattern:
    """A value test: a glob, or a list of globs of which any may match.

    An absent value (a device without that property, a NIC with no driver) matches only the
    empty pattern ``""``, so ``driver = ""`` means "no driver bound" as in udev rules.
    """

    globs: tuple[Glob, ...]
    # The folded texts when every glob is a literal (most are): one set lookup then.
    _literals: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _absent: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        texts = [g.literal for g in self.globs]
        literals = None if None in texts else frozenset(t for t in texts if t is not None)
        object.__setattr__(self, "_literals", literals)
        object.__setattr__(self, "_absent", any(g.pattern == "" for g in self.globs))

    @classmethod
    def of(cls, value: str | Sequence[str]) -> Pattern:
        items = (value,) if isinstance(value, str) else tuple(value)
        return cls(tuple(compile_glob(item) for item in items))

    def match(self, value: str | None) -> bool:
        if value is None:
            return self._absent
        folded = value.lower() if value.isascii() else fold(value)
        if self._literals is not None:
            return folded in self._literals
        # A loop, not any() over a generator: this runs for every key on every uevent.
        for g in self.globs:  # noqa: SIM110
            if g.match_folded(folded):
                return True
        return False

    def match_folded(self, folded: str) -> bool:
        for g in self.globs:  # noqa: SIM110
            if g.match_folded(folded):
                return True
        return False

    @property
    def literals(self) -> frozenset[str] | None:
        """The folded values this pattern equals, or None when any item is a wildcard."""
        return self._literals

    def __str__(self) -> str:
        if len(self.globs) == 1:
            return self.globs[0].pattern
        return "[" + ", ".join(g.pattern for g in self.globs) + "]"


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Networks:
    """An address test: some address of the link lies in one of these networks.

    "10.20.0.0/16" holds for 10.20.3.4/24; "0.0.0.0/0" for any IPv4 address, "::/0" for any IPv6
    one; a plain address ("192.168.1.5") for that address only.
    """

    networks: tuple[IPNetwork, ...]

    @classmethod
    def of(cls, value: str | Sequence[str]) -> Networks:
        """Raises ValueError for what is not an address or a network."""
        items = (value,) if isinstance(value, str) else tuple(value)
        return cls(tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items))

    def match(self, addresses: Iterable[str]) -> bool:
        for text in addresses:
            try:
                # "10.20.0.5/16", or "10.0.0.1 peer 10.0.0.2/32": the link's own address first.
                ip = ipaddress.ip_interface(text.split(" ", 1)[0]).ip
            except ValueError:
                continue
            # ``in`` is False across versions (an IPv4 address in an IPv6 network), never raises.
            if any(ip in net for net in self.networks):
                return True
        return False

    def __str__(self) -> str:
        texts = [str(n) for n in self.networks]
        return texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceCondition:
    """Some udev device matches every key given (None / empty: not tested)."""

    subsystem: Pattern | None = None
    devtype: Pattern | None = None
    driver: Pattern | None = None
    sysname: Pattern | None = None
    devpath: Pattern | None = None
    properties: tuple[tuple[str, Pattern], ...] = ()
    attributes: tuple[tuple[str, Pattern], ...] = ()  # compared without trailing whitespace
    tags: tuple[Pattern, ...] = ()  # each must match one of the device's tags
    parent: DeviceCondition | None = None  # some ancestor matches this

    def key_patterns(self) -> list[tuple[str, Pattern]]:
        """The tested keys as (label, pattern), in the order explanations print them."""
        out: list[tuple[str, Pattern]] = []
        for name in ("subsystem", "devtype", "driver", "sysname", "devpath"):
            pattern = getattr(self, name)
            if pattern is not None:
                out.append((name, pattern))
        out.extend(self.properties)
        out.extend((f"attribute {k}", p) for k, p in self.attributes)
        out.extend(("tag", p) for p in self.tags)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkCondition:
    """Some network link matches every key given."""

    ifname: Pattern | None = None
    kind: Pattern | None = None
    operstate: Pattern | None = None
    carrier: bool | None = None
    mac: Pattern | None = None
    ip: Networks | None = None


@dataclass(frozen=True, slots=True)
class AllOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: Condition


Condition = DeviceCondition | LinkCondition | AllOf | AnyOf | Not


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    name: str
    description: str = ""
    modules: tuple[str, ...]
    settle: float  # seconds the condition must hold before the rule counts
    linger: float  # seconds the rule keeps counting after the condition stops
    enabled: bool = True
    when: Condition
    source: str  # the file it came from


@dataclass(frozen=True, slots=True)
class Needs:
    """What evaluating a rule set needs from the live sources, so they read nothing more.

    Both filters are safe on their own: every device that some device condition (``parent``
    ones included) can match has one of ``subsystems`` when it is not None, and carries one of
    ``tags`` when it is not empty.
    """

    subsystems: frozenset[str] | None  # None: some device condition has no literal subsystem
    # Empty: some device condition requires no literal tag. No source filters on tags yet, so it
    # is left out of equality: a rule edit that changes only tags must not reopen the monitors.
    tags: frozenset[str] = field(compare=False)
    attributes: frozenset[str]  # the sysfs attributes conditions test
    links: bool  # some rule has a link condition
    devices: bool  # some rule has a device condition
    addresses: bool = False  # some link condition tests IP addresses (`ip`)


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def modules(self) -> frozenset[str]:
        """Every module some rule names."""
        return frozenset(m for r in self.rules for m in r.modules)

    def needs(self) -> Needs:
        subsystems: set[str] | None = set()
        tags: set[str] | None = set()
        attributes: set[str] = set()
        links = devices = False
        for device in _device_conditions(r.when for r in self.rules):
            devices = True
            literals = device.subsystem.literals if device.subsystem is not None else None
            if literals is None:
                subsystems = None
            elif subsystems is not None:
                subsystems |= literals
            required = set().union(*(p.literals or () for p in device.tags))
            if not required:
                tags = None
            elif tags is not None:
                tags |= required
            attributes.update(k for k, _ in device.attributes)
        addresses = False
        for r in self.rules:
            for c in walk(r.when):
                if isinstance(c, LinkCondition):
                    links = True
                    addresses = addresses or c.ip is not None
        return Needs(
            subsystems=None if subsystems is None else frozenset(subsystems),
            tags=frozenset(tags or ()),
            attributes=frozenset(attributes),
            links=links,
            devices=devices,
            addresses=addresses,
        )


def walk(condition: Condition) -> Iterable[Condition]:
    """``condition`` and every condition inside it (not the ``parent`` of device conditions)."""
    stack = [condition]
    while stack:
        c = stack.pop()
        yield c
        if isinstance(c, AllOf | AnyOf):
            stack.extend(reversed(c.items))
        elif isinstance(c, Not):
            stack.append(c.item)


def _device_conditions(conditions: Iterable[Condition]) -> Iterable[DeviceCondition]:
    """Every device condition at every level, parents included."""
    for top in conditions:
        for c in walk(top):
            device = c if isinstance(c, DeviceCondition) else None
            while device is not None:
                yield device
                device = device.parent


# --- durations ------------------------------------------------------------------------------


def parse_duration(value: object) -> float:
    """Seconds in ``value``: "500ms", "3s", "2m", "1h", "1m30s", or a number of seconds.

    Raises:
        ValueError: with a message for the user.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, not {str(value).lower()}; {_DURATION_HELP}")
    try:
        seconds = _seconds_of(value)
    except OverflowError:  # float(10**400): an integer too large for a float is too long
        raise ValueError(f"a number of {len(str(value))} digits is longer than a week") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration of zero or more seconds")
    if seconds > MAX_DURATION:
        raise ValueError(f"{value!r} is longer than a week; {_DURATION_HELP}")
    return seconds


def _seconds_of(value: object) -> float:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if text[pos : m.start()].strip():
                break
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if not text or pos == 0 or text[pos:].strip():
            if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
                raise ValueError(
                    f"{value!r} is a number in quotes, which has no unit; write {text} (seconds) "
                    f'without quotes, or "{text}s"'
                )
            raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP}")
        return seconds
    raise ValueError(f"expected a duration, not {type_name(value)}; {_DURATION_HELP}")


def type_name(value: object) -> str:
    return {
        bool: "true/false",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def rules_json_schema() -> dict[str, Any]:
    """The JSON schema of rule files (for editors and `rules schema`); see ``_rule_format``."""
    from ._rule_format import rules_json_schema as schema

    return schema()


# --- reading ----------------------------------------------------------------------------------


def _decode(content: str | bytes | Mapping[str, Any], source: str) -> Any:
    """The data in one file's content; raises RuleError naming the file and line."""
    if isinstance(content, Mapping):
        return content
    if isinstance(content, bytes):
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RuleError(
                [RuleProblem(source, None, None, f"not UTF-8 text (byte {exc.start})")]
            ) from None
    else:
        text = content
    text = text.removeprefix("\ufeff")
    as_json = source.endswith(".json") or (
        not source.endswith(".toml") and text.lstrip().startswith("{")
    )
    try:
        return json.loads(text) if as_json else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        message = f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    except tomllib.TOMLDecodeError as exc:
        message = f"not valid TOML: {exc}"
    except RecursionError:
        message = f"nested too deeply (more than {MAX_DEPTH} levels)"
    except ValueError as exc:  # JSON numbers too long for int(), lone surrogates
        message = f"not valid {'JSON' if as_json else 'TOML'}: {exc}"
    raise RuleError([RuleProblem(source, None, None, message)])


def _parse(
    content: str | bytes | Mapping[str, Any],
    source: str,
    default_settle: float,
    default_linger: float,
    known_modules: frozenset[str] | None = None,
) -> tuple[list[Rule], list[RuleProblem]]:
    """The valid rules of one file, and the problems of the others.

    Each ``[[rule]]`` is validated on its own, so one broken rule does not hide the duplicate
    names or unknown modules of the rest of the file; nor do its other problems hide its own
    unknown modules (the valid rules' modules are checked with the whole set, by ``_check_set``).
    """
    try:
        data = _decode(content, source)
    except RuleError as exc:
        return [], exc.problems
    if not isinstance(data, Mapping):
        hint = 'a JSON rule file is an object: {"rule": [ … ]}'
        return [], [RuleProblem(source, None, None, "must be a table of [[rule]]s", hint)]

    # Here, not at the top: _rule_format builds on this module's values.
    from pydantic import ValidationError

    from ._rule_format import TOP_KEYS, RuleModel, condition_of, depth_ok, problems_from, suggest

    if not depth_ok(data):
        message = f"nested too deeply (more than {MAX_DEPTH} levels)"
        return [], [RuleProblem(source, None, None, message)]
    problems = [
        RuleProblem(source, None, str(key), f"unknown key `{key}`", suggest(str(key), TOP_KEYS))
        for key in data
        if key not in TOP_KEYS
    ]
    if not isinstance(data.get("$schema", ""), str):
        problems.append(RuleProblem(source, None, "$schema", "must be a string"))
    items = data.get("rule", [])
    if not isinstance(items, list):
        hint = "write each rule as a [[rule]] table (JSON: a list of objects)"
        return [], [*problems, RuleProblem(source, None, "rule", "must be a list of rules", hint)]
    rules = []
    for index, raw in enumerate(items):
        try:
            m = RuleModel.model_validate(raw, by_alias=True, by_name=False)
        except ValidationError as exc:
            found = problems_from(exc, raw, index, source)
            problems.extend(found)
            modules = raw.get("modules") if isinstance(raw, dict) else None
            if known_modules is not None and isinstance(modules, list) and found:
                problems.extend(_unknown_modules(source, found[0].rule, modules, known_modules))
            continue
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # What a validator did not foresee is still a problem of this rule, not a crash:
            # a daemon reloading on SIGHUP must keep its rules and say why.
            rule = raw.get("name") if isinstance(raw, dict) else None
            name = rule if isinstance(rule, str) and RULE_NAME.fullmatch(rule) else f"#{index + 1}"
            problems.append(RuleProblem(source, name, None, f"cannot be read: {exc}"))
            continue
        rules.append(
            Rule(
                name=m.name,
                description=m.description,
                modules=tuple(dict.fromkeys(m.modules)),
                settle=default_settle if m.settle is None else m.settle,
                linger=default_linger if m.linger is None else m.linger,
                enabled=m.enabled,
                when=condition_of(m.when),
                source=source,
            )
        )
    return rules, problems


def _check_set(
    rules: list[Rule], known_modules: frozenset[str] | None
) -> tuple[list[Rule], list[RuleProblem]]:
    """Rules with unique names and known modules, and the problems of the others."""
    problems: list[RuleProblem] = []
    first: dict[str, Rule] = {}
    for r in rules:
        if r.name in first:
            other = first[r.name]
            where = "earlier in this file" if other.source == r.source else f"in {other.source}"
            problems.append(
                RuleProblem(
                    r.source,
                    r.name,
                    "name",
                    f"duplicate rule name; it is already defined {where}",
                    "rename one of them: names are unique across all rule files",
                )
            )
            continue
        first[r.name] = r
        if known_modules is None:
            continue
        problems.extend(_unknown_modules(r.source, r.name, r.modules, known_modules))
    return list(first.values()), problems


def _unknown_modules(
    source: str, rule: str | None, modules: Sequence[object], known_modules: frozenset[str]
) -> Iterable[RuleProblem]:
    """A problem for each module name in ``modules`` that the registry does not list."""
    for index, module in enumerate(modules):
        if not isinstance(module, str) or not MODULE_NAME.fullmatch(module):
            continue  # not a name at all: the format check says so
        if module in known_modules or module in modules[:index]:
            continue
        close = difflib.get_close_matches(module, sorted(known_modules), n=1, cutoff=0.5)
        if close:
            hint = f"did you mean `{close[0]}`?"
        elif known_modules:
            hint = "known modules: " + ", ".join(sorted(known_modules))
        else:
            hint = "the registry lists no modules"
        yield RuleProblem(
            source,
            rule,
            f"modules[{index}]",
            f"unknown module `{module}` (not in the registry)",
            hint,
        )


def parse_rules(
    content: str | bytes | Mapping[str, Any],
    source: str,
    *,
    known_modules: frozenset[str] | None = None,
    default_settle: float = 3.0,
    default_linger: float = 30.0,
) -> RuleSet:
    """The rules in one file's content (TOML or JSON text, or already decoded data).

    ``source`` names the file in errors; a name ending in ``.json`` is read as JSON, ``.toml`` as
    TOML, anything else as JSON when it starts with ``{``.

    Raises:
        RuleError: with every problem found.
    """
    rules, problems = _parse(content, source, default_settle, default_linger, known_modules)
    rules, more = _check_set(rules, known_modules)
    if problems or more:
        raise RuleError(problems + more)
    return RuleSet(tuple(rules), (source,))


def rule_files(paths: Sequence[Path]) -> tuple[list[Path], list[RuleProblem]]:
    """The files that ``paths`` name: files as given, folders as their ``*.toml``/``*.json``.

    Hidden files (editor locks such as ``.#x.toml``) are skipped; order is by name within a
    folder, so the error output and rule order are stable. A file named twice (``rules
    rules/lab.toml``) is read once, where it is first named.
    """
    files: list[Path] = []
    problems: list[RuleProblem] = []
    for path in paths:
        if path.is_dir():
            try:
                entries = sorted(path.iterdir())
            except OSError as exc:
                problems.append(RuleProblem(str(path), None, None, f"cannot list: {exc.strerror}"))
                continue
            for p in entries:
                if p.name.startswith(".") or not p.is_file():
                    continue
                if p.suffix in (".toml", ".json"):
                    files.append(p)
                elif (suffix := p.suffix.lower()) in _NEAR_SUFFIXES:
                    # Meant as a rule file, surely, but never read: say so, or its rules are
                    # missing without a word ("rules OK: 0 rules").
                    hint = f"rename it to {p.stem}{'.json' if suffix == '.json' else '.toml'}"
                    if suffix in (".yml", ".yaml"):
                        hint += " (YAML is not read: write TOML)"
                    message = "not read: rule files end in .toml or .json"
                    problems.append(RuleProblem(str(p), None, None, message, hint))
        elif path.exists():
            files.append(path)
        else:
            problems.append(
                RuleProblem(
                    str(path),
                    None,
                    None,
                    "no such file or folder",
                    "give rule files (*.toml, *.json) or folders of them with --rules or "
                    "RUNTIME_MODULES_RULES; on NixOS, services.runtimeModules.rules writes them",
                )
            )
    seen: set[Path] = set()
    unique = []
    for file in files:
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(file)
    return unique, problems


def _read(path: Path) -> bytes | RuleProblem:
    try:
        with path.open("rb") as f:
            content = f.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        return RuleProblem(str(path), None, None, f"cannot read: {exc.strerror}")
    if len(content) > MAX_FILE_SIZE:
        return RuleProblem(
            str(path),
            None,
            None,
            f"larger than {MAX_FILE_SIZE // 1024 // 1024} MiB; not a rule file",
        )
    if not content.strip():
        # An editor that truncates before it writes, caught by a SIGHUP in between, must not
        # make the daemon drop every rule of the file: an empty file is an error, and a reload
        # keeps the last good rules. A file meant to hold no rules says so: `rule = []`.
        return RuleProblem(
            str(path),
            None,
            None,
            "the file is empty",
            'write `rule = []` (TOML) or {"rule": []} (JSON) for a file with no rules',
        )
    return content


def load_rules(
    paths: Sequence[Path],
    *,
    known_modules: frozenset[str] | None = None,
    default_settle: float = 3.0,
    default_linger: float = 30.0,
) -> RuleSet:
    """Read and check every rule in ``paths`` (files, and folders of ``*.toml``/``*.json``).

    Names must be unique across all files; with ``known_modules`` every module a rule names must
    be one of them.

    Raises:
        RuleError: with every problem of every file.
    """
    files, problems = rule_files(paths)
    rules: list[Rule] = []
    for path in files:
        content = _read(path)
        if isinstance(content, RuleProblem):
            problems.append(content)
            continue
        found, more = _parse(content, str(path), default_settle, default_linger, known_modules)
        rules.extend(found)
        problems.extend(more)
    rules, more = _check_set(rules, known_modules)
    problems.extend(more)
    if problems:
        raise RuleError(problems)
    return RuleSet(tuple(rules), tuple(str(p) for p in files))
