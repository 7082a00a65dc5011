"""Evaluation: matching semantics, and the incremental evaluator giving exactly the full answer."""

from __future__ import annotations

import importlib.util
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime_modules._evaluate import Evaluation, IncrementalEvaluator, RuleResult, evaluate
from runtime_modules._rules import RuleSet, parse_rules
from runtime_modules._world import (
    AddressAdded,
    AddressRemoved,
    Device,
    DeviceMoved,
    DeviceRemoved,
    DeviceUpsert,
    Link,
    LinkRemoved,
    LinkUpsert,
    OperState,
    World,
    WorldChange,
    WorldReplaced,
)
from tests.fixtures.system import REPO
from tests.fixtures.world import changes, rule_sets, worlds

PCI = "/devices/pci0000:00"
GPU = Device(
    devpath=f"{PCI}/0000:00:01.0/0000:01:00.0",
    subsystem="pci",
    driver=None,
    properties={"PCI_ID": "10DE:1DB2", "PCI_CLASS": "30000"},
    attributes={"boot_vga": "0\n"},
    tags=frozenset({"seat", "master-of-seat"}),
)
HUB = Device(
    devpath=f"{PCI}/0000:00:14.0/usb1/1-2",
    subsystem="usb",
    devtype="usb_device",
    properties={"ID_VENDOR_ID": "17EF", "TYPE": "9/0/1"},
)
NIC = Device(
    devpath=f"{HUB.devpath}/1-2.1/1-2.1:1.0/net/enx0",
    subsystem="net",
    properties={"ID_BUS": "usb"},
)


def rules_of(*tables: str) -> RuleSet:
    text = "".join(
        f'[[rule]]\nname = "r{i}"\nmodules = ["m{i}"]\n{t}\n' for i, t in enumerate(tables)
    )
    return parse_rules(text, "t.toml")


def holds(table: str, world: World) -> RuleResult:
    return evaluate(rules_of(table), world)["r0"]


# --- semantics ------------------------------------------------------------------------------


def test_device_keys_and_matches() -> None:
    world = World.of([GPU, HUB, NIC])
    assert holds(
        '[rule.when.device]\nsubsystem = "PCI"\nproperties = { PCI_ID = "10de:*" }', world
    ) == RuleResult(True, (GPU.devpath,))
    assert not holds('[rule.when.device]\nsubsystem = "pci"\ndriver = "nvidia"', world).holds


def test_absent_values_match_only_the_empty_pattern() -> None:
    world = World.of([GPU])
    assert holds('[rule.when.device]\nsubsystem = "pci"\ndriver = ""', world).holds
    assert not holds('[rule.when.device]\nsubsystem = "pci"\ndriver = "*"', world).holds
    assert not holds('[rule.when.device]\nproperties = { MISSING = "*" }', world).holds
    assert holds('[rule.when.device]\nproperties = { MISSING = ["x", ""] }', world).holds


def test_attributes_ignore_trailing_whitespace_and_tags_must_all_be_present() -> None:
    world = World.of([GPU])
    assert holds('[rule.when.device]\nattributes = { boot_vga = "0" }', world).holds
    assert holds('[rule.when.device]\ntags = ["seat", "MASTER-*"]', world).holds
    assert not holds('[rule.when.device]\ntags = ["seat", "uaccess"]', world).holds


def test_parent_is_any_recorded_ancestor() -> None:
    table = (
        '[rule.when.device]\nsubsystem = "net"\n'
        '[rule.when.device.parent]\nsubsystem = "usb"\nproperties = { ID_VENDOR_ID = "17ef" }'
    )
    assert holds(table, World.of([HUB, NIC])) == RuleResult(True, (NIC.devpath,))
    assert not holds(table, World.of([NIC])).holds  # the hub is not recorded
    decoy = Device(devpath=f"{PCI}/0000:00:14.0/usb1/1-2.1", subsystem="usb",
                   properties={"ID_VENDOR_ID": "17ef"})  # fmt: skip
    assert not holds(table, World.of([decoy, NIC])).holds  # a path prefix, but not a parent


def test_links() -> None:
    lab = Link(index=3, ifname="lab0", kind="veth", operstate=OperState.UP, carrier=True,
               mac="02:00:00:00:00:0a")  # fmt: skip
    world = World.of([], [lab, Link(index=1, ifname="lo")])
    assert holds('[rule.when.link]\nifname = "LAB*"\noperstate = "up"', world) == RuleResult(
        True, ("lab0",)
    )
    assert holds('[rule.when.link]\nmac = "02:00:00:00:00:0A"\ncarrier = true', world).holds
    assert not holds('[rule.when.link]\nifname = "lab0"\ncarrier = false', world).holds
    assert holds('[rule.when.link]\nkind = ""', world) == RuleResult(True, ("lo",))


def test_link_addresses() -> None:
    lab = Link(index=3, ifname="lab0", operstate=OperState.UP,
               addresses=frozenset({"10.20.0.5/16", "fd00:7::5/64"}))  # fmt: skip
    world = World.of([], [lab, Link(index=1, ifname="lo", addresses=frozenset({"127.0.0.1/8"}))])
    assert holds('[rule.when.link]\nip = "10.20.0.0/16"', world) == RuleResult(True, ("lab0",))
    assert holds('[rule.when.link]\nip = "fd00::/8"', world) == RuleResult(True, ("lab0",))
    assert holds('[rule.when.link]\nip = "0.0.0.0/0"', world) == RuleResult(True, ("lab0", "lo"))
    assert holds('[rule.when.link]\nip = "10.20.0.5"', world).holds  # an address: that one
    assert not holds('[rule.when.link]\nip = "10.20.0.6"', world).holds
    # Versions never cross: an IPv4 address is in no IPv6 network, even ::/0.
    assert holds('[rule.when.link]\nip = "::/0"', world) == RuleResult(True, ("lab0",))
    assert not holds('[rule.when.link]\nip = ["10.21.0.0/16", "fd01::/16"]', world).holds
    assert not holds('[rule.when.link]\nip = "10.20.0.0/16"\nifname = "lo"', world).holds


def test_incremental_follows_addresses() -> None:
    rules = rules_of('[rule.when.link]\nip = "10.20.0.0/16"\noperstate = "up"')
    world = World.of([], [Link(index=3, ifname="lab0", operstate=OperState.UP)])
    steps: list[WorldChange] = [
        AddressAdded(3, "10.20.0.5/16"),
        LinkUpsert(Link(index=3, ifname="lab1", operstate=OperState.UP)),  # a rename keeps it
        AddressAdded(3, "fd00::5/64"),
        AddressRemoved(3, "10.20.0.5/16"),
        AddressAdded(9, "10.20.0.9/16"),  # of a link not known: dropped
        AddressAdded(3, "10.20.0.6/16"),
        LinkRemoved(3),
    ]
    inc = IncrementalEvaluator(rules)
    inc.reset(world)
    seen = []
    for change in steps:
        world.apply(change)
        changed = inc.update(world, change)
        assert inc.results() == evaluate(rules, world), change
        seen.append((inc.results()["r0"], changed))
    assert seen == [
        (RuleResult(True, ("lab0",)), {"r0"}),
        (RuleResult(True, ("lab1",)), {"r0"}),
        (RuleResult(True, ("lab1",)), set()),
        (RuleResult(False, ()), {"r0"}),
        (RuleResult(False, ()), set()),
        (RuleResult(True, ("lab1",)), {"r0"}),
        (RuleResult(False, ()), {"r0"}),
    ]


def test_combinators() -> None:
    world = World.of([GPU, HUB], [Link(index=2, ifname="wg0", kind="wireguard")])
    gpu = 'device = { subsystem = "pci" }'
    usb = 'device = { subsystem = "usb" }'
    nope = 'device = { subsystem = "thunderbolt" }'
    wg = 'link = { kind = "wireguard" }'
    rules = rules_of(
        f"[[rule.when.all]]\n{gpu}\n[[rule.when.all]]\n{wg}",
        f"[[rule.when.all]]\n{gpu}\n[[rule.when.all]]\n{nope}",
        f"[[rule.when.any]]\n{nope}\n[[rule.when.any]]\n{usb}\n[[rule.when.any]]\n{gpu}",
        f"[rule.when.not]\n{nope}",
        f"[rule.when.not]\n{gpu}",
        f"[rule.when]\n{usb}\n{wg}",
    )
    ev = evaluate(rules, world)
    assert ev["r0"] == RuleResult(True, (GPU.devpath, "wg0"))
    assert ev["r1"] == RuleResult(False)
    assert ev["r2"] == RuleResult(True, (HUB.devpath, GPU.devpath))
    assert ev["r3"] == RuleResult(True) and ev["r4"] == RuleResult(False)
    assert ev["r5"] == RuleResult(True, (HUB.devpath, "wg0"))


def test_wanted_modules_only_from_enabled_holding_rules() -> None:
    text = """
[[rule]]
name = "a"
modules = ["gaming", "steam"]
when.device.subsystem = "pci"
[[rule]]
name = "b"
modules = ["gaming"]
when.device.driver = ""
[[rule]]
name = "c"
modules = ["virt"]
enabled = false
when.device.subsystem = "pci"
[[rule]]
name = "d"
modules = ["lab"]
when.link.ifname = "lab0"
"""
    ev = evaluate(parse_rules(text, "t.toml"), World.of([GPU]))
    assert ev.wanted_modules() == {"gaming": ("a", "b"), "steam": ("a",)}
    assert ev["c"].holds and not ev.active("c") and ev.active("a")
    assert set(ev) == {"a", "b", "c", "d"} and len(ev) == 4


# --- incremental == full --------------------------------------------------------------------


def check_sequence(rules: RuleSet, world: World, steps: list[WorldChange]) -> None:
    inc = IncrementalEvaluator(rules)
    inc.reset(world)
    assert inc.results() == evaluate(rules, world)
    for change in steps:
        before = inc.results()
        world.apply(change)
        changed = inc.update(world, change)
        full = evaluate(rules, world)
        assert inc.results() == full, change
        assert changed == {n for n in full if full[n] != before[n]}, change


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_sets, worlds, st.lists(changes, max_size=15))
def test_incremental_equals_full(rules: RuleSet, world: World, steps: list[WorldChange]) -> None:
    check_sequence(rules, world, steps)


def test_incremental_parent_arrives_after_child_and_renames() -> None:
    rules = rules_of(
        '[rule.when.device]\nsubsystem = "net"\n'
        '[rule.when.device.parent]\nsubsystem = "usb"\nproperties = { TYPE = "9/*" }',
        '[rule.when.link]\nifname = "lab0"\noperstate = "up"',
    )
    renamed = Device(devpath=f"{HUB.devpath}/1-2.1/1-2.1:1.0/net/lab0", subsystem="net")
    hub_gone_bad = Device(devpath=HUB.devpath, subsystem="usb", properties={"TYPE": "0/0/0"})
    check_sequence(
        rules,
        World(),
        [
            DeviceUpsert(NIC),  # before its hub: no match yet
            DeviceUpsert(HUB),  # now the NIC matches
            DeviceMoved(NIC.devpath, renamed),
            DeviceUpsert(hub_gone_bad),  # the hub changes: its descendants are re-tested
            DeviceUpsert(HUB),
            LinkUpsert(Link(index=5, ifname="eth0", operstate=OperState.UP)),
            LinkUpsert(Link(index=5, ifname="lab0", operstate=OperState.UP)),  # renamed link
            DeviceRemoved(HUB.devpath),  # takes the NIC with it
            LinkRemoved(5),
            WorldReplaced((HUB, renamed), None),
            WorldReplaced(None, ()),
        ],
    )


def test_update_reports_the_changed_rules() -> None:
    rules = rules_of(
        '[rule.when.device]\nsubsystem = "pci"', '[rule.when.device]\nsubsystem = "usb"'
    )
    world = World()
    inc = IncrementalEvaluator(rules)
    inc.reset(world)
    world.apply(DeviceUpsert(GPU))
    assert inc.update(world, DeviceUpsert(GPU)) == {"r0"}
    assert inc.update(world, DeviceUpsert(GPU)) == frozenset()  # idempotent
    assert isinstance(inc.results(), Evaluation)


def test_benchmark_runs_and_agrees() -> None:
    # The benchmark checks incremental == full itself; here it runs small, never timed.
    path = REPO / "bench" / "bench_evaluate.py"
    spec = importlib.util.spec_from_file_location("bench_evaluate", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_evaluate"] = module
    spec.loader.exec_module(module)
    result = module.run(n_rules=30, n_devices=400, n_links=10, n_events=500, repeat=1)
    assert result["active_rules"] > 0
    rules, world = module.make_rules(30), module.make_world(400, 10)
    check_sequence(rules, world, module.make_changes(world, 300))


def test_real_recordings_incrementally(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    # Coldplug a recording device by device, parents first, then unplug it: always exact.
    for world in recordings.values():
        devices = sorted(world.devices.values(), key=lambda d: d.devpath)
        steps: list[WorldChange] = [DeviceUpsert(d) for d in devices]
        steps += [DeviceRemoved(d.devpath) for d in reversed(devices[-40:])]
        inc = IncrementalEvaluator(example_rules)
        live = World()
        for n, change in enumerate(steps, start=1):
            live.apply(change)
            inc.update(live, change)
            if n == len(devices):  # everything plugged: the answer on the recording
                assert inc.results() == evaluate(example_rules, world)
        assert inc.results() == evaluate(example_rules, live)
