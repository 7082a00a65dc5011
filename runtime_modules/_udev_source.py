"""The udev source: coldplug enumeration and a libudev monitor, translated into world changes.

A thin shell over pyudev and nothing else: it reads what udev says and makes no decision. The
monitor listens to the "udev" netlink source (events after udev's rules ran, so properties and
tags are final) and installs kernel-side (BPF) filters for the subsystems the rules use, so the
daemon is not even woken for the rest (see ``DeviceNeeds`` for why tags are not a filter).

Losing events is expected, not exceptional: the uevent socket overflows under a storm (ENOBUFS),
and then the only truth is the present world. ``read`` answers any monitor error with a full
re-enumeration (``WorldReplaced``), so what the daemon holds is right again after the next read.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pyudev
from pyudev._util import udev_list_iterate

from ._world import (
    EVENT_ONLY_PROPERTIES,
    Device,
    DeviceMoved,
    DeviceRemoved,
    DeviceUpsert,
    WorldChange,
    WorldReplaced,
)

__all__ = [
    "UDEVD_CONTROL",
    "DeviceNeeds",
    "UdevSource",
    "device_from_pyudev",
    "enumerate_devices",
    "udevd_listening",
]

log = logging.getLogger(__name__)

# Events drained per read() before the loop gets control back: bounds the latency a storm can add
# to other sources (netlink, signals) while keeping per-wakeup overhead negligible.
MAX_EVENTS_PER_READ = 512
# After a failed re-enumeration, the next try comes this much later (as for netlink links).
RESYNC_RETRY = 1.0
# systemd-udevd's control socket: whether it accepts a connection says whether udevd runs.
UDEVD_CONTROL = Path("/run/udev/control")


def udevd_listening(control: Path = UDEVD_CONTROL) -> bool:
    """Whether systemd-udevd runs, i.e. accepts connections on its control socket.

    The monitor opens and enumeration works without udevd (both read the kernel's sysfs and
    udev's database), but no event ever arrives: the daemon says so rather than wait in silence.
    A socket file alone proves nothing; an ended udevd leaves it behind, refusing. Never blocks.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK) as sock:
        try:
            sock.connect(str(control))
        except BlockingIOError:
            # EAGAIN: udevd listens with a backlog of 0 and is busy with another peer; it is
            # there. (A blocking connect would wait for it, and a stopped udevd never answers.)
            return True
        except PermissionError:
            return True  # a socket we may not use: something serves it; not ours to judge
        except OSError:  # ENOENT, ECONNREFUSED: nothing listens
            return False
    return True


class DeviceNeeds(Protocol):
    """What the rules need from udev (the rules' ``Needs`` fits; the sources don't import rules).

    ``subsystems`` None means "every subsystem". Tags are not used as a kernel filter: libudev
    ANDs a tag filter with the subsystem filter and rules may match on either, so a tag filter
    would drop events that a subsystem-only (or property-only) rule needs.
    """

    @property
    def subsystems(self) -> frozenset[str] | None: ...

    @property
    def attributes(self) -> frozenset[str]: ...


def _text(raw: bytes | str | None) -> str:
    # udev hands out raw bytes; a non-UTF-8 value (a vendor string from a cheap USB device) must
    # neither crash nor become an invalid str for JSON/journald, so bad bytes become \xNN.
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    return raw.decode("utf-8", "backslashreplace")


class _LazyAttributes(Mapping[str, str]):
    """The named sysfs attributes of one device, each read on first use and then kept.

    Reading sysfs costs a syscall triple per attribute; most devices of a storm are never asked
    for attributes by any rule, so they never pay it. A value that is missing or unreadable (the
    device is gone, EACCES, EIO) is simply absent.
    """

    __slots__ = ("_dev", "_names", "_values")

    def __init__(self, dev: Any, names: frozenset[str]) -> None:
        self._dev: Any = dev
        self._names = names
        self._values: dict[str, str | None] = {}

    def _read(self, name: str) -> str | None:
        if name in self._values:
            return self._values[name]
        value: str | None = None
        if self._dev is not None:
            try:
                raw = self._dev.attributes.get(name)
            except (OSError, KeyError, ValueError):
                raw = None
            value = None if raw is None else _text(raw).rstrip("\n")
        self._values[name] = value
        if len(self._values) == len(self._names):
            self._dev = None  # everything read: let libudev free the device
        return value

    def __getitem__(self, name: str) -> str:
        if name not in self._names:
            raise KeyError(name)
        value = self._read(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter([n for n in sorted(self._names) if self._read(n) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"{dict(self)!r}"


def _texts(pairs: Iterable[tuple[bytes, bytes | None]]) -> dict[str, str]:
    items = list(pairs)
    try:
        return {k.decode(): (v or b"").decode() for k, v in items}
    except UnicodeDecodeError:  # rare: only then pay for the careful path
        return {_text(k): _text(v) for k, v in items}


def device_from_pyudev(dev: Any, attributes: frozenset[str]) -> Device:
    """Translate a ``pyudev.Device`` into a ``Device`` (only the named sysfs attributes).

    Properties and tags are read in one pass over libudev's lists as raw bytes (pyudev's own
    mapping decodes strictly and raises on non-UTF-8 values).
    """
    lib = dev._libudev
    properties = _texts(udev_list_iterate(lib, lib.udev_device_get_properties_list_entry(dev)))
    for key in EVENT_ONLY_PROPERTIES.intersection(properties):
        del properties[key]
    tags = frozenset(_texts(udev_list_iterate(lib, lib.udev_device_get_tags_list_entry(dev))))
    return Device(
        devpath=_text(lib.udev_device_get_devpath(dev)),
        subsystem=_opt(lib.udev_device_get_subsystem(dev)),
        devtype=_opt(lib.udev_device_get_devtype(dev)),
        driver=_opt(lib.udev_device_get_driver(dev)),
        sysname=_text(lib.udev_device_get_sysname(dev)),
        properties=properties,
        attributes=_LazyAttributes(dev, attributes) if attributes else {},
        tags=tags,
    )


def _opt(raw: bytes | None) -> str | None:
    return None if raw is None else _text(raw)


def _ancestors(dev: Any) -> list[Any]:
    """The pyudev ancestors of ``dev``, farthest first (so a parent is known before a child)."""
    try:
        return list(dev.ancestors)[::-1]
    except (OSError, ValueError):
        return []  # the device vanished while we walked up: its remove event follows


def _old_devpath(dev: Any) -> str | None:
    raw = dev._libudev.udev_device_get_property_value(dev, b"DEVPATH_OLD")
    return None if raw is None else _text(raw)


def _candidates(context: Any, needs: DeviceNeeds | None) -> Iterable[Any]:
    enum: Iterable[Any] = context.list_devices()
    if needs is not None and needs.subsystems is not None:
        # libudev ORs subsystem matches: one enumeration covers them all.
        for subsystem in sorted(needs.subsystems):
            enum = enum.match_subsystem(subsystem)  # type: ignore[attr-defined]
    return enum


def enumerate_devices(context: Any, needs: DeviceNeeds | None) -> list[Device]:
    """Coldplug: every present device the rules may look at, plus all their ancestors.

    Ancestors are included whatever their subsystem, so that ``parent`` conditions (a drm card's
    PCI device, a NIC's USB hub) can be evaluated on a filtered world.
    """
    attributes = frozenset() if needs is None else needs.attributes
    found: dict[str, Device] = {}
    for dev in _candidates(context, needs):
        if dev.device_path in found:
            continue  # already there as the ancestor of an earlier one
        for ancestor in _ancestors(dev):
            path = ancestor.device_path
            if path not in found:
                found[path] = device_from_pyudev(ancestor, attributes)
        found[dev.device_path] = device_from_pyudev(dev, attributes)
    return list(found.values())


class UdevSource:
    """A started libudev monitor (source "udev"), filtered in the kernel by what rules need.

    ``fileno()`` is registered with the daemon's selector; ``read()`` drains what is ready
    without blocking and returns world changes. On any monitor error it re-enumerates and
    returns one ``WorldReplaced`` (``resyncs`` counts how often that happened).
    """

    def __init__(
        self, context: Any, needs: DeviceNeeds | None, *, receive_buffer: int | None = None
    ) -> None:
        self.context = context
        self.needs = needs
        self.attributes: frozenset[str] = frozenset() if needs is None else needs.attributes
        self.resyncs = 0
        self.resync_due: float | None = None  # monotonic: a failed re-enumeration is retried
        # Ancestors already handed out (and not removed since): a storm of events on one device
        # must not re-read its PCI bridges every time. An ancestor's own changes reach us as its
        # own events: the rules' Needs subscribe every subsystem a parent condition names (all
        # of them when one names none).
        self._sent_ancestors: set[str] = set()
        self._chains: dict[str, tuple[str, ...]] = {}  # devpath -> its ancestors' devpaths
        self.monitor = pyudev.Monitor.from_netlink(context, source="udev")
        if needs is not None and needs.subsystems is not None:
            for subsystem in sorted(needs.subsystems):
                self.monitor.filter_by(subsystem)
        if receive_buffer is not None:
            # SO_RCVBUFFORCE: needs CAP_NET_ADMIN (the daemon runs as root). Tests shrink it to
            # force an overrun; the daemon may grow it for machines with storms of uevents.
            self.monitor.set_receive_buffer_size(receive_buffer)
        self.monitor.start()

    def fileno(self) -> int:
        return int(self.monitor.fileno())

    def close(self) -> None:
        # libudev closes the socket when the monitor is unreferenced; drop ours now.
        self.monitor = None

    def _receive(self) -> Any:
        # Monitor.poll(0) costs a poll(2) per event on top of recvmsg(2); the selector already
        # said the socket is readable, so receive directly (None on EAGAIN, OSError otherwise).
        return self.monitor._receive_device()

    def read(self, limit: int = MAX_EVENTS_PER_READ) -> list[WorldChange]:
        """The changes ready now (at most ``limit`` events), or a re-enumeration after an error.

        While a failed re-enumeration waits for its retry (``resync_due``), what arrives is
        dropped (the re-enumeration will see it) and nothing is returned.
        """
        if self.resync_due is not None:
            if time.monotonic() < self.resync_due:
                for _ in range(limit):
                    try:
                        if self._receive() is None:
                            break
                    except OSError:
                        continue
                return []
            return self.try_resync()
        changes: list[WorldChange] = []
        for _ in range(limit):
            try:
                dev = self._receive()
            except OSError as exc:
                log.warning(
                    "udev monitor error (%s): re-enumerating devices",
                    errno.errorcode.get(exc.errno or 0, exc),
                )
                return self.try_resync()
            if dev is None:
                break
            changes.extend(self.changes_of(dev))
        return changes

    def resync(self) -> WorldReplaced:
        """Drop what is queued (older than what enumeration will see) and enumerate anew."""
        self.resyncs += 1
        self._sent_ancestors.clear()
        self._chains.clear()
        for _ in range(1 << 16):  # bounded: a sender faster than us must not pin us here
            try:
                if self._receive() is None:
                    break
            except OSError:
                continue
        return WorldReplaced(devices=tuple(enumerate_devices(self.context, self.needs)), links=None)

    def try_resync(self) -> list[WorldChange]:
        """``resync``, but a failure is logged and retried at ``resync_due``, never raised."""
        try:
            replaced = self.resync()
        except OSError as exc:
            self.resync_due = time.monotonic() + RESYNC_RETRY
            log.warning("re-enumerating devices failed (%s); retrying in %g s", exc, RESYNC_RETRY)
            return []
        self.resync_due = None
        return [replaced]

    def changes_of(self, dev: Any) -> list[WorldChange]:
        """The world changes one monitor event means (level-triggered, ancestors included)."""
        action = dev.action
        path = dev.device_path
        if action == "remove":
            self._forget(path)
            return [DeviceRemoved(path)]
        changes = self._ancestor_changes(dev, path)
        device = device_from_pyudev(dev, self.attributes)
        old = _old_devpath(dev) if action == "move" else None
        if old:
            self._forget(old)
            changes.append(DeviceMoved(old, device))
        else:
            # add, change, bind, unbind, online, offline: the device is present with these facts
            changes.append(DeviceUpsert(device, action=action or None))
        return changes

    def _ancestor_changes(self, dev: Any, path: str) -> list[WorldChange]:
        chain = self._chains.get(path)
        sent = self._sent_ancestors
        if chain is not None and sent.issuperset(chain):
            return []
        changes: list[WorldChange] = []
        paths = []
        for ancestor in _ancestors(dev):
            ancestor_path = ancestor.device_path
            paths.append(ancestor_path)
            if ancestor_path not in sent:
                found = device_from_pyudev(ancestor, self.attributes)
                changes.append(DeviceUpsert(found, ancestor=True))
                sent.add(ancestor_path)
        self._chains[path] = tuple(paths)
        return changes

    def _forget(self, path: str) -> None:
        """``path`` and everything below it left the world: read them afresh if they return."""
        below = path + "/"
        self._sent_ancestors = {
            p for p in self._sent_ancestors if p != path and not p.startswith(below)
        }
        for key in [k for k in self._chains if k == path or k.startswith(below)]:
            del self._chains[key]
