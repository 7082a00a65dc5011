"""The world model: what is present on a machine right now.

A ``World`` holds udev devices (keyed by devpath) and network links (keyed by interface index).
It is built by a source (live enumeration, a udev database dump, a umockdev recording, ``ip -j
addr`` output) and kept current by ``WorldChange`` values that the sources translate events into.
No I/O happens here: sources do the reading, this module only holds and updates the facts.

Ancestors are not stored as pointers: a device's ancestors are the devices whose devpath is a
path-prefix of its own, exactly as in ``udevadm info --export-db`` output. Sources that see only
some subsystems live must therefore insert a device's ancestors along with it.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
    # IP addresses with their prefix length as ``ip`` prints them ("10.20.0.5/16", "fd00::5/64",
    # "10.0.0.1 peer 10.0.0.2/32"), but those that failed duplicate address detection; only read
    # when a rule tests addresses. Link messages do not carry them, so a ``LinkUpsert`` keeps what
    # the world knew (see ``World.apply``).
    addresses: frozenset[str] = frozenset()


# --- changes -------------------------------------------------------------------------------
# Sources translate events into these. They are idempotent: applying the same change twice, or
# an "upsert" for something already present, leaves the same world (level-triggered).


@dataclass(frozen=True, slots=True)
class DeviceUpsert:
    """A device is present with these facts (udev add, change, bind, unbind, online, offline).

    ``action`` and ``ancestor`` say how a source learnt it, for what it shows (the events
    stream); they are no fact of the world and do not count in comparisons. ``action`` is the
    udev action of the device's own event (None when the source has none); ``ancestor`` is true
    for an ancestor the source inserts along with a device (no event of its own).
    """

    device: Device
    action: str | None = field(default=None, compare=False)
    ancestor: bool = field(default=False, compare=False)


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
class AddressAdded:
    """The link ``index`` has the address ``address`` ("10.20.0.5/16") now."""

    index: int
    address: str


@dataclass(frozen=True, slots=True)
class AddressRemoved:
    """The link ``index`` no longer has the address ``address`` (or it failed DAD)."""

    index: int
    address: str


@dataclass(frozen=True, slots=True)
class WorldReplaced:
    """A full re-enumeration: the new truth replaces everything (coldplug, overrun recovery).

    ``devices`` or ``links`` is None when only the other half was re-enumerated.
    """

    devices: tuple[Device, ...] | None
    links: tuple[Link, ...] | None


WorldChange = (
    DeviceUpsert
    | DeviceRemoved
    | DeviceMoved
    | LinkUpsert
    | LinkRemoved
    | AddressAdded
    | AddressRemoved
    | WorldReplaced
)


# Keys that describe one uevent, not the device: without them an event's device equals the same
# device enumerated, so a resync, a restart or a replayed capture sees no spurious change.
EVENT_ONLY_PROPERTIES = frozenset({"ACTION", "SEQNUM", "DEVPATH_OLD", "SYNTH_UUID"})


class World:
    """The present devices and links. Mutable on purpose: one world is kept current by changes.

    Copy with ``copy()`` when a snapshot must not move (``simulate`` does, the daemon does not).
    """

    __slots__ = ("_paths", "devices", "links")

    def __init__(
        self, devices: Mapping[str, Device] | None = None, links: Mapping[int, Link] | None = None
    ) -> None:
        # Read-only for everyone but this class: ``_paths`` must stay in step with ``devices``.
        self.devices: dict[str, Device] = dict(devices or {})
        self.links: dict[int, Link] = dict(links or {})
        # Devpaths in sorted order, so that a device's descendants are one contiguous slice:
        # removing a hub finds its children in O(log n), not by scanning every device.
        self._paths: list[str] = sorted(self.devices)

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
                self._put(device)
            case DeviceRemoved(devpath):
                # A removed parent takes its children with it (the kernel removes them first,
                # but a lost event must not leave orphans behind).
                self._remove_subtree(devpath)
            case DeviceMoved(old_devpath, device):
                self._drop(old_devpath)
                self._put(device)
            case LinkUpsert(link):
                known = self.links.get(link.index)
                if known is not None and known.addresses and not link.addresses:
                    # A link message says nothing of addresses (a rename or a carrier change
                    # keeps them); only address messages and re-enumerations change them.
                    link = replace(link, addresses=known.addresses)
                self.links[link.index] = link
            case LinkRemoved(index):
                self.links.pop(index, None)
            case AddressAdded(index, address):
                # An address of a link not known yet is dropped: its RTM_NEWLINK comes first,
                # and after a lost one the re-enumeration brings link and addresses together.
                if (known := self.links.get(index)) is not None:
                    self.links[index] = replace(known, addresses=known.addresses | {address})
            case AddressRemoved(index, address):
                if (known := self.links.get(index)) is not None and address in known.addresses:
                    self.links[index] = replace(known, addresses=known.addresses - {address})
            case WorldReplaced(devices, links):
                if devices is not None:
                    self.devices = {d.devpath: d for d in devices}
                    self._paths = sorted(self.devices)
                if links is not None:
                    self.links = {link.index: link for link in links}

    def _put(self, device: Device) -> None:
        if device.devpath not in self.devices:
            bisect.insort(self._paths, device.devpath)
        self.devices[device.devpath] = device

    def _drop(self, devpath: str) -> None:
        if self.devices.pop(devpath, None) is not None:
            del self._paths[bisect.bisect_left(self._paths, devpath)]

    def _remove_subtree(self, devpath: str) -> None:
        self._drop(devpath)
        # Descendants sort between "<devpath>/" and "<devpath>0" ('0' follows '/' in ASCII).
        lo = bisect.bisect_left(self._paths, devpath + "/")
        hi = bisect.bisect_left(self._paths, devpath + "0", lo)
        for path in self._paths[lo:hi]:
            del self.devices[path]
        del self._paths[lo:hi]

    def devpaths(self) -> Sequence[str]:
        """Every devpath, sorted (a view: do not change it)."""
        return self._paths

    def descendants(self, devpath: str) -> list[str]:
        """Devpaths of the recorded descendants of ``devpath``, in sorted order."""
        lo = bisect.bisect_left(self._paths, devpath + "/")
        return self._paths[lo : bisect.bisect_left(self._paths, devpath + "0", lo)]

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
