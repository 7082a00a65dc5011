"""The example rules in rules/ give the right answers on real recordings of real machines."""

from __future__ import annotations

import subprocess
from pathlib import Path

from runtime_modules._dumps import read_ip_link_json
from runtime_modules._evaluate import evaluate
from runtime_modules._rules import RuleSet, load_rules, parse_rules
from runtime_modules._world import Device, DeviceRemoved, DeviceUpsert, World
from tests.fixtures.system import ip_netns
from tests.fixtures.world import EXAMPLE_RULES

GAMING, DOCKED = "gaming-on-nvidia-gpu", "virtualization-when-docked"


def wanted(rules: RuleSet, world: World) -> set[str]:
    return set(evaluate(rules, world).wanted_modules())


def nearest_hub(world: World, devpath: str) -> Device:
    """The nearest ancestor that is a USB hub on a port (class 9, not a root hub)."""
    return next(
        a
        for a in world.ancestors(world.devices[devpath])
        if a.properties.get("TYPE", "").startswith("9/") and "-" in a.sysname
    )


def test_examples_are_valid_with_their_modules() -> None:
    rules = load_rules(
        [EXAMPLE_RULES], known_modules=frozenset({"gaming", "virtualization", "lab"})
    )
    assert {r.name for r in rules.rules} >= {GAMING, DOCKED, "lab-when-lab-nic-up"}
    assert all(r.description for r in rules.rules)


def test_dgx_station_has_four_nvidia_gpus(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    ev = evaluate(example_rules, recordings["dgx"])
    assert ev.wanted_modules() == {"gaming": (GAMING,)}
    assert len(ev[GAMING].matches) == 4
    assert {recordings["dgx"].devices[m].properties["PCI_ID"] for m in ev[GAMING].matches} == {
        "10DE:1DB2"  # Tesla V100
    }


def test_hp_400_g2_has_an_nvidia_gpu_and_an_intel_igpu(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    world = recordings["hp400g2"]
    ev = evaluate(example_rules, world)
    assert ev.wanted_modules() == {"gaming": (GAMING,)}
    assert ev[GAMING].matches == ("/devices/pci0000:00/0000:00:01.0/0000:01:00.0",)
    assert world.devices["/devices/pci0000:00/0000:00:02.0"].properties["PCI_ID"] == "8086:0412"


def test_hp_835_g10_amd_igpu_is_not_a_gaming_gpu_and_its_usb_nic_is_docked(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    world = recordings["hp835g10"]
    igpu = world.devices["/devices/pci0000:00/0000:00:08.1/0000:c4:00.0"]
    assert (igpu.properties["PCI_ID"], igpu.properties["PCI_CLASS"]) == ("1002:15BF", "30000")
    ev = evaluate(example_rules, world)
    assert ev.wanted_modules() == {"virtualization": (DOCKED,)}
    (nic,) = ev[DOCKED].matches
    assert nic.endswith("/net/enx54af978e007e")
    hub = nearest_hub(world, nic)
    assert (hub.properties["ID_VENDOR_ID"], hub.properties["ID_MODEL_ID"]) == ("214b", "7250")


def test_dell_edge_has_two_usb_nics_behind_the_microchip_hub(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    world = recordings["dell-edge"]
    ev = evaluate(example_rules, world)
    assert ev.wanted_modules() == {"virtualization": (DOCKED,)}
    assert [m.rsplit("/", 1)[-1] for m in ev[DOCKED].matches] == [
        "enx00e04c6800c7",
        "enx00e04c6800c8",
    ]
    for nic in ev[DOCKED].matches:
        hub = nearest_hub(world, nic)
        assert hub.properties["ID_VENDOR_ID"] == "0424" and hub.properties["ID_VENDOR"].startswith(
            "Microchip"
        )


def test_thunderbolt_host_routers_never_count_as_a_dock(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    world = recordings["hp835g10"].copy()
    routers = [d for d in world.devices.values() if d.devtype == "thunderbolt_device"]
    assert sorted(d.sysname for d in routers) == ["0-0", "1-0"]  # USB4 host routers only
    world.apply(DeviceRemoved("/devices/pci0000:00/0000:00:08.1/0000:c4:00.3/usb1/1-1"))  # hub
    assert wanted(example_rules, world) == set()
    domain = routers[0].devpath.rsplit("/", 1)[0]
    for route in ("0-1", "0-301"):
        dock = Device(
            devpath=f"{domain}/0-0/{route}",
            subsystem="thunderbolt",
            devtype="thunderbolt_device",
            properties={"DEVTYPE": "thunderbolt_device"},
        )
        world.apply(DeviceUpsert(dock))
        assert wanted(example_rules, world) == {"virtualization"}, route
        world.apply(DeviceRemoved(dock.devpath))


def test_usb_nic_without_a_hub_is_not_a_dock(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    world = recordings["hp835g10"].copy()
    world.apply(DeviceRemoved("/devices/pci0000:00/0000:00:08.1/0000:c4:00.3/usb1/1-1"))
    root = "/devices/pci0000:00/0000:00:08.1/0000:c4:00.3/usb1"
    for device in (
        Device(devpath=f"{root}/1-3", subsystem="usb", devtype="usb_device",
               properties={"TYPE": "0/0/0", "ID_VENDOR_ID": "0bda"}),
        Device(devpath=f"{root}/1-3/1-3:1.0/net/enx1", subsystem="net",
               properties={"ID_BUS": "usb"}),
    ):  # fmt: skip
        world.apply(DeviceUpsert(device))
    assert wanted(example_rules, world) == set()


def test_an_internal_hub_looks_like_a_dock_until_the_dock_hub_is_named(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    # The HP 400 G2 puts its ports behind Intel rate-matching hubs (8087:8008) on the board.
    world = recordings["hp400g2"].copy()
    nic = Device(
        devpath="/devices/pci0000:00/0000:00:1a.0/usb1/1-1/1-1.2/1-1.2:1.0/net/enx2",
        subsystem="net",
        properties={"ID_BUS": "usb"},
    )
    world.apply(DeviceUpsert(nic))
    assert "virtualization" in wanted(example_rules, world)  # as rules/virtualization.toml says
    # Its advice: name the dock's hub (the HP 835 G10's dock: 214b:7250) in the parent table.
    text = (EXAMPLE_RULES / "virtualization.toml").read_text()
    named = parse_rules(
        text.replace(
            'properties = { TYPE = "9/*" }', 'properties = { TYPE = "9/*", ID_VENDOR_ID = "214b" }'
        ),
        "virtualization.toml",
    )
    assert wanted(named, world) == set()
    assert wanted(named, recordings["hp835g10"]) == {"virtualization"}


def test_gpus_without_a_driver_and_amd_discrete_gpus(
    recordings: dict[str, World], example_rules: RuleSet
) -> None:
    world = recordings["hp400g2"].copy()
    gpu = world.devices["/devices/pci0000:00/0000:00:01.0/0000:01:00.0"]
    props = {k: v for k, v in gpu.properties.items() if k != "DRIVER"}
    world.apply(DeviceUpsert(Device(devpath=gpu.devpath, subsystem="pci", properties=props)))
    assert world.devices[gpu.devpath].driver is None
    assert wanted(example_rules, world) == {"gaming"}

    laptop = recordings["hp835g10"].copy()
    radeon = Device(
        devpath="/devices/pci0000:00/0000:00:01.1/0000:03:00.0",
        subsystem="pci",
        properties={"PCI_ID": "1002:73BF", "PCI_CLASS": "30000"},  # RX 6800 in an eGPU box
    )
    laptop.apply(DeviceUpsert(radeon))
    ev = evaluate(example_rules, laptop)
    assert ev.wanted_modules()["gaming"] == ("gaming-on-amd-dgpu",)
    assert ev["gaming-on-amd-dgpu"].matches == (radeon.devpath,)


def _recorded(netns: str, what: str, tmp_path: Path) -> World:
    """The links of ``netns`` as `ip -j -d link` (or `addr`, with addresses) records them now."""
    out = tmp_path / f"{what}.json"
    with out.open("w") as f:
        subprocess.run(["ip", "-n", netns, "-j", "-d", what], stdout=f, check=True)
    return World.of([], read_ip_link_json(out))


def test_lab_follows_a_real_link_named_lab0(
    netns: str, tmp_path: Path, example_rules: RuleSet
) -> None:
    ip_netns(netns, "link", "add", "lab0", "type", "veth", "peer", "name", "other0")
    ip_netns(netns, "link", "set", "other0", "up")

    assert wanted(example_rules, _recorded(netns, "link", tmp_path)) == set()  # lab0 is down
    ip_netns(netns, "link", "set", "lab0", "up")
    assert wanted(example_rules, _recorded(netns, "link", tmp_path)) == {"lab"}


def test_lab_follows_an_address_in_the_lab_network_on_any_link(
    netns: str, tmp_path: Path, example_rules: RuleSet
) -> None:
    ip_netns(netns, "link", "add", "enp0s31f6", "type", "veth", "peer", "name", "other0")
    ip_netns(netns, "link", "set", "other0", "up")
    ip_netns(netns, "link", "set", "enp0s31f6", "up")

    ip_netns(netns, "addr", "add", "192.168.1.20/24", "dev", "enp0s31f6")  # home: no lab
    assert wanted(example_rules, _recorded(netns, "addr", tmp_path)) == set()
    ip_netns(netns, "addr", "add", "10.20.4.20/16", "dev", "enp0s31f6")  # the lab's DHCP
    ev = evaluate(example_rules, _recorded(netns, "addr", tmp_path))
    assert ev.wanted_modules() == {"lab": ("lab-on-the-lab-network",)}
    assert ev["lab-on-the-lab-network"].matches == ("enp0s31f6",)
    # A link with no carrier to report ("unknown" when up, as tun and WireGuard links are; here
    # the loopback, which every kernel has) in the lab's network counts too.
    ip_netns(netns, "addr", "del", "10.20.4.20/16", "dev", "enp0s31f6")
    ip_netns(netns, "link", "set", "lo", "up")
    ip_netns(netns, "addr", "add", "fd00:20::7/64", "dev", "lo")
    world = _recorded(netns, "addr", tmp_path)
    assert world.link_by_name("lo").operstate.value == "unknown"  # type: ignore[union-attr]
    assert evaluate(example_rules, world)["lab-on-the-lab-network"].matches == ("lo",)
