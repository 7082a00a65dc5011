"""The rule file format: pydantic models at the boundary, the JSON schema, errors for people.

``_rules`` holds the plain values (conditions, rules, rule sets) and reading; this module is what
a file is checked against, and how each model becomes those values. Validation errors are
translated into ``RuleProblem``s naming the file, the rule and the field, with a hint.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError

from ._errors import RuleProblem
from ._glob import compile_glob, glob_error
from ._registry import MODULE_NAME, field_path
from ._rules import (
    ATTRIBUTE_NAME,
    MAX_DEPTH,
    MAX_DURATION,
    RULE_NAME,
    AllOf,
    AnyOf,
    Condition,
    DeviceCondition,
    LinkCondition,
    Networks,
    Not,
    Pattern,
    parse_duration,
    type_name,
)
from ._world import OperState

# --- the file format (pydantic, at the boundary) -----------------------------------------------


def _check_globs(value: object) -> object:
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        if not value:
            raise PydanticCustomError(
                "empty_list", "an empty list matches nothing", {"hint": "give at least one pattern"}
            )
        items = value
    else:
        raise PydanticCustomError(
            "glob_type",
            f"must be a pattern string or a list of them, not {type_name(value)}",
            {"hint": 'write e.g. "10DE:*" or ["30000", "38000"]'},
        )
    for item in items:
        if not isinstance(item, str):
            raise PydanticCustomError(
                "glob_type",
                f"list items must be pattern strings, not {type_name(item)}",
                {"hint": 'quote numbers: write "30000", not 30000'},
            )
        problem = glob_error(item)
        if problem is not None:
            raise PydanticCustomError("bad_glob", f"bad pattern {item!r}: {problem}")
    return value


def _check_duration(value: object) -> object:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise PydanticCustomError("duration", str(exc)) from None


def _check_bool(value: object) -> object:
    if not isinstance(value, bool):
        raise PydanticCustomError(
            "bool_type",
            f"must be true or false, not {type_name(value)}",
            {"hint": "write true or false without quotes"},
        )
    return value


_GLOBS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
    ],
    "description": "A shell glob (* ? [...]) matched ignoring ASCII case, or a list of globs "
    "of which any may match. An absent value matches only the empty pattern.",
}
Globs = Annotated[str | list[str], PlainValidator(_check_globs), WithJsonSchema(_GLOBS_SCHEMA)]
Duration = Annotated[
    float,
    PlainValidator(_check_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*([0-9]+(\.[0-9]+)?\s*(ms|s|m|h)\s*)+$"},
                {"type": "number", "minimum": 0, "maximum": MAX_DURATION},
            ],
            "description": 'A duration: "500ms", "3s", "2m", "1h", "1m30s", or seconds.',
        }
    ),
]
Flag = Annotated[bool, PlainValidator(_check_bool), WithJsonSchema({"type": "boolean"})]


def _check_networks(value: object) -> object:
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise PydanticCustomError(
            "empty_list", "an empty list matches nothing", {"hint": "give at least one network"}
        )
    for item in items:
        if not isinstance(item, str):
            raise PydanticCustomError(
                "network_type",
                f"must be an address or network string, or a list of them, not {type_name(item)}",
                {"hint": 'write e.g. "10.20.0.0/16" or ["192.168.7.0/24", "fd00:7::/64"]'},
            )
        if "%" in item:
            raise PydanticCustomError(
                "network",
                f"{item!r} has a scope (%…): a rule's link is chosen by its other keys",
                {"hint": 'write the address without it, and the link with ifname = "…"'},
            )
        try:
            Networks.of(item)
        except ValueError as exc:
            raise PydanticCustomError(
                "network",
                f"{item!r} is not an IP address or network ({exc})",
                {"hint": 'write e.g. "10.20.0.0/16", "fd00::/8", or "0.0.0.0/0" for any IPv4'},
            ) from None
    return value


NetworkList = Annotated[
    str | list[str],
    PlainValidator(_check_networks),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ],
            "description": 'An IP network ("10.20.0.0/16", "fd00::/8") or address, or a list of '
            "them of which any may hold.",
        }
    ),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _nonempty(model: BaseModel, what: str, keys: Iterable[str]) -> None:
    if all(getattr(model, k) is None for k in type(model).model_fields):
        raise PydanticCustomError(
            "empty_condition",
            f"empty {what}: it would match anything",
            {"hint": "give at least one of " + ", ".join(keys)},
        )


class DeviceMatch(_Model):
    """``[rule.when.device]``: some udev device matches every key given here."""

    subsystem: Globs | None = Field(None, description='udev subsystem, e.g. "pci", "net", "usb"')
    devtype: Globs | None = Field(None, description='DEVTYPE, e.g. "usb_device", "wlan"')
    driver: Globs | None = Field(None, description='bound driver; "" matches "no driver"')
    sysname: Globs | None = Field(None, description='the last devpath component, e.g. "0-1"')
    devpath: Globs | None = Field(None, description="the path below /sys, e.g. /devices/…")
    properties: dict[str, Globs] | None = Field(
        None, description="udev properties (udevadm info), KEY = pattern; all must match"
    )
    attributes: dict[str, Globs] | None = Field(
        None, description='sysfs attributes, e.g. { boot_vga = "0" }; all must match'
    )
    tags: Globs | None = Field(None, description="udev tags; every listed tag must be present")
    parent: DeviceMatch | None = Field(None, description="an ancestor matching these keys")

    @field_validator("properties", "attributes", mode="after")
    @classmethod
    def _keys(cls, v: dict[str, Any] | None, info: Any) -> dict[str, Any] | None:
        if v is None:
            return v
        if not v:
            raise PydanticCustomError(
                "empty_table",
                "an empty table tests nothing",
                {"hint": "remove it, or add KEY = pattern entries"},
            )
        for key in v:
            if info.field_name == "attributes" and (
                not ATTRIBUTE_NAME.fullmatch(key) or ".." in key.split("/")
            ):
                raise PydanticCustomError(
                    "attribute_name",
                    f"{key!r} is not a sysfs attribute name",
                    {"hint": 'attributes are paths below the device, e.g. "boot_vga"'},
                )
            if not key:
                raise PydanticCustomError("empty_key", "a property name is empty")
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> DeviceMatch:
        _nonempty(self, "device condition", DeviceMatch.model_fields)
        return self


class LinkMatch(_Model):
    """``[rule.when.link]``: some network link matches every key given here."""

    ifname: Globs | None = Field(None, description='interface name, e.g. "enp*", "wg0"')
    kind: Globs | None = Field(None, description='link kind: "veth", "bridge", "wireguard"…')
    operstate: Globs | None = Field(
        None, description="RFC 2863 state: up, down, dormant, lowerlayerdown, unknown…"
    )
    carrier: Flag | None = Field(None, description="whether the link has carrier")
    mac: Globs | None = Field(None, description='MAC address, e.g. "00:e0:4c:*"')
    ip: NetworkList | None = Field(
        None,
        description='an address of the link lies in this network, e.g. "10.20.0.0/16"; '
        '"0.0.0.0/0": any IPv4 address, "::/0": any IPv6 address',
    )

    @field_validator("operstate", mode="after")
    @classmethod
    def _operstate(cls, v: str | list[str] | None) -> str | list[str] | None:
        states = [s.value for s in OperState]
        for item in [v] if isinstance(v, str) else v or []:
            if not any(compile_glob(item).match(s) for s in states):
                close = difflib.get_close_matches(item.lower(), states, n=1, cutoff=0.4)
                raise PydanticCustomError(
                    "operstate",
                    f"{item!r} matches no operational state",
                    {
                        "hint": (f"did you mean `{close[0]}`? " if close else "")
                        + "states: "
                        + ", ".join(states),
                    },
                )
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> LinkMatch:
        _nonempty(self, "link condition", LinkMatch.model_fields)
        return self


class When(_Model):
    """A condition. Several keys in one table must all hold."""

    device: DeviceMatch | None = Field(None, description="some udev device matches")
    link: LinkMatch | None = Field(None, description="some network link matches")
    all_: list[When] | None = Field(None, alias="all", description="every condition holds")
    any_: list[When] | None = Field(None, alias="any", description="some condition holds")
    not_: When | None = Field(None, alias="not", description="the condition does not hold")

    @field_validator("all_", "any_", mode="after")
    @classmethod
    def _items(cls, v: list[When] | None) -> list[When] | None:
        if v is not None and not v:
            raise PydanticCustomError(
                "empty_condition",
                "an empty list of conditions",
                {"hint": "give at least one condition, e.g. [[rule.when.all]] with a device"},
            )
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> When:
        _nonempty(self, "condition", ("device", "link", "all", "any", "not"))
        return self


class RuleModel(_Model):
    """One ``[[rule]]``."""

    name: str = Field(description="unique across all rule files", pattern=RULE_NAME.pattern)
    description: str = ""
    modules: list[str] = Field(min_length=1, description="modules wanted while the rule holds")
    settle: Duration | None = Field(None, description="how long the condition must hold first")
    linger: Duration | None = Field(None, description="how long the rule counts after it stops")
    enabled: Flag = True
    when: When

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: object) -> object:
        if isinstance(v, str) and not RULE_NAME.fullmatch(v):
            raise PydanticCustomError(
                "rule_name",
                f"{v!r} is not a rule name",
                {"hint": "use 1-128 letters, digits and _ . + - (not starting with . + -)"},
            )
        return v

    @field_validator("modules", mode="after")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        for name in v:
            if not MODULE_NAME.fullmatch(name):
                raise PydanticCustomError(
                    "module_name",
                    f"{name!r} is not a module name",
                    {"hint": "module names are letters, digits and _ . + -"},
                )
        return v


class RuleFile(_Model):
    """A rule file: ``[[rule]]`` tables (TOML) or ``{"rule": [...]}`` (JSON)."""

    model_config = ConfigDict(
        title="runtime-modules rules",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    schema_: str | None = Field(None, alias="$schema", description="for editors; ignored")
    rule: list[RuleModel] = Field(default_factory=list, description="the rules")


class _Schema(GenerateJsonSchema):
    # Optional keys are left out, never null (TOML has no null): no "null" branch in the schema.
    def nullable_schema(self, schema: Any) -> Any:
        return self.generate_inner(schema["schema"])


def _drop_null_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _drop_null_defaults(v) for k, v in node.items() if not (k == "default" and v is None)
        }
    if isinstance(node, list):
        return [_drop_null_defaults(v) for v in node]
    return node


def rules_json_schema() -> dict[str, Any]:
    """The JSON Schema of a rule file, for editors (``runtime-modules rules schema``)."""
    schema: dict[str, Any] = _drop_null_defaults(
        RuleFile.model_json_schema(by_alias=True, schema_generator=_Schema)
    )
    return schema


# --- validation errors, for people ----------------------------------------------------------

_DEVICE_KEYS = tuple(DeviceMatch.model_fields)
_LINK_KEYS = tuple(LinkMatch.model_fields)
_WHEN_KEYS = ("device", "link", "all", "any", "not")
_RULE_KEYS = tuple(RuleModel.model_fields)
TOP_KEYS = ("rule", "$schema")
# What people coming from udev rules or other tools write, and what we call it.
_ALIASES = {
    "kernel": "sysname",
    "env": "properties",
    "property": "properties",
    "props": "properties",
    "attr": "attributes",
    "attrs": "attributes",
    "sysattr": "attributes",
    "tag": "tags",
    "subsystems": "parent",
    "drivers": "parent",
    "interface": "ifname",
    "name": "ifname",
    "iface": "ifname",
    "state": "operstate",
    "address": "mac",
    "addr": "ip",
    "addresses": "ip",
    "ips": "ip",
    "network": "ip",
    "prefix": "ip",
    "cidr": "ip",
    "subnet": "ip",
    "type": "kind",
    "module": "modules",
    "rules": "rule",
    "condition": "when",
    "if": "when",
    "and": "all",
    "or": "any",
    "disabled": "enabled",
}


def _keys_at(loc: tuple[int | str, ...]) -> tuple[str, ...]:
    """The keys allowed in the table at ``loc`` (a pydantic location without the bad key)."""
    if len(loc) == 2 and loc[0] == "rule":
        return _RULE_KEYS
    last = loc[-1]
    if last in ("device", "parent"):
        return _DEVICE_KEYS
    if last == "link":
        return _LINK_KEYS
    return _WHEN_KEYS


def suggest(key: str, allowed: Sequence[str]) -> str | None:
    if key.lower() in allowed:
        return f"did you mean `{key.lower()}`? keys are lower-case"
    alias = _ALIASES.get(key.lower())
    if alias in allowed:
        return f"did you mean `{alias}`?"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    if allowed is _DEVICE_KEYS and re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
        return f"udev properties go in a table: properties = {{ {key} = … }}"
    if allowed is _RULE_KEYS and key in _WHEN_KEYS:
        return f"conditions go under `when`: [rule.when.{key}]"
    if allowed is _WHEN_KEYS and key in _DEVICE_KEYS:
        return f"device keys go in a device table: [rule.when.device] {key} = …"
    return "allowed keys: " + ", ".join(allowed)


_MESSAGES = {
    "missing": "required key is missing",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
    "too_short": "must not be empty",
    "string_pattern_mismatch": "has characters that are not allowed",
}


def problems_from(exc: ValidationError, raw: object, index: int, source: str) -> list[RuleProblem]:
    """Problems for people from the errors of rule number ``index`` (0-based) of a file."""
    name = raw.get("name") if isinstance(raw, dict) else None
    # "#2" for the second [[rule]] table when it has no usable name.
    rule = name if isinstance(name, str) and RULE_NAME.fullmatch(name) else f"#{index + 1}"
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        hint = (err.get("ctx") or {}).get("hint")
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            message = f"unknown key `{key}`"
            hint = suggest(key, _keys_at(("rule", index, *loc[:-1])))
        elif kind in _MESSAGES:
            message = _MESSAGES[kind]
            if kind == "missing" and loc == ("when",):
                hint = "add a condition, e.g. [rule.when.device] with subsystem = …"
            elif kind == "missing" and loc == ("modules",):
                hint = 'e.g. modules = ["gaming"]'
            elif kind == "too_short":
                hint = hint or "give at least one item"
            elif kind.startswith("model") and loc and loc[-1] in ("device", "link", "parent"):
                hint = (
                    f"one table: [rule.when.{loc[-1]}]; for several, use [[rule.when.all]] "
                    "or [[rule.when.any]] with one condition each"
                )
        else:
            message = err["msg"]
        problems.append(RuleProblem(source, rule, field_path(loc) or None, message, hint))
    return problems


def depth_ok(data: object) -> bool:
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return True


# --- turning the models into values ---------------------------------------------------------


def _pattern(value: str | list[str] | None) -> Pattern | None:
    return None if value is None else Pattern.of(value)


def _device(m: DeviceMatch) -> DeviceCondition:
    tags: tuple[Pattern, ...] = ()
    if m.tags is not None:
        tags = tuple(Pattern.of(t) for t in ([m.tags] if isinstance(m.tags, str) else m.tags))
    return DeviceCondition(
        subsystem=_pattern(m.subsystem),
        devtype=_pattern(m.devtype),
        driver=_pattern(m.driver),
        sysname=_pattern(m.sysname),
        devpath=_pattern(m.devpath),
        properties=tuple((k, Pattern.of(v)) for k, v in (m.properties or {}).items()),
        attributes=tuple((k, Pattern.of(v)) for k, v in (m.attributes or {}).items()),
        tags=tags,
        parent=None if m.parent is None else _device(m.parent),
    )


def _link(m: LinkMatch) -> LinkCondition:
    return LinkCondition(
        ifname=_pattern(m.ifname),
        kind=_pattern(m.kind),
        operstate=_pattern(m.operstate),
        carrier=m.carrier,
        mac=_pattern(m.mac),
        ip=None if m.ip is None else Networks.of(m.ip),
    )


def condition_of(m: When) -> Condition:
    parts: list[Condition] = []
    if m.device is not None:
        parts.append(_device(m.device))
    if m.link is not None:
        parts.append(_link(m.link))
    if m.all_ is not None:
        parts.append(AllOf(tuple(condition_of(c) for c in m.all_)))
    if m.any_ is not None:
        parts.append(AnyOf(tuple(condition_of(c) for c in m.any_)))
    if m.not_ is not None:
        parts.append(Not(condition_of(m.not_)))
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))
