"""The world model: changes are idempotent and ancestors are path prefixes."""

from runtime_modules import (
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
