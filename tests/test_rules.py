"""The rule format: parsing TOML and JSON, every error with file, rule, field and a hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime_modules._errors import RuleError, RuleProblem
from runtime_modules._rules import (
    AllOf,
    AnyOf,
    DeviceCondition,
    LinkCondition,
    Needs,
    Not,
    RuleSet,
    load_rules,
    parse_duration,
    parse_rules,
    rules_json_schema,
)
from tests.fixtures.world import json_values, to_toml

ISSUE_EXAMPLE = """
[[rule]]
name = "gaming-on-nvidia-gpu"          # required, unique across all files
description = "Steam and friends while an NVIDIA GPU is present"
modules = ["gaming"]                   # required, at least one
settle = "3s"
linger = "30s"
enabled = true

[rule.when.device]                     # some udev device matches every key given here
subsystem = "pci"
properties = { PCI_ID = "10DE:*", PCI_CLASS = ["30000", "30200", "38000"] }

[[rule]]
name = "virtualization-when-docked"
modules = ["virtualization"]
[rule.when.device]
subsystem = "net"
properties = { ID_BUS = "usb" }
[rule.when.device.parent]              # and one of its ancestors matches this
subsystem = "usb"
properties = { ID_VENDOR_ID = "17ef" }

[[rule]]
name = "lab-when-lab-nic-up"
modules = ["lab"]
[rule.when.link]                       # some network link matches
ifname = "enp*"
operstate = "up"
"""

MODULES = frozenset({"gaming", "virtualization", "lab"})


def problems(
    content: str | bytes | dict[str, object], source: str = "r.toml", **kw: object
) -> list[RuleProblem]:
    with pytest.raises(RuleError) as info:
        parse_rules(content, source, **kw)  # type: ignore[arg-type]
    return info.value.problems


def one(content: str | dict[str, object], source: str = "r.toml", **kw: object) -> RuleProblem:
    found = problems(content, source, **kw)
    assert len(found) == 1, found
    return found[0]


def rule(when: str, extra: str = "") -> str:
    return f'[[rule]]\nname = "r"\nmodules = ["gaming"]\n{extra}\n{when}\n'


# --- the format -----------------------------------------------------------------------------


def test_issue_example_parses_exactly() -> None:
    rules = parse_rules(ISSUE_EXAMPLE, "/etc/x.toml", known_modules=MODULES)
    gaming, docked, lab = rules.rules
    assert (gaming.name, gaming.modules, gaming.settle, gaming.linger) == (
        "gaming-on-nvidia-gpu",
        ("gaming",),
        3.0,
        30.0,
    )
    assert (
        gaming.description.startswith("Steam") and gaming.enabled and gaming.source == "/etc/x.toml"
    )
    assert isinstance(gaming.when, DeviceCondition)
    assert [(k, str(p)) for k, p in gaming.when.properties] == [
        ("PCI_ID", "10DE:*"),
        ("PCI_CLASS", "[30000, 30200, 38000]"),
    ]
    assert isinstance(docked.when, DeviceCondition) and docked.when.parent is not None
    assert str(docked.when.parent.subsystem) == "usb"
    assert isinstance(lab.when, LinkCondition) and str(lab.when.operstate) == "up"
    assert rules.sources == ("/etc/x.toml",)


def test_json_is_the_same_structure() -> None:
    data = {
        "$schema": "https://example.org/rules.schema.json",
        "rule": [
            {
                "name": "gaming-on-nvidia-gpu",
                "description": "Steam and friends while an NVIDIA GPU is present",
                "modules": ["gaming"],
                "settle": "3s",
                "linger": "30s",
                "enabled": True,
                "when": {
                    "device": {
                        "subsystem": "pci",
                        "properties": {
                            "PCI_ID": "10DE:*",
                            "PCI_CLASS": ["30000", "30200", "38000"],
                        },
                    }
                },
            }
        ],
    }
    from_json = parse_rules(json.dumps(data), "x.json")
    from_toml = parse_rules(ISSUE_EXAMPLE, "x.json".replace("json", "toml"))
    assert from_json.rules[0].when == from_toml.rules[0].when
    assert from_json.rules[0].settle == 3.0


def test_defaults_and_combinators() -> None:
    text = """
[[rule]]
name = "r"
modules = ["a", "b", "a"]
enabled = false
[[rule.when.all]]
device = { subsystem = "pci" }
[[rule.when.all]]
any = [{ link = { ifname = "wg0" } }, { not = { device = { driver = "" } } }]
"""
    (r,) = parse_rules(text, "r.toml", default_settle=1.5, default_linger=0).rules
    assert (r.settle, r.linger, r.enabled, r.modules) == (1.5, 0.0, False, ("a", "b"))
    assert isinstance(r.when, AllOf)
    device, anyof = r.when.items
    assert isinstance(device, DeviceCondition) and isinstance(anyof, AnyOf)
    assert isinstance(anyof.items[1], Not)


def test_several_keys_in_one_table_must_all_hold() -> None:
    (r,) = parse_rules(
        rule('[rule.when]\ndevice = { subsystem = "pci" }\nlink = { ifname = "x" }'), "r.toml"
    ).rules
    assert isinstance(r.when, AllOf) and len(r.when.items) == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("3s", 3),
        ("2m", 120),
        ("1h", 3600),
        ("1m30s", 90),
        (" 1.5s ", 1.5),
        (0, 0),
        (2.5, 2.5),
    ],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_quoted_number_is_told_to_lose_its_quotes() -> None:
    p = one(rule('[rule.when.link]\nifname = "x"', extra='settle = "3"'))
    assert (p.field, p.message) == (
        "settle",
        "'3' is a number in quotes, which has no unit; write 3 (seconds) without quotes, or \"3s\"",
    )


@pytest.mark.parametrize(
    "bad",
    ["3", "3 sec", "-1s", "s", "", "1s2", "8d", True, None, [1], float("nan"), -1, 1e300, 10**400],
)
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match=r"duration|week|no unit"):
        parse_duration(bad)


def test_needs() -> None:
    tagged = rule('[rule.when.device]\ntags = ["seat", "u*"]\nattributes = { boot_vga = "0" }')
    needs = parse_rules(ISSUE_EXAMPLE + tagged, "r.toml").needs()
    assert needs.subsystems is None  # the last rule names no subsystem: listen to all
    assert needs.tags == frozenset()  # the other rules require no tag: no tag filter either
    assert needs.attributes == frozenset({"boot_vga"})
    assert needs.links and needs.devices
    only = parse_rules(ISSUE_EXAMPLE, "r.toml").needs()
    assert only.subsystems == frozenset({"pci", "net", "usb"})  # parents' subsystems included
    assert parse_rules(tagged, "r.toml").needs().tags == frozenset({"seat"})  # "u*" is no filter
    assert RuleSet().needs() == Needs(frozenset(), frozenset(), frozenset(), False, False)
    assert not needs.addresses  # no rule tests an address: no address group is joined
    for when in (
        '[rule.when.link]\nip = "10.20.0.0/16"',
        '[[rule.when.any]]\ndevice.subsystem = "pci"\n[[rule.when.any]]\nnot.link.ip = "::/0"',
    ):
        addressed = parse_rules(rule(when), "r.toml").needs()
        assert addressed.addresses and addressed.links, when


# --- errors: file, rule, field, hint --------------------------------------------------------


def test_unknown_keys_get_did_you_mean() -> None:
    p = one(rule('[rule.when.device]\nsubsystem = "pci"\npropertis = { PCI_ID = "10DE:*" }'))
    assert (p.file, p.rule, p.field) == ("r.toml", "r", "when.device.propertis")
    assert p.message == "unknown key `propertis`" and p.hint == "did you mean `properties`?"
    assert str(p) == (
        "r.toml: rule r: when.device.propertis: unknown key `propertis` "
        "(did you mean `properties`?)"
    )


@pytest.mark.parametrize(
    ("when", "field", "hint"),
    [
        (
            '[rule.when.device]\nSubsystem = "pci"',
            "when.device.Subsystem",
            "`subsystem`? keys are lower-case",
        ),
        ('[rule.when.device]\nKERNEL = "sda"', "when.device.KERNEL", "`sysname`"),
        (
            '[rule.when.device]\nPCI_ID = "10DE:*"',
            "when.device.PCI_ID",
            "properties = { PCI_ID = … }",
        ),
        ('[rule.when.link]\nstate = "up"', "when.link.state", "`operstate`"),
        ('[rule.when.link]\naddr = "10.0.0.0/8"', "when.link.addr", "`ip`"),
        ('[rule.when.link]\nsubnet = "10.0.0.0/8"', "when.link.subnet", "`ip`"),
        (
            '[rule.when.device]\nsubsystem = "pci"\n[rule.when.device.parent]\nvendor = "x"',
            "when.device.parent.vendor",
            "allowed keys",
        ),
        ('[rule.device]\nsubsystem = "pci"', "device", "[rule.when.device]"),
        ('[rule.when]\nsubsystem = "pci"', "when.subsystem", "[rule.when.device]"),
    ],
)
def test_unknown_key_hints(when: str, field: str, hint: str) -> None:
    found = problems(
        rule(when)
        if not when.startswith("[rule.device]")
        else rule('[rule.when.link]\nifname = "x"\n' + when)
    )
    p = next(p for p in found if p.field == field)
    assert p.hint is not None and hint in p.hint, p


def test_unknown_top_level_key() -> None:
    p = one('[[rules]]\nname = "x"')
    assert (p.rule, p.field, p.hint) == (None, "rules", "did you mean `rule`?")


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(rule('[rule.when.device]\nsubsystem = "pci"'))
    (tmp_path / "b.json").write_text(
        json.dumps({"rule": [{"name": "r", "modules": ["x"], "when": {"link": {"ifname": "x"}}}]})
    )
    with pytest.raises(RuleError) as info:
        load_rules([tmp_path])
    (p,) = info.value.problems
    assert (p.file, p.rule, p.field) == (str(tmp_path / "b.json"), "r", "name")
    assert str(tmp_path / "a.toml") in p.message and p.hint and "rename" in p.hint


def test_duplicate_names_in_one_file() -> None:
    p = one(rule('[rule.when.link]\nifname = "x"') * 2)
    assert "earlier in this file" in p.message


def test_unknown_modules_with_registry() -> None:
    found = problems(
        '[[rule]]\nname = "r"\nmodules = ["lab", "gamin"]\n[rule.when.link]\nifname = "x"',
        known_modules=MODULES,
    )
    (p,) = found
    assert (p.rule, p.field, p.hint) == ("r", "modules[1]", "did you mean `gaming`?")
    assert "unknown module `gamin`" in p.message
    assert (
        "known modules: gaming"
        in one(
            rule('[rule.when.link]\nifname = "x"').replace("gaming", "zzz"), known_modules=MODULES
        ).hint
    )  # type: ignore[operator]
    # Without a registry any module name goes.
    parse_rules(rule('[rule.when.link]\nifname = "x"').replace("gaming", "zzz"), "r.toml")


def test_a_broken_rule_still_says_its_unknown_modules() -> None:
    text = '[[rule]]\nname = "r"\nmodules = ["gamng", "lab", "bad name"]\nsettle = "-1s"\n'
    found = problems(text + '[rule.when.link]\nopstate = "up"', known_modules=MODULES)
    by_field = {p.field: p for p in found}
    assert set(by_field) == {"settle", "when.link.opstate", "modules", "modules[0]"}, found
    assert by_field["modules[0]"].message == "unknown module `gamng` (not in the registry)"
    assert by_field["modules[0]"].hint == "did you mean `gaming`?"
    assert by_field["modules[0]"].rule == "r"
    assert "not a module name" in by_field["modules"].message  # said once, by the format


@pytest.mark.parametrize(
    ("when", "field", "message"),
    [
        ("[rule.when.device]", "when.device", "empty device condition"),
        ("[rule.when.device.parent]\n", "when.device.parent", "empty device condition"),
        ("[rule.when.link]", "when.link", "empty link condition"),
        ("[rule.when]", "when", "empty condition"),
        ("[rule.when]\nall = []", "when.all", "empty list of conditions"),
        ("[[rule.when.any]]", "when.any[0]", "empty condition"),
        ("[rule.when.device]\nproperties = {}", "when.device.properties", "empty table"),
        ("[rule.when.device]\nsubsystem = []", "when.device.subsystem", "empty list"),
        ("", "when", "required key is missing"),
    ],
)
def test_empty_conditions(when: str, field: str, message: str) -> None:
    p = one(rule(when))
    assert (p.rule, p.field) == ("r", field) and message in p.message and p.hint


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"[z-a]"', "reversed"),
        ('"PCI["', "never closed"),
        ('["pci", "[abc"]', "never closed"),
        ("3", "not a number"),
        ('["pci", 3]', "quote numbers"),
    ],
)
def test_bad_globs(value: str, message: str) -> None:
    p = one(rule(f"[rule.when.device]\nsubsystem = {value}"))
    assert (p.rule, p.field) == ("r", "when.device.subsystem")
    assert message in p.message or (p.hint and message in p.hint)


@pytest.mark.parametrize(
    "value", ['"3 sec"', '"-1s"', "true", '"8d"', "-2", "[1]", "1" + "0" * 400]
)
def test_bad_durations_name_the_field(value: str) -> None:
    p = one(rule('[rule.when.link]\nifname = "x"', f"settle = {value}"))
    assert (p.rule, p.field) == ("r", "settle")
    assert "duration" in p.message or "week" in p.message


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        (
            '[rule.when.link]\noperstate = "upp"',
            "when.link.operstate",
            "matches no operational state",
        ),
        ('[rule.when.link]\ncarrier = "yes"', "when.link.carrier", "must be true or false"),
        ('[rule.when.link]\nip = "10.20.0.0/33"', "when.link.ip", "not an IP address or network"),
        ('[rule.when.link]\nip = "lab"', "when.link.ip", "'lab' is not an IP address or network"),
        ('[rule.when.link]\nip = ["10.0.0.0/8", 7]', "when.link.ip", "not a number"),
        ("[rule.when.link]\nip = []", "when.link.ip", "an empty list matches nothing"),
        ('[rule.when.link]\nip = "10.*"', "when.link.ip", "is not an IP address or network"),
        ('[rule.when.link]\nip = "fe80::1%eth0"', "when.link.ip", "has a scope (%…)"),
        (
            '[rule.when.device]\nattributes = { "../../etc/shadow" = "x" }',
            "when.device.attributes",
            "not a sysfs attribute",
        ),
        ('[rule.when.device]\nparent = "usb"', "when.device.parent", "must be a table"),
        ('[[rule.when.device]]\nsubsystem = "pci"', "when.device", "must be a table"),
    ],
)
def test_bad_values(text: str, field: str, message: str) -> None:
    p = one(rule(text))
    assert p.field == field and message in p.message and p.hint


def test_rule_without_a_name_is_numbered_and_names_are_checked() -> None:
    link = 'when.link.ifname = "x"\n'
    found = problems(
        f'[[rule]]\nname = "ok"\nmodules = ["m"]\n{link}'
        f'[[rule]]\nmodules = ["m"]\n{link}'
        f'[[rule]]\nname = "bad name"\nmodules = ["-m"]\n{link}'
    )
    assert [(p.rule, p.field) for p in found] == [("#2", "name"), ("#3", "name"), ("#3", "modules")]


def test_names_with_a_trailing_newline_are_refused() -> None:
    found = problems('[[rule]]\nname = "ok\\n"\nmodules = ["m\\n"]\nwhen.link.ifname = "x"\n')
    assert [(p.rule, p.field) for p in found] == [("#1", "name"), ("#1", "modules")]


def test_every_problem_of_every_file_at_once(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[[rule]]\nname = \n")
    (tmp_path / "b.json").write_text('{"rule": [\n  {"name": "x",}\n]}')
    (tmp_path / "c.toml").write_text(rule("[rule.when.device]"))
    (tmp_path / "d.toml").write_bytes(b'[[rule]]\nname = "\xff"\n')
    (tmp_path / "ignored.txt").write_text("garbage")
    (tmp_path / ".#lock.toml").write_text("garbage")
    with pytest.raises(RuleError) as info:
        load_rules([tmp_path, tmp_path / "missing.toml"])
    by_file = {Path(p.file).name: p for p in info.value.problems}
    assert set(by_file) == {"a.toml", "b.json", "c.toml", "d.toml", "missing.toml"}
    assert "not valid TOML" in by_file["a.toml"].message and "line 2" in by_file["a.toml"].message
    assert "not valid JSON" in by_file["b.json"].message and "line 2" in by_file["b.json"].message
    assert by_file["c.toml"].field == "when.device"
    assert "not UTF-8" in by_file["d.toml"].message
    assert "no such file" in by_file["missing.toml"].message


def test_a_file_named_twice_is_read_once(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(rule('[rule.when.link]\nifname = "x"'))
    rules = load_rules([tmp_path, tmp_path / "a.toml", tmp_path / ".." / tmp_path.name / "a.toml"])
    assert [r.name for r in rules.rules] == ["r"] and rules.sources == (str(tmp_path / "a.toml"),)


def test_folder_order_and_suffixes(tmp_path: Path) -> None:
    (tmp_path / "b.toml").write_text(rule('[rule.when.link]\nifname = "x"').replace('"r"', '"b"'))
    (tmp_path / "a.json").write_text(
        json.dumps({"rule": [{"name": "a", "modules": ["m"], "when": {"link": {"ifname": "y"}}}]})
    )
    (tmp_path / "c.toml.bak").write_text("garbage")
    (tmp_path / "README.md").write_text("about these rules")  # not meant as rules: ignored
    rules = load_rules([tmp_path])
    assert [r.name for r in rules.rules] == ["a", "b"]
    assert rules.sources == (str(tmp_path / "a.json"), str(tmp_path / "b.toml"))
    assert load_rules([tmp_path / "b.toml"]).rules[0].name == "b"
    assert load_rules([]).rules == ()


def test_a_rule_file_with_another_suffix_is_said_not_read(tmp_path: Path) -> None:
    (tmp_path / "lab.TOML").write_text(rule('[rule.when.link]\nifname = "x"'))
    (tmp_path / "gaming.yml").write_text("rule: []")
    found = problems_of_paths([tmp_path])
    assert [(p.file, p.message, p.hint) for p in found] == [
        (str(tmp_path / "gaming.yml"), "not read: rule files end in .toml or .json",
         "rename it to gaming.toml (YAML is not read: write TOML)"),
        (str(tmp_path / "lab.TOML"), "not read: rule files end in .toml or .json",
         "rename it to lab.toml"),
    ]  # fmt: skip


def problems_of_paths(paths: list[Path]) -> list[RuleProblem]:
    with pytest.raises(RuleError) as info:
        load_rules(paths)
    return info.value.problems


def test_huge_and_deep_files(tmp_path: Path) -> None:
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (5 * 1024 * 1024))
    with pytest.raises(RuleError, match="larger than"):
        load_rules([huge])
    deep = '{"rule": [' + '{"when": {"not": ' * 200 + "{}" + "}}" * 200 + "]}"
    assert "nested too deeply" in one(deep, "deep.json").message
    assert "nested too deeply" in one("[" * 100000 + "]" * 100000, "deeper.json").message
    assert "nested too deeply" in one("a = " + "[" * 100000 + "]" * 100000, "deep.toml").message


def test_schema_describes_the_format() -> None:
    schema = rules_json_schema()
    json.dumps(schema)  # serialisable
    assert set(schema["properties"]) == {"$schema", "rule"}
    defs = schema["$defs"]
    assert set(defs["When"]["properties"]) == {"device", "link", "all", "any", "not"}
    assert (
        "properties" in defs["DeviceMatch"]["properties"]
        and defs["DeviceMatch"]["additionalProperties"] is False
    )
    assert set(defs["RuleModel"]["required"]) == {"name", "modules", "when"}
    assert "null" not in json.dumps(schema)  # TOML has no null: optional keys are left out


# --- never another exception ----------------------------------------------------------------


def _check_outcome(content: str | bytes, source: str) -> None:
    try:
        rules = parse_rules(content, source, known_modules=frozenset({"gaming"}))
    except RuleError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.file == source and str(p).startswith(source)
    else:
        assert all(r.source == source for r in rules.rules)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["rule", "$schema", "x"]), json_values, max_size=3))
def test_any_json_gives_rules_or_a_located_error(data: dict[str, object]) -> None:
    _check_outcome(json.dumps(data), "fuzz.json")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["rule", "$schema", "x"]), json_values, max_size=3))
def test_any_toml_gives_rules_or_a_located_error(data: dict[str, object]) -> None:
    _check_outcome(to_toml(data), "fuzz.toml")


@settings(max_examples=300)
@given(
    st.lists(json_values, min_size=1, max_size=3).map(
        lambda items: {"rule": [{"name": "r", "modules": ["gaming"], "when": w} for w in items]}
    )
)
def test_any_condition_gives_rules_or_a_located_error(data: dict[str, object]) -> None:
    _check_outcome(json.dumps(data), "cond.json")
    _check_outcome(to_toml(data), "cond.toml")


@given(st.binary(max_size=200))
def test_any_bytes_give_rules_or_a_located_error(data: bytes) -> None:
    _check_outcome(data, "bytes.toml")
    _check_outcome(data, "bytes.json")


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_an_empty_file_is_an_error_so_a_reload_mid_write_keeps_the_rules(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "a.toml").write_bytes(content)
    with pytest.raises(RuleError) as err:
        load_rules([tmp_path])
    assert str(err.value).startswith(f"{tmp_path / 'a.toml'}: the file is empty")
    (tmp_path / "a.toml").write_text("rule = []\n")
    assert load_rules([tmp_path]).rules == ()


def test_needs_that_differ_only_in_tags_are_equal() -> None:
    """No source filters on tags: a tag-only rule edit must not make the daemon reopen them."""
    a = parse_rules(rule('[rule.when.device]\nsubsystem = "pci"\ntags = ["seat"]'), "a.toml")
    b = parse_rules(rule('[rule.when.device]\nsubsystem = "pci"\ntags = ["uaccess"]'), "b.toml")
    assert a.needs().tags != b.needs().tags
    assert a.needs() == b.needs()
