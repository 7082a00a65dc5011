"""The world model: changes are idempotent and ancestors are path prefixes."""

from runtime_modules import (
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
    WorldReplaced,
)

PCI = Device(devpath="/devices/pci0000:00", subsystem=None)
BRIDGE = Device(devpath="/devices/pci0000:00/0000:00:01.0", subsystem="pci")
GPU = Device(
    devpath="/devices/pci0000:00/0000:00:01.0/0000:01:00.0",
    subsystem="pci",
    properties={"PCI_ID": "10DE:1DB2"},
)


def test_sysname_defaults_to_last_path_component() -> None:
    assert GPU.sysname == "0000:01:00.0"


def test_ancestors_are_path_prefixes_nearest_first() -> None:
    decoy = Device(devpath="/devices/pci0000:00/0000:00:01.0/0000:01:00")  # a prefix, not a parent
    world = World.of([PCI, BRIDGE, GPU, decoy])
    assert [d.devpath for d in world.ancestors(GPU)] == [BRIDGE.devpath, PCI.devpath]


def test_upsert_is_idempotent_and_remove_takes_children() -> None:
    world = World()
    for _ in range(2):
        for d in (PCI, BRIDGE, GPU):
            world.apply(DeviceUpsert(d))
    assert world == World.of([PCI, BRIDGE, GPU])
    world.apply(DeviceRemoved(BRIDGE.devpath))
    world.apply(DeviceRemoved(BRIDGE.devpath))
    assert world == World.of([PCI])


def test_move_renames_and_links_key_on_index() -> None:
    eth0 = Device(devpath="/devices/virtual/net/eth0", subsystem="net")
    renamed = Device(devpath="/devices/virtual/net/enx1", subsystem="net")
    world = World.of([eth0], [Link(index=3, ifname="eth0")])
    world.apply(DeviceMoved(eth0.devpath, renamed))
    world.apply(LinkUpsert(Link(index=3, ifname="enx1", operstate=OperState.UP)))
    assert list(world.devices) == [renamed.devpath]
    assert world.link_by_name("enx1") == Link(index=3, ifname="enx1", operstate=OperState.UP)
    world.apply(LinkRemoved(3))
    assert world.links == {}


def test_replace_one_half_keeps_the_other() -> None:
    world = World.of([GPU], [Link(index=1, ifname="lo")])
    world.apply(WorldReplaced(devices=None, links=()))
    assert world == World.of([GPU])


def test_operstate_parses_kernel_spelling() -> None:
    assert OperState.parse("UP") is OperState.UP
    assert OperState.parse("LOWERLAYERDOWN") is OperState.LOWERLAYERDOWN
    assert OperState.parse("bogus") is OperState.UNKNOWN
    assert OperState.parse(None) is OperState.UNKNOWN


def test_removal_takes_exactly_the_subtree() -> None:
    hub = Device(devpath="/devices/usb1/1-1")
    kids = [Device(devpath=f"/devices/usb1/1-1/1-1.{i}") for i in range(3)]
    grandkid = Device(devpath="/devices/usb1/1-1/1-1.0/1-1.0:1.0/net/enx1")
    sibling = Device(devpath="/devices/usb1/1-10")  # a prefix of the text, not of the path
    world = World.of([hub, *kids, grandkid, sibling])
    assert world.descendants(hub.devpath) == sorted([k.devpath for k in kids] + [grandkid.devpath])
    world.apply(DeviceRemoved(hub.devpath))
    assert world == World.of([sibling])
    assert world.descendants("/devices/usb1") == [sibling.devpath]
    # The index follows moves and replacements too.
    world.apply(DeviceMoved(sibling.devpath, Device(devpath="/devices/usb2/2-1")))
    assert world.descendants("/devices/usb2") == ["/devices/usb2/2-1"]
    world.apply(WorldReplaced(devices=(hub,), links=None))
    assert world.descendants("/devices/usb1") == [hub.devpath]
    world.apply(DeviceUpsert(kids[0]))
    world.apply(DeviceUpsert(kids[0]))
    assert world.descendants(hub.devpath) == [kids[0].devpath]


def test_addresses_follow_address_changes_and_survive_link_messages() -> None:
    world = World.of(links=[Link(index=3, ifname="eth0")])
    world.apply(AddressAdded(3, "10.20.0.5/16"))
    world.apply(AddressAdded(3, "10.20.0.5/16"))  # idempotent
    world.apply(AddressAdded(3, "fd00::5/64"))
    world.apply(AddressAdded(9, "10.0.0.9/8"))  # a link not known yet: its RTM_NEWLINK comes first
    assert world.links[3].addresses == {"10.20.0.5/16", "fd00::5/64"} and 9 not in world.links
    # A link message (rename, carrier) says nothing of addresses: they stay.
    world.apply(LinkUpsert(Link(index=3, ifname="lab0", operstate=OperState.UP)))
    assert world.links[3].ifname == "lab0"
    assert world.links[3].addresses == {"10.20.0.5/16", "fd00::5/64"}
    world.apply(AddressRemoved(3, "10.20.0.5/16"))
    world.apply(AddressRemoved(3, "10.20.0.5/16"))
    assert world.links[3].addresses == {"fd00::5/64"}
    # A re-enumeration is the truth, addresses included; a removed link takes them along.
    world.apply(WorldReplaced(devices=None, links=(Link(index=3, ifname="lab0"),)))
    assert world.links[3].addresses == frozenset()
    world.apply(AddressAdded(3, "10.1.0.1/24"))
    world.apply(LinkRemoved(3))
    world.apply(LinkUpsert(Link(index=3, ifname="lab0")))
    assert world.links[3].addresses == frozenset()
