"""Explanations: what matched, or what was looked for and the closest near-misses."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings

from runtime_modules._evaluate import evaluate
from runtime_modules._explain import Explanation, describe, explain
from runtime_modules._rules import RuleSet, parse_rules
from runtime_modules._world import Device, Link, OperState, World
from tests.fixtures.world import rule_sets, worlds

IGPU = "/devices/pci0000:00/0000:00:08.1/0000:c4:00.0"


def explained(rules: RuleSet, world: World, modules: list[str] | None = None) -> list[Explanation]:
    return explain(rules, world, evaluate(rules, world), modules)


def by_rule(explanations: list[Explanation]) -> dict[str, Explanation]:
    return {e.rule: e for e in explanations}


def test_the_issue_example_on_an_amd_laptop(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    e = by_rule(explained(example_rules, recordings["hp835g10"]))["gaming-on-nvidia-gpu"]
    assert not e.active and e.matches == ()
    assert e.text() == (
        "rule gaming-on-nvidia-gpu: no device with subsystem=pci and PCI_ID=10DE:* and "
        f"PCI_CLASS=[30000, 30200, 38000]; closest: {IGPU} has PCI_ID=1002:15BF"
    )
    (closest, *_) = e.condition.closest
    assert (closest.name, closest.matched, closest.total) == (IGPU, 2, 3)


def test_holding_rules_name_their_matches(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    e = by_rule(explained(example_rules, recordings["dgx"]))["gaming-on-nvidia-gpu"]
    assert e.active and len(e.matches) == 4
    assert e.text().startswith("rule gaming-on-nvidia-gpu: a device with subsystem=pci")
    assert e.text().endswith("(and 1 more)")  # three named, then a count


def test_any_of_shows_each_part_and_parents_are_explained(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    e = by_rule(explained(example_rules, recordings["hp400g2"]))["virtualization-when-docked"]
    lines = e.text().splitlines()
    assert lines[0] == "rule virtualization-when-docked: any of: none holds"
    assert lines[1].startswith("  ✗ no device with subsystem=thunderbolt")
    assert "(there is no device with subsystem=thunderbolt)" in lines[1]
    assert lines[2].startswith("  ✗ no device with subsystem=net and ID_BUS=usb below a device")
    # Its NICs are net devices on PCI: nothing closer than "a net device" to report.
    assert lines[2].endswith("(no device with subsystem=net matches any other key)")


def test_parent_near_miss_names_the_closest_ancestor() -> None:
    rules = parse_rules(
        '[[rule]]\nname = "r"\nmodules = ["virtualization"]\n'
        '[rule.when.device]\nsubsystem = "net"\n'
        '[rule.when.device.parent]\nsubsystem = "usb"\nproperties = { ID_VENDOR_ID = "17ef" }\n',
        "r.toml",
    )
    hub = Device(devpath="/devices/usb1/1-1", subsystem="usb", properties={"ID_VENDOR_ID": "214b"})
    nic = Device(devpath="/devices/usb1/1-1/1-1.2/net/enx0", subsystem="net")
    (e,) = explained(rules, World.of([hub, nic]))
    assert e.text().endswith(
        "closest: /devices/usb1/1-1/1-1.2/net/enx0 has no ancestor with subsystem=usb and "
        "ID_VENDOR_ID=17ef (closest: /devices/usb1/1-1 has ID_VENDOR_ID=214b)"
    )


def test_links_not_and_disabled_rules() -> None:
    text = """
[[rule]]
name = "lab"
modules = ["lab"]
when.link = { ifname = "lab0", operstate = "up", carrier = true }
[[rule]]
name = "no-gpu"
modules = ["battery"]
enabled = false
when.not.device = { subsystem = "pci" }
"""
    rules = parse_rules(text, "r.toml")
    world = World.of(
        [Device(devpath="/devices/pci0000:00/0000:00:02.0", subsystem="pci")],
        [Link(index=2, ifname="lab0", operstate=OperState.DOWN, carrier=False)],
    )
    lab, no_gpu = explained(rules, world)
    assert lab.text() == (
        "rule lab: no link with ifname=lab0 and operstate=up and carrier=true; "
        "closest: lab0 has operstate=down and carrier=false"
    )
    assert no_gpu.text() == (
        "rule no-gpu: disabled (enabled = false); its condition does not hold: "
        "not (…), but it holds: a device with subsystem=pci: /devices/pci0000:00/0000:00:02.0"
    )


def test_addresses_in_words_and_near_misses() -> None:
    text = """
[[rule]]
name = "lab-vpn"
modules = ["lab"]
when.link = { operstate = "up", ip = ["10.20.0.0/16", "fd00:20::/48"] }
"""
    rules = parse_rules(text, "r.toml")
    lab0 = Link(index=2, ifname="lab0", operstate=OperState.UP,
                addresses=frozenset({"192.168.1.7/24", "fe80::1/64"}))  # fmt: skip
    bare = Link(index=3, ifname="lab1", operstate=OperState.UP)
    (lab,) = explained(rules, World.of([], [lab0, bare]))
    assert lab.text() == (
        "rule lab-vpn: no link with operstate=up and ip=[10.20.0.0/16, fd00:20::/48]; "
        "closest: lab0 has ip=192.168.1.7/24 fe80::1/64"
    )
    closest = lab.to_json()["condition"]["closest"]
    assert [(c["match"], c["differs"]) for c in closest] == [
        ("lab0", [{"key": "ip", "wanted": "[10.20.0.0/16, fd00:20::/48]",
                   "actual": "192.168.1.7/24 fe80::1/64"}]),
        ("lab1", [{"key": "ip", "wanted": "[10.20.0.0/16, fd00:20::/48]", "actual": None}]),
    ]  # fmt: skip
    (alone,) = explained(rules, World.of([], [bare]))
    assert alone.text().endswith("closest: lab1 has no IP address")
    on = World.of([], [Link(index=2, ifname="lab0", operstate=OperState.UP,
                            addresses=frozenset({"10.20.3.4/24"}))])  # fmt: skip
    (lab,) = explained(rules, on)
    assert lab.to_json()["active"] is True and lab.to_json()["matches"] == ["lab0"]


def test_modules_filter_and_json(recordings: dict[str, World], example_rules: RuleSet) -> None:
    found = explained(example_rules, recordings["dell-edge"], ["virtualization"])
    assert [e.rule for e in found] == ["virtualization-when-docked"]
    data = found[0].to_json()
    json.dumps(data)
    assert data["active"] is True and len(data["matches"]) == 2
    assert data["condition"]["kind"] == "any"
    tb, usb = data["condition"]["conditions"]
    assert (tb["holds"], usb["holds"]) == (False, True)
    assert tb["note"] == "there is no device with subsystem=thunderbolt"
    gaming = by_rule(explained(example_rules, recordings["dell-edge"]))["gaming-on-nvidia-gpu"]
    (closest, *_) = gaming.to_json()["condition"]["closest"]
    assert closest["differs"] == [{"key": "PCI_ID", "wanted": "10DE:*", "actual": "8086:1906"}]


def test_describe_and_long_values_are_cut() -> None:
    rules = parse_rules(
        '[[rule]]\nname = "r"\nmodules = ["m"]\n[[rule.when.any]]\n'
        'device = { tags = "seat", attributes = { boot_vga = "0" } }\n'
        '[[rule.when.any]]\nlink = { kind = "wireguard" }\n',
        "r.toml",
    )
    text = describe(rules.rules[0].when)
    assert text == "((attribute boot_vga=0 and tag seat) or kind=wireguard)"
    world = World.of(
        [Device(devpath="/devices/x", attributes={"boot_vga": "1" * 500}, tags=frozenset({"seat"}))]
    )
    (e,) = explained(rules, world)
    line = e.text().splitlines()[1]
    assert "attribute boot_vga=111" in line and line.endswith("…")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_sets, worlds)
def test_an_explanation_agrees_with_the_evaluation(rules: RuleSet, world: World) -> None:
    """The verdict and the reasons come from one computation, and it is the evaluator's."""
    evaluation = evaluate(rules, world)
    for e in explain(rules, world, evaluation):  # explain checks the agreement itself
        assert (e.holds, e.matches) == (evaluation[e.rule].holds, evaluation[e.rule].matches)
        assert e.holds == e.condition.holds
