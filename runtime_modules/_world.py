"""The world model: what is present on a machine right now.

A ``World`` holds udev devices (keyed by devpath) and network links (keyed by interface index).
It is built by a source (live enumeration, a udev database dump, a umockdev recording, ``ip -j
link`` output) and kept current by ``WorldChange`` values that the sources translate events into.
No I/O happens here: sources do the reading, this module only holds and updates the facts.

Ancestors are not stored as pointers: a device's ancestors are the devices whose devpath is a
path-prefix of its own, exactly as in ``udevadm info --export-db`` output. Sources that see only
some subsystems live must therefore insert a device's ancestors along with it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """One udev device as udev reports it (never interpreted here)."""

    devpath: str  # "/devices/pci0000:00/0000:00:01.0/0000:01:00.0", always starting with "/"
    subsystem: str | None = None
    devtype: str | None = None
    driver: str | None = None
    sysname: str = ""
    properties: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    # Only the sysfs attributes that rules use are read (lazily, by the live source).
    attributes: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    tags: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.devpath.startswith("/"):
            raise ValueError(f"devpath must start with '/': {self.devpath!r}")
        if not self.sysname:
            object.__setattr__(self, "sysname", self.devpath.rsplit("/", 1)[-1])


class OperState(enum.Enum):
    """RFC 2863 operational state as the kernel reports it (IF_OPER_*), lower-cased."""

    UNKNOWN = "unknown"
    NOTPRESENT = "notpresent"
    DOWN = "down"
    LOWERLAYERDOWN = "lowerlayerdown"
    TESTING = "testing"
    DORMANT = "dormant"
    UP = "up"

    @classmethod
    def parse(cls, text: str | None) -> OperState:
        try:
            return cls((text or "unknown").lower())
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """One network link as netlink (RTM_NEWLINK) or ``ip -j link`` reports it."""

    index: int
    ifname: str
    kind: str | None = None  # IFLA_INFO_KIND: veth, bridge, wireguard…; None for physical NICs
    operstate: OperState = OperState.UNKNOWN
    carrier: bool | None = None
    mac: str | None = None  # lower-case "aa:bb:cc:dd:ee:ff"


# --- changes -------------------------------------------------------------------------------
# Sources translate events into these. They are idempotent: applying the same change twice, or
# an "upsert" for something already present, leaves the same world (level-triggered).


@dataclass(frozen=True, slots=True)
class DeviceUpsert:
    """A device is present with these facts (udev add, change, bind, unbind)."""

    device: Device


@dataclass(frozen=True, slots=True)
class DeviceRemoved:
    devpath: str


@dataclass(frozen=True, slots=True)
class DeviceMoved:
    """udev ``move``: the device now lives at ``device.devpath`` (a NIC rename, for one)."""

    old_devpath: str
    device: Device


@dataclass(frozen=True, slots=True)
class LinkUpsert:
    link: Link


@dataclass(frozen=True, slots=True)
class LinkRemoved:
    index: int


@dataclass(frozen=True, slots=True)
class WorldReplaced:
    """A full re-enumeration: the new truth replaces everything (coldplug, overrun recovery).

    ``devices`` or ``links`` is None when only the other half was re-enumerated.
    """

    devices: tuple[Device, ...] | None
    links: tuple[Link, ...] | None


WorldChange = DeviceUpsert | DeviceRemoved | DeviceMoved | LinkUpsert | LinkRemoved | WorldReplaced


def is_ancestor_path(ancestor: str, devpath: str) -> bool:
    """True when ``ancestor`` is a strict path-prefix of ``devpath`` ("/a/b" of "/a/b/c")."""
    return (
        len(devpath) > len(ancestor)
        and devpath.startswith(ancestor)
        and (devpath[len(ancestor)] == "/")
    )


class World:
    """The present devices and links. Mutable on purpose: one world is kept current by changes.

    Copy with ``copy()`` when a snapshot must not move (``simulate`` does, the daemon does not).
    """

    __slots__ = ("devices", "links")

    def __init__(
        self, devices: Mapping[str, Device] | None = None, links: Mapping[int, Link] | None = None
    ) -> None:
        self.devices: dict[str, Device] = dict(devices or {})
        self.links: dict[int, Link] = dict(links or {})

    @classmethod
    def of(
        cls,
        devices: tuple[Device, ...] | list[Device] = (),
        links: tuple[Link, ...] | list[Link] = (),
    ) -> World:
        return cls({d.devpath: d for d in devices}, {link.index: link for link in links})

    def copy(self) -> World:
        return World(self.devices, self.links)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, World) and self.devices == other.devices and self.links == other.links
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"World({len(self.devices)} devices, {len(self.links)} links)"

    def apply(self, change: WorldChange) -> None:
        """Make ``change`` true of this world."""
        match change:
            case DeviceUpsert(device):
                self.devices[device.devpath] = device
            case DeviceRemoved(devpath):
                # A removed parent takes its children with it (the kernel removes them first,
                # but a lost event must not leave orphans behind).
                self.devices.pop(devpath, None)
                for path in [p for p in self.devices if is_ancestor_path(devpath, p)]:
                    del self.devices[path]
            case DeviceMoved(old_devpath, device):
                self.devices.pop(old_devpath, None)
                self.devices[device.devpath] = device
            case LinkUpsert(link):
                self.links[link.index] = link
            case LinkRemoved(index):
                self.links.pop(index, None)
            case WorldReplaced(devices, links):
                if devices is not None:
                    self.devices = {d.devpath: d for d in devices}
                if links is not None:
                    self.links = {link.index: link for link in links}

    def ancestors(self, device: Device) -> Iterator[Device]:
        """The recorded ancestors of ``device``, nearest first."""
        path = device.devpath
        while True:
            cut = path.rfind("/")
            if cut <= 0:
                return
            path = path[:cut]
            parent = self.devices.get(path)
            if parent is not None:
                yield parent

    def link_by_name(self, ifname: str) -> Link | None:
        for link in self.links.values():
            if link.ifname == ifname:
                return link
        return None
