"""Readers of recorded worlds: udev database dumps (both formats), umockdev, ip -j link."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from runtime_modules._dumps import (
    parse_ip_link_json,
    parse_udev_db,
    parse_umockdev,
    read_ip_link_json,
    read_udev_db,
    read_umockdev,
    world_from_files,
)
from runtime_modules._errors import DumpError
from runtime_modules._world import OperState
from tests.fixtures.system import ip_netns
from tests.fixtures.world import all_recordings

_PROPERTY = re.compile(r"^(?:E: )?([A-Za-z_][A-Za-z0-9_.]*)=(.*)$")


def naive_records(text: str) -> list[tuple[str, dict[str, str]]]:
    """(devpath, properties) per record, read as plainly as possible to check the reader."""
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line]
        if not lines:
            continue
        assert lines[0].startswith("P: ")
        props = {}
        for line in lines[1:]:
            if m := _PROPERTY.match(line):
                props[m.group(1)] = m.group(2)
        out.append((lines[0][3:], props))
    return out


@pytest.mark.parametrize("path", all_recordings(), ids=lambda p: p.name)
def test_every_recording_parses_completely(path: Path) -> None:
    devices = read_udev_db(path)
    expected = naive_records(path.read_text())
    assert len(devices) == len(expected) == path.read_text().count("\nP: ") + 1
    for device, (devpath, props) in zip(devices, expected, strict=True):
        assert device.devpath == devpath
        assert dict(device.properties) == props
        assert device.subsystem == props.get("SUBSYSTEM")
        assert device.driver == props.get("DRIVER")
        assert device.sysname == devpath.rsplit("/", 1)[-1]
        assert device.tags == frozenset(t for t in props.get("TAGS", "").split(":") if t)


def test_property_lines_that_lost_their_prefix_are_kept(recording_paths: dict[str, Path]) -> None:
    # The DGX dump, as published, has MODALIAS lines without "E: ".
    dgx = {d.devpath: d for d in read_udev_db(recording_paths["dgx"])}
    mouse = next(d for p, d in dgx.items() if p.endswith("0003:03F0:094A.0001"))
    assert mouse.properties["MODALIAS"] == "hid:b0003g0001v000003F0p0000094A"


NEW_FORMAT = """\
P: /devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda
M: sda
R: a
J: b8:0
U: block
T: disk
D: b 8:0
N: sda
L: 0
S: disk/by-id/ata-SAMSUNG
Q: 1
E: DEVPATH=/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda
E: ID_BUS=ata
E: TAGS=:systemd:

P: /devices/pci0000:00/0000:00:1f.6/net/enp0s31f6
M: enp0s31f6
R: 6
U: net
I: 2
V: e1000e
X: a future letter of udevadm
E: INTERFACE=enp0s31f6
"""


def test_new_format_fields_and_link_priority() -> None:
    sda, nic = parse_udev_db(NEW_FORMAT, "new.txt")
    assert (sda.sysname, sda.subsystem, sda.devtype, sda.driver) == ("sda", "block", "disk", None)
    assert sda.tags == frozenset({"systemd"}) and dict(sda.attributes) == {}  # L: is a priority
    assert (nic.subsystem, nic.driver, nic.sysname) == ("net", "e1000e", "enp0s31f6")


def test_this_machines_udevadm_dump(tmp_path: Path) -> None:
    # The real udevadm of this machine writes the new format (M:, R:, U:, …).
    if shutil.which("udevadm") is None:
        pytest.skip("udevadm is not installed (Debian package udev)")
    dump = tmp_path / "db.txt"
    with dump.open("w") as f:
        subprocess.run(["udevadm", "info", "--export-db"], stdout=f, check=True)
    devices = read_udev_db(dump)
    assert len(devices) == dump.read_text().count("P: ")
    lo = next(d for d in devices if d.devpath == "/devices/virtual/net/lo")
    assert lo.subsystem == "net" and lo.sysname == "lo"


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("P: /devices/a\nE: A=1\ngarbage here\n", 3, "not a record line"),
        ("E: A=1\n", 1, "must start with a `P: /devices/…` line"),
        ("P: /devices/a\nP: /devices/b\n", 2, "a second `P:` line"),
        ("P: /devices/a\nE: NOEQUALS\n", 2, "expected KEY=VALUE"),
        ("P: devices/a\n", 1, "must start with '/'"),
    ],
)
def test_udev_db_errors_name_file_and_line(text: str, line: int, what: str) -> None:
    with pytest.raises(DumpError) as info:
        parse_udev_db(text, "dump.txt")
    message = str(info.value)
    assert message.startswith(f"dump.txt:{line}: ") and what in message
    assert "udevadm info --export-db" in message  # how to make a good one


def test_unreadable_files(tmp_path: Path) -> None:
    binary = tmp_path / "bin"
    binary.write_bytes(b"P: /devices/a\0\n")
    empty = tmp_path / "empty"
    empty.write_text("\n\n")
    for path, what in [
        (binary, "a binary file"),
        (empty, "no device records"),
        (tmp_path / "missing", "no such file"),
        (tmp_path, "is a folder"),
    ]:
        with pytest.raises(DumpError, match=what) as info:
            read_udev_db(path)
        assert str(info.value).startswith(str(path))


def test_non_utf8_values_survive() -> None:
    (d,) = parse_udev_db(b"P: /devices/a\nE: ID_MODEL=caf\xe9\n".decode("latin-1"), "x")
    assert d.properties["ID_MODEL"] == "café"
    with pytest.raises(DumpError):  # NUL bytes are not text
        read_udev_db(Path("/proc/self/cmdline"))


# --- umockdev -------------------------------------------------------------------------------


def test_umockdev_record_of_this_machine(tmp_path: Path) -> None:
    exe = shutil.which("umockdev-record")
    if exe is None:
        pytest.skip("umockdev-record is not installed (Debian package umockdev)")
    out = tmp_path / "lo.umockdev"
    with out.open("w") as f:
        subprocess.run([exe, "/sys/devices/virtual/net/lo"], stdout=f, check=True)
    (lo,) = read_umockdev(out)
    assert (lo.devpath, lo.subsystem, lo.sysname) == ("/devices/virtual/net/lo", "net", "lo")
    assert lo.attributes["address"] == "00:00:00:00:00:00"  # "A: address=00:…:00\n" unescaped
    assert lo.attributes["mtu"].isdigit() and lo.properties["INTERFACE"] == "lo"


UMOCKDEV = r"""P: /devices/pci0000:00/0000:00:14.0/usb1/1-2
N: bus/usb/001/002=12010002090001403C1E
E: SUBSYSTEM=usb
E: DEVTYPE=usb_device
E: TAGS=:seat:
A: manufacturer=Lenovo\\Dock\tA\101\n
A: bDeviceClass=09\n
H: descriptors=12010002090001403C1E
H: product=5468696E6B506164
L: driver=../../../../bus/usb/drivers/usb
S: char/189:1

P: /devices/pci0000:00/0000:00:14.0
L: subsystem=../../../bus/pci
L: driver=../../../bus/pci/drivers/xhci_hcd
A: class=0x0c0330\n
"""


def test_umockdev_lines_and_escapes(umockdev_wrapper: str, tmp_path: Path) -> None:
    hub, xhci = parse_umockdev(UMOCKDEV, "dock.umockdev")
    assert (hub.subsystem, hub.devtype, hub.driver, hub.tags) == (
        "usb",
        "usb_device",
        "usb",  # from the L: driver link
        frozenset({"seat"}),
    )
    assert hub.attributes["bDeviceClass"] == "09"
    assert hub.attributes["product"] == "ThinkPad"  # H: hex that is text
    assert "descriptors" not in hub.attributes  # H: hex that is binary
    assert (xhci.subsystem, xhci.driver) == ("pci", "xhci_hcd")  # from the L: links
    # The escapes mean what umockdev itself makes of them (GLib's g_strcompress).
    import gi

    gi.require_version("UMockdev", "1.0")
    from gi.repository import UMockdev

    testbed = UMockdev.Testbed.new()
    # (umockdev itself insists on E: SUBSYSTEM, so the hub's record alone.)
    assert testbed.add_from_string(UMOCKDEV.split("\n\n", maxsplit=1)[0] + "\n")
    written = Path(testbed.get_sys_dir(), hub.devpath.lstrip("/"), "manufacturer").read_text()
    assert hub.attributes["manufacturer"] == written.rstrip("\n") == "Lenovo\\Dock\tAA"


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("P: /devices/a\nX: y=z\n", 2, "unknown line type `X:`"),
        ("P: /devices/a\nH: x=zz\n", 2, "not hexadecimal"),
        ("A: x=1\n", 1, "must start with a `P: /devices/…` line"),
        ("P: /devices/a\nA: novalue\n", 2, "expected KEY=VALUE"),
    ],
)
def test_umockdev_errors_name_file_and_line(text: str, line: int, what: str) -> None:
    with pytest.raises(DumpError) as info:
        parse_umockdev(text, "rec.umockdev")
    assert str(info.value).startswith(f"rec.umockdev:{line}: ") and what in str(info.value)
    assert "umockdev-record" in str(info.value)


# --- ip -j link -----------------------------------------------------------------------------


def test_ip_link_json_of_a_real_namespace(netns: str, tmp_path: Path) -> None:
    ip_netns(netns, "link", "add", "lab0", "type", "veth", "peer", "name", "peer0")
    ip_netns(netns, "link", "set", "lab0", "address", "02:00:00:AA:BB:01")
    ip_netns(netns, "link", "set", "peer0", "up")
    ip_netns(netns, "link", "set", "lab0", "up")
    out = tmp_path / "links.json"
    with out.open("w") as f:
        subprocess.run(["ip", "-n", netns, "-j", "-d", "link"], stdout=f, check=True)
    links = {link.ifname: link for link in read_ip_link_json(out)}
    assert set(links) == {"lo", "lab0", "peer0"}
    lab = links["lab0"]
    assert (lab.kind, lab.mac, lab.operstate, lab.carrier) == (
        "veth",
        "02:00:00:aa:bb:01",
        OperState.UP,
        True,
    )
    # lo of a new namespace is down: no LOWER_UP, so no carrier (as the live source says).
    assert (links["lo"].kind, links["lo"].operstate, links["lo"].carrier) == (
        None,
        OperState.DOWN,
        False,
    )


def test_ip_addr_json_carries_the_usable_addresses(netns: str, tmp_path: Path) -> None:
    from runtime_modules._netlink_source import enumerate_links

    ip_netns(netns, "link", "add", "lab0", "type", "veth", "peer", "name", "peer0")
    ip_netns(netns, "link", "set", "peer0", "up")
    ip_netns(netns, "link", "set", "lab0", "up")
    ip_netns(netns, "addr", "add", "10.20.0.5/16", "dev", "lab0")
    ip_netns(netns, "addr", "add", "fd00:7::5/64", "dev", "lab0", "nodad")
    ip_netns(netns, "addr", "add", "fd00:8::5/64", "dev", "peer0")  # tentative for a second
    ip_netns(netns, "addr", "add", "10.0.0.1", "peer", "10.0.0.2", "dev", "peer0")
    out = tmp_path / "addr.json"
    with out.open("w") as f:
        subprocess.run(["ip", "-n", netns, "-j", "-d", "addr"], stdout=f, check=True)
    live = {link.ifname: link.addresses for link in enumerate_links(netns, addresses=True)}
    links = {link.ifname: link for link in read_ip_link_json(out)}
    assert {"10.20.0.5/16", "fd00:7::5/64"} <= links["lab0"].addresses
    # Tentative counts, as live; a point-to-point address is written as `ip` writes it.
    assert {"fd00:8::5/64", "10.0.0.1 peer 10.0.0.2/32"} <= links["peer0"].addresses
    # The recording reads as the live source sees the same moment.
    assert {name: link.addresses for name, link in links.items()} == live
    assert links["lab0"].kind == "veth" and links["lab0"].operstate is OperState.UP


def test_a_recording_reads_as_the_live_source_sees_the_same_links(
    netns: str, tmp_path: Path
) -> None:
    from runtime_modules._netlink_source import enumerate_links

    ip_netns(netns, "link", "add", "br0", "type", "bridge")
    ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    ip_netns(netns, "link", "add", "vc", "type", "veth", "peer", "name", "vd")
    ip_netns(netns, "link", "set", "va", "master", "br0", "up")
    ip_netns(netns, "link", "set", "vb", "up")
    ip_netns(netns, "link", "set", "br0", "up")
    ip_netns(netns, "link", "set", "vc", "up")  # its peer down: up, no carrier
    out = tmp_path / "links.json"
    with out.open("w") as f:
        subprocess.run(["ip", "-n", netns, "-j", "-d", "link"], stdout=f, check=True)
    recorded = {link.ifname: link for link in read_ip_link_json(out)}
    live = {link.ifname: link for link in enumerate_links(netns)}  # lo and vd stay down
    assert recorded == live
    assert {n: (link.carrier, link.kind) for n, link in live.items() if n != "br0"} == {
        "lo": (False, None),
        "va": (True, "veth"),
        "vb": (True, "veth"),
        "vc": (False, "veth"),
        "vd": (False, "veth"),
    }


def test_ip_link_down_and_errors() -> None:
    down = {"ifindex": 4, "ifname": "eth0", "flags": ["BROADCAST"], "operstate": "DOWN"}
    (link,) = parse_ip_link_json(json.dumps([down]), "l.json")
    assert (link.operstate, link.carrier, link.kind) == (OperState.DOWN, False, None)
    for text, what in [
        ("[\n{", "l.json:2: not valid JSON"),
        ('{"ifindex": 1}', "must be a JSON list"),
        ('[{"ifname": "x"}]', "entry 1: `ifindex`"),
        ('[{"ifindex": 1, "ifname": ""}]', "entry 1: `ifname`"),
        ("[3]", "entry 1: must be an object"),
        ('[{"ifindex": 1, "ifname": "x", "addr_info": 3}]', "entry 1 (x): `addr_info`"),
        (
            '[{"ifindex": 1, "ifname": "x", "addr_info": [{"family": "inet", "local": "1.2.3"}]}]',
            "'1.2.3'/None is not an IP address with a prefix; make one with `ip -j -d addr",
        ),
    ]:
        with pytest.raises(DumpError) as info:
            parse_ip_link_json(text, "l.json")
        assert what in str(info.value) and re.search(r"ip -j -d (link|addr)", str(info.value))


def test_world_from_files_merges_one_machine(
    tmp_path: Path, recording_paths: dict[str, Path]
) -> None:
    extra = tmp_path / "egpu.umockdev"
    extra.write_text(
        "P: /devices/pci0000:00/0000:00:1c.0/0000:05:00.0\nE: SUBSYSTEM=pci\n"
        "E: PCI_ID=10DE:2484\nE: PCI_CLASS=30000\n"
    )
    links = tmp_path / "links.json"
    links.write_text(json.dumps([{"ifindex": 1, "ifname": "lo"}]))
    world = world_from_files(
        udev_dbs=[recording_paths["dell-edge"]], umockdevs=[extra], links=[links]
    )
    # The dump lists some i2c adapters twice (bus and class); a later record replaces one.
    recorded = {d.devpath for d in read_udev_db(recording_paths["dell-edge"])}
    assert len(world.devices) == len(recorded) + 1
    assert world.links[1].ifname == "lo"
    assert world_from_files().devices == {}


def test_records_addresses_tells_link_from_addr_output(tmp_path: Path) -> None:
    from runtime_modules._dumps import records_addresses

    cases = {
        "link": [{"ifindex": 1, "ifname": "lo"}],  # `ip -j link`: no addresses recorded
        "addr": [{"ifindex": 1, "ifname": "lo", "addr_info": []}],  # `ip -j addr`, none there
        "garbage": "not json",  # reading it says what is wrong: no second, misleading warning
    }
    found = {}
    for name, data in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        found[name] = records_addresses(path)
    assert found == {"link": False, "addr": True, "garbage": True}
