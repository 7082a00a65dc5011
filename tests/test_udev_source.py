"""The udev source against real libudev: umockdev uevents, and real veth uevents through udevd."""

from __future__ import annotations

import select
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from runtime_modules._udev_source import UdevSource, device_from_pyudev, enumerate_devices
from runtime_modules._world import DeviceRemoved, DeviceUpsert, World, WorldChange, WorldReplaced
from tests.fixtures.daemon import UmockdevBed

pytestmark = pytest.mark.root


@dataclass(frozen=True)
class Needs:
    subsystems: frozenset[str] | None = None
    attributes: frozenset[str] = frozenset()


# --- umockdev: the monitor sees injected uevents -------------------------------------------


@pytest.mark.umockdev
def test_coldplug_keeps_subsystem_and_ancestors_only(umockdev_bed: UmockdevBed) -> None:
    gpu = umockdev_bed.add("pci", "gpu0", attributes={"vendor": "0x10de"})
    umockdev_bed.add("drm", "card0", parent=gpu, properties={"DEVTYPE": "drm_minor"})
    umockdev_bed.add("usb", "hub1", properties={"PRODUCT": "bda/8153/3100"})
    reply = umockdev_bed.call("source", subsystems=["drm"], attributes=["vendor"])
    found = {d["devpath"]: d for d in reply["coldplug"]}
    assert sorted(found) == ["/devices/gpu0", "/devices/gpu0/card0"]
    assert found["/devices/gpu0"]["attributes"] == {"vendor": "0x10de"}
    assert found["/devices/gpu0/card0"]["devtype"] == "drm_minor"


@pytest.mark.umockdev
def test_events_become_level_triggered_changes(umockdev_bed: UmockdevBed) -> None:
    umockdev_bed.call("source", subsystems=["drm", "pci", "net"], attributes=["vendor"])
    umockdev_bed.add("usb", "hub1")  # filtered in the kernel: must never show up below
    gpu = umockdev_bed.add("pci", "gpu0", attributes={"vendor": "0x10de"})
    card = umockdev_bed.add("drm", "card0", parent=gpu, properties={"DEVTYPE": "drm_minor"})
    changes = umockdev_bed.call("read", min=3)["changes"]
    # add: the device, and with a child its ancestors first (a parent condition needs them)
    assert [(c["type"], c["device"]["devpath"]) for c in changes] == [
        ("upsert", "/devices/gpu0"),
        ("upsert", "/devices/gpu0"),
        ("upsert", "/devices/gpu0/card0"),
    ]
    assert "ACTION" not in changes[0]["device"]["properties"]  # same as when enumerated
    assert "SEQNUM" not in changes[0]["device"]["properties"]
    # the ancestors are in the world now: a change of the card does not read them again
    umockdev_bed.uevent(card, "change")
    (changed,) = umockdev_bed.call("read")["changes"]
    assert changed["device"]["devpath"] == "/devices/gpu0/card0"

    # bind: the driver arrives after the device
    umockdev_bed.set_property(gpu, "DRIVER", "nvidia")
    umockdev_bed.uevent(gpu, "bind")
    (bound,) = umockdev_bed.call("read")["changes"]
    assert (bound["type"], bound["device"]["driver"]) == ("upsert", "nvidia")

    umockdev_bed.remove(card)
    assert umockdev_bed.call("read")["changes"] == [
        {"type": "removed", "devpath": "/devices/gpu0/card0"}
    ]
    # a removed ancestor is read again when a child of a new one comes
    umockdev_bed.remove(gpu)
    gpu = umockdev_bed.add("pci", "gpu0", attributes={"vendor": "0x1002"})
    umockdev_bed.add("drm", "card1", parent=gpu)
    changes = umockdev_bed.call("read", min=4)["changes"]
    assert [(c["type"], c.get("devpath") or c["device"]["devpath"]) for c in changes] == [
        ("removed", "/devices/gpu0"),
        ("upsert", "/devices/gpu0"),
        ("upsert", "/devices/gpu0"),
        ("upsert", "/devices/gpu0/card1"),
    ]
    assert changes[2]["device"]["attributes"] == {"vendor": "0x1002"}

    # move: a NIC renamed from its kernel name
    umockdev_bed.add("net", "eth0", properties={"INTERFACE": "eth0"})
    renamed = umockdev_bed.add(
        "net",
        "enx00e04c680001",
        properties={"INTERFACE": "enx00e04c680001", "DEVPATH_OLD": "/devices/eth0"},
    )
    umockdev_bed.uevent(renamed, "move")
    changes = umockdev_bed.call("read", min=3)["changes"]
    assert changes[-1]["type"] == "moved"
    assert changes[-1]["old"] == "/devices/eth0"
    assert changes[-1]["device"]["devpath"] == "/devices/enx00e04c680001"


@pytest.mark.umockdev
def test_attributes_only_named_tolerating_missing_and_binary(umockdev_bed: UmockdevBed) -> None:
    umockdev_bed.call("source", subsystems=["power_supply"], attributes=["online", "model_name"])
    umockdev_bed.add_string(
        "P: /devices/platform/AC0/power_supply/AC0\n"
        "E: SUBSYSTEM=power_supply\n"
        "A: online=1\\n\n"
        "A: type=Mains\n"
        "H: model_name=41ff42\n"
    )
    umockdev_bed.uevent("/sys/devices/platform/AC0/power_supply/AC0", "change")
    changes = umockdev_bed.call("read", min=2)["changes"]
    device = changes[-1]["device"]
    # "type" was not named; "model_name" is not UTF-8 and arrives escaped, not as a crash
    assert device["attributes"] == {"model_name": "A\\xffB", "online": "1"}


@pytest.mark.umockdev
def test_storm_of_one_thousand_uevents_is_read_in_full(umockdev_bed: UmockdevBed) -> None:
    umockdev_bed.call("source", subsystems=["drm"])
    card = umockdev_bed.add("drm", "card0", properties={"DEVTYPE": "drm_minor"})
    umockdev_bed.uevent(card, "change", count=1000)
    changes = umockdev_bed.call("read", min=1001, timeout=10)["changes"]
    assert len(changes) == 1001
    assert {c["device"]["devpath"] for c in changes} == {"/devices/card0"}


# --- real udevd: kernel uevents of a veth pair ----------------------------------------------


@pytest.fixture
def veth_names() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:8]
    names = (f"rmv{tag}", f"rmw{tag}")
    try:
        yield names
    finally:
        subprocess.run(["ip", "link", "del", names[0]], check=False, capture_output=True)


def _read_until(source: UdevSource, done: Any, timeout: float = 5.0) -> list[WorldChange]:
    import time

    deadline = time.monotonic() + timeout
    seen: list[WorldChange] = []
    while not done(seen):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if select.select([source], [], [], left)[0]:
            seen.extend(source.read())
    return seen


def _net_names(changes: list[WorldChange]) -> set[str]:
    return {
        c.device.sysname
        for c in changes
        if isinstance(c, DeviceUpsert) and c.device.subsystem == "net"
    }


def test_real_veth_uevent_reaches_the_source(udevd: None, veth_names: tuple[str, str]) -> None:
    import pyudev

    context = pyudev.Context()
    source = UdevSource(context, Needs(subsystems=frozenset({"net"})))
    a, b = veth_names
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    seen = _read_until(source, lambda s: {a, b} <= _net_names(s))
    assert {a, b} <= _net_names(seen)
    device = next(c.device for c in seen if isinstance(c, DeviceUpsert) and c.device.sysname == a)
    # processed by udevd: its builtin net_id/net_setup_link properties are there
    assert device.properties.get("INTERFACE") == a
    assert device.devpath == f"/devices/virtual/net/{a}"

    subprocess.run(["ip", "link", "del", a], check=True)
    gone = _read_until(source, lambda s: sum(isinstance(c, DeviceRemoved) for c in s) >= 2)
    assert {c.devpath for c in gone if isinstance(c, DeviceRemoved)} == {
        f"/devices/virtual/net/{a}",
        f"/devices/virtual/net/{b}",
    }


def test_the_real_udev_action_reaches_the_events_stream(
    udevd: None, veth_names: tuple[str, str]
) -> None:
    import pyudev

    from runtime_modules._control_events import events_of
    from runtime_modules._daemon_events import WorldChanged

    context = pyudev.Context()
    source = UdevSource(context, Needs(subsystems=frozenset({"net"})))
    a, b = veth_names
    path = f"/devices/virtual/net/{a}"
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    world = World()
    seen = _read_until(source, lambda s: a in _net_names(s))
    for change in seen:
        world.apply(change)
    # Real kernel uevents of the known device, through udevd: each keeps its own action.
    for action in ("bind", "online", "unbind", "offline", "change"):
        subprocess.run(["udevadm", "trigger", f"--action={action}", f"/sys{path}"], check=True)
    changes = _read_until(
        source,
        lambda s: sum(isinstance(c, DeviceUpsert) and c.device.devpath == path for c in s) >= 5,
    )
    mine = [c for c in changes if isinstance(c, DeviceUpsert) and c.device.devpath == path]
    assert [(c.action, c.ancestor) for c in mine] == [
        ("bind", False),
        ("online", False),
        ("unbind", False),
        ("offline", False),
        ("change", False),
    ]
    assert mine[0] == DeviceUpsert(mine[0].device)  # no fact of the world: equal without them
    events = list(events_of(WorldChanged("udev", tuple(mine)), world, wall=1.0, to_wall=float))
    assert [e.text for e in events] == [
        f"bind {path} (net)",
        f"online {path} (net)",
        f"unbind {path} (net)",
        f"offline {path} (net)",
        f"change {path} (net)",
    ]
    assert [e.data["action"] for e in events] == ["bind", "online", "unbind", "offline", "change"]


def test_monitor_overrun_is_answered_by_re_enumeration(
    udevd: None, veth_names: tuple[str, str]
) -> None:
    import pyudev

    context = pyudev.Context()
    needs = Needs(subsystems=frozenset({"net"}))
    # The smallest receive buffer the kernel allows (2 x SOCK_MIN_RCVBUF): a few uevents fill it.
    source = UdevSource(context, needs, receive_buffer=1)
    a, b = veth_names
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    for n in range(6):
        subprocess.run(["ip", "link", "set", a, "mtu", str(1400 + n)], check=True)
        subprocess.run(["ip", "link", "set", a, "up"], check=True)
        subprocess.run(["ip", "link", "set", a, "down"], check=True)
    subprocess.run(["udevadm", "settle", "--timeout=10"], check=True)
    changes = source.read()
    assert source.resyncs == 1
    assert len(changes) == 1 and isinstance(changes[0], WorldReplaced)
    world = World()
    world.apply(changes[0])
    expected = World.of(enumerate_devices(context, needs))
    assert world == expected
    assert {a, b} <= {d.sysname for d in world.devices.values()}


def test_device_from_pyudev_strips_sys_and_event_keys(udevd: None) -> None:
    import pyudev

    context = pyudev.Context()
    lo = pyudev.Devices.from_path(context, "/sys/devices/virtual/net/lo")
    device = device_from_pyudev(lo, frozenset({"mtu", "no_such_attribute"}))
    assert device.devpath == "/devices/virtual/net/lo"
    assert device.subsystem == "net"
    assert device.sysname == "lo"
    assert dict(device.attributes) == {"mtu": lo.attributes.asstring("mtu")}
    assert "no_such_attribute" not in device.attributes


def test_a_failed_re_enumeration_is_retried_not_raised(
    udevd: None, veth_names: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import pyudev

    from runtime_modules import _udev_source

    context = pyudev.Context()
    needs = Needs(subsystems=frozenset({"net"}))
    source = UdevSource(context, needs, receive_buffer=1)
    a, b = veth_names
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    for n in range(6):
        subprocess.run(["ip", "link", "set", a, "mtu", str(1400 + n)], check=True)
    subprocess.run(["udevadm", "settle", "--timeout=10"], check=True)

    # No real fault makes libudev's enumeration fail on demand (sysfs read errors): simulate one.
    def fails(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_udev_source, "enumerate_devices", fails)
    assert source.read() == []  # the overrun's re-enumeration failed: said, not raised
    assert source.resync_due is not None
    monkeypatch.undo()
    source.resync_due = time.monotonic()  # the daemon's timer calls read() when it is due
    changes = source.read()
    assert source.resync_due is None
    assert len(changes) == 1 and isinstance(changes[0], WorldReplaced)
    assert {a, b} <= {d.sysname for d in changes[0].devices or ()}


def test_the_udevd_probe_never_blocks(tmp_path: Any, udevd: None) -> None:
    import socket
    import threading
    import time

    from runtime_modules._udev_source import UDEVD_CONTROL, udevd_listening

    assert udevd_listening(UDEVD_CONTROL)  # the real one
    assert not udevd_listening(tmp_path / "none")
    # A udevd that stopped (SIGSTOP) or is busy: its backlog of 0 is full, so a blocking connect
    # would wait for as long as it does not accept. The probe must answer at once: "there".
    busy = tmp_path / "busy"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(str(busy))
        server.listen(0)
        first = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        first.connect(str(busy))  # takes the one slot; nobody ever accepts
        answers: list[bool] = []
        probe = threading.Thread(target=lambda: answers.append(udevd_listening(busy)))
        started = time.monotonic()
        probe.start()
        probe.join(5)
        first.close()
        assert answers == [True] and time.monotonic() - started < 1
    assert not udevd_listening(busy)  # closed: the file is left, refusing
