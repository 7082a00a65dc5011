"""udev/90-runtime-modules.rules, run by real udev.

* In the running systemd-udevd: the rules are installed under /run/udev/rules.d, a veth pair is
  created, and both the udev database (`udevadm info`) and a libudev monitor filtered by our tag
  (pyudev) see the properties; the remove events carry them too.
* Display controllers and Thunderbolt routers cannot be plugged in here, so `udevadm test` runs
  the rules against devices that umockdev synthesizes: from the real machine recordings in
  ../shared/fixtures/udev-db (their P:/E: records, ancestors included) and a few made up for
  what the recordings lack (a dock behind a host router, other vendors, other buses). It runs
  in a private mount namespace with tmpfs over /run/udev/data and /run/udev/tags, and our rules
  bound over /etc/udev/rules.d, so the real udev database and rules stay untouched.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.system import REPO, is_root

RULES = REPO / "udev" / "90-runtime-modules.rules"
TAG = "runtime-modules"

pytestmark = pytest.mark.root


# --- The running udevd ------------------------------------------------------------------------


@pytest.fixture
def installed_rules(udevd: None) -> Iterator[Path]:
    """Our rules in the running udevd, under a name of this test's own (others may run theirs)."""
    if not is_root():
        pytest.skip("installing udev rules needs root")
    target = Path("/run/udev/rules.d") / f"90-runtime-modules-test-{uuid.uuid4().hex[:8]}.rules"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RULES, target)
    subprocess.run(["udevadm", "control", "--reload"], check=True)
    try:
        yield target
    finally:
        target.unlink(missing_ok=True)
        subprocess.run(["udevadm", "control", "--reload"], check=False)


@pytest.fixture
def veth_names() -> Iterator[tuple[str, str]]:
    """Two unique interface names (15 characters at most); the pair is deleted afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    stem = f"rmu{uuid.uuid4().hex[:7]}"
    names = (stem + "a", stem + "b")
    try:
        yield names
    finally:
        subprocess.run(["ip", "link", "del", names[0]], check=False, capture_output=True)


def _properties(syspath: str) -> dict[str, str]:
    out = subprocess.run(
        ["udevadm", "info", "--query=property", syspath],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_a_veth_is_classified_and_tagged_in_the_udev_database(
    installed_rules: Path, veth_names: tuple[str, str]
) -> None:
    a, b = veth_names
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    subprocess.run(["udevadm", "settle", "--timeout=10"], check=True)
    for name in (a, b):
        props = _properties(f"/sys/class/net/{name}")
        assert props["ID_NET_DRIVER"] == "veth"  # from udev's net_setup_link, before our file
        assert props["RUNTIME_MODULES_CLASS"] == "net"
        assert props["RUNTIME_MODULES_NET_BUS"] == "virtual"
        assert TAG in props["TAGS"].strip(":").split(":")


def _receive(monitor: Any, names: set[str], action: str, timeout: float) -> dict[str, Any]:
    """Events for ``names`` with ``action`` from a started pyudev monitor, by interface name."""
    got: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while set(got) != names and time.monotonic() < deadline:
        device = monitor.poll(timeout=max(0.0, deadline - time.monotonic()))
        if device is None:
            break
        if device.action == action and device.sys_name in names:
            got[device.sys_name] = device
    return got


def test_a_monitor_filtered_by_our_tag_receives_the_real_uevents(
    installed_rules: Path, veth_names: tuple[str, str]
) -> None:
    pyudev = pytest.importorskip("pyudev")
    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context, source="udev")
    monitor.filter_by_tag(TAG)
    monitor.start()
    a, b = veth_names
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    added = _receive(monitor, {a, b}, "add", timeout=10)
    assert set(added) == {a, b}, "the tag-filtered monitor did not receive both veth uevents"
    for device in added.values():
        assert device.properties["RUNTIME_MODULES_CLASS"] == "net"
        assert device.properties["RUNTIME_MODULES_NET_BUS"] == "virtual"
        assert device.properties["ID_NET_DRIVER"] == "veth"
        assert TAG in device.tags

    # Removal: sysfs is gone, and the event carries what the database held.
    subprocess.run(["ip", "link", "del", a], check=True)
    removed = _receive(monitor, {a, b}, "remove", timeout=10)
    assert set(removed) == {a, b}
    for device in removed.values():
        assert device.properties["RUNTIME_MODULES_CLASS"] == "net"
        assert device.properties["RUNTIME_MODULES_NET_BUS"] == "virtual"


def test_the_tag_filter_lets_nothing_else_through(installed_rules: Path) -> None:
    """The monitor of the test above would pass anything if the filter did not apply."""
    pyudev = pytest.importorskip("pyudev")
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
    monitor.filter_by_tag("runtime-modules-no-such-tag")
    monitor.start()
    stem = f"rmn{uuid.uuid4().hex[:7]}"
    subprocess.run(
        ["ip", "link", "add", stem + "a", "type", "veth", "peer", "name", stem + "b"], check=True
    )
    try:
        r, _, _ = select.select([monitor], [], [], 1.0)
        assert not r, "an event without the tag passed the filter"
    finally:
        subprocess.run(["ip", "link", "del", stem + "a"], check=False)


# --- udevadm test on synthesized devices ------------------------------------------------------


@pytest.fixture(scope="module")
def udev_test_tools() -> None:
    if not is_root():
        pytest.skip("udevadm test in a private mount namespace needs root")
    for tool in ("umockdev-run", "unshare", "udevadm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not Path("/run/udev/data").is_dir():
        pytest.skip("no /run/udev/data to cover (udev is not installed)")


_SANDBOX = """set -e
mount -t tmpfs runtime-modules-test /run/udev/data
mount -t tmpfs runtime-modules-test /run/udev/tags
mount --bind "$RULES_DIR" /etc/udev/rules.d
exec umockdev-run --device "$DEVICE" -- udevadm test --action=add "$SYSPATH"
"""


def udevadm_test(records: list[str], devpath: str, tmp_path: Path) -> dict[str, str]:
    """The properties udev gives ``devpath`` when the rules run on it (``udevadm test``).

    ``records`` are umockdev device descriptions (P:/E:/A: lines), the device and its ancestors.
    """
    rules = tmp_path / "rules.d"
    rules.mkdir(exist_ok=True)
    shutil.copyfile(RULES, rules / RULES.name)
    device = tmp_path / "device.umockdev"
    device.write_text("\n\n".join(records) + "\n")
    env = dict(os.environ, RULES_DIR=str(rules), DEVICE=str(device), SYSPATH="/sys" + devpath)
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SANDBOX],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    props = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isupper() and key.replace("_", "").isalnum():
            props[key] = value
    assert props.get("DEVPATH") == devpath, proc.stdout[-2000:]
    return props


def ours(props: dict[str, str]) -> dict[str, str]:
    found = {k: v for k, v in props.items() if k.startswith("RUNTIME_MODULES_")}
    if TAG in props.get("TAGS", "").strip(":").split(":"):
        found["tag"] = TAG
    return found


# The real recordings: (file, devpath, what our rules must say about it).
RECORDED = [
    (
        "gpu-nvidia-4x-v100-dgx-station",
        "/devices/pci0000:00/0000:00:02.0/0000:05:00.0/0000:06:08.0/0000:07:00.0",
        {"RUNTIME_MODULES_CLASS": "display", "RUNTIME_MODULES_GPU_VENDOR": "nvidia", "tag": TAG},
    ),
    (
        "gpu-nvidia-nvs310-vga-desktop-hp400g2",
        "/devices/pci0000:00/0000:00:01.0/0000:01:00.0",
        {"RUNTIME_MODULES_CLASS": "display", "RUNTIME_MODULES_GPU_VENDOR": "nvidia", "tag": TAG},
    ),
    (  # the Intel iGPU as "other display controller" (PCI_CLASS=38000)
        "gpu-nvidia-nvs310-vga-desktop-hp400g2",
        "/devices/pci0000:00/0000:00:02.0",
        {"RUNTIME_MODULES_CLASS": "display", "RUNTIME_MODULES_GPU_VENDOR": "intel", "tag": TAG},
    ),
    (
        "dock-usbc-hub-tplink-ue300-usb4-hp835g10",
        "/devices/pci0000:00/0000:00:08.1/0000:c4:00.0",
        {"RUNTIME_MODULES_CLASS": "display", "RUNTIME_MODULES_GPU_VENDOR": "amd", "tag": TAG},
    ),
    (  # the USB4 host router: always there, never a dock
        "dock-usbc-hub-tplink-ue300-usb4-hp835g10",
        "/devices/pci0000:00/0000:00:08.3/0000:c6:00.6/domain1/1-0",
        {"RUNTIME_MODULES_CLASS": "thunderbolt-host", "tag": TAG},
    ),
    (
        "dock-usbc-hub-tplink-ue300-usb4-hp835g10",
        "/devices/pci0000:00/0000:00:08.3/0000:c6:00.5/domain0",
        {},
    ),
    (  # the USB-C hub's network adapter
        "dock-usbc-hub-tplink-ue300-usb4-hp835g10",
        "/devices/pci0000:00/0000:00:08.1/0000:c4:00.3/usb1/1-1/1-1.2/1-1.2:1.0/net/enx54af978e007e",
        {"RUNTIME_MODULES_CLASS": "net", "RUNTIME_MODULES_NET_BUS": "usb", "tag": TAG},
    ),
    (
        "dock-usbc-hub-tplink-ue300-usb4-hp835g10",
        "/devices/pci0000:00/0000:00:02.2/0000:01:00.0/net/wlp1s0",
        {"RUNTIME_MODULES_CLASS": "net", "RUNTIME_MODULES_NET_BUS": "pci", "tag": TAG},
    ),
    (  # the USB 3 controller: PCI, but no display
        "dock-usbc-hub-tplink-ue300-usb4-hp835g10",
        "/devices/pci0000:00/0000:00:08.1/0000:c4:00.3",
        {},
    ),
    (
        "nic-usbhub-dual-rtl8153-dell-edge",
        "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2.5/1-2.5.2/1-2.5.2:1.0/net/enx00e04c6800c8",
        {"RUNTIME_MODULES_CLASS": "net", "RUNTIME_MODULES_NET_BUS": "usb", "tag": TAG},
    ),
    (
        "nic-usbhub-dual-rtl8153-dell-edge",
        "/devices/pci0000:00/0000:00:1f.6/net/eno1",
        {"RUNTIME_MODULES_CLASS": "net", "RUNTIME_MODULES_NET_BUS": "pci", "tag": TAG},
    ),
    (
        "gpu-nvidia-4x-v100-dgx-station",
        "/devices/virtual/net/docker0",
        {"RUNTIME_MODULES_CLASS": "net", "RUNTIME_MODULES_NET_BUS": "virtual", "tag": TAG},
    ),
]

# Kept from a recording: what the kernel and earlier rules put there. Dropped: what udevd keeps
# in its database rather than in a uevent.
_DROP = ("TAGS=", "CURRENT_TAGS=", "USEC_INITIALIZED=", "DEVLINKS=")


def _recorded(udev_db: Path, name: str, devpath: str) -> list[str]:
    """umockdev records for ``devpath`` and its ancestors from an export-db dump."""
    text = (udev_db / f"{name}.udevdb.txt").read_text()
    wanted = {}
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        path = next((ln[3:] for ln in lines if ln.startswith("P: ")), None)
        if path is None or not (path == devpath or devpath.startswith(path + "/")):
            continue
        env = [ln for ln in lines if ln.startswith("E: ") and not ln[3:].startswith(_DROP)]
        wanted[path] = "\n".join([f"P: {path}", *env])
    assert devpath in wanted, f"{devpath} is not in {name}"
    return [wanted[p] for p in sorted(wanted, key=len, reverse=True)]


@pytest.mark.umockdev
@pytest.mark.parametrize(
    ("recording", "devpath", "expected"),
    RECORDED,
    ids=[f"{r.split('-')[0]}-{d.rsplit('/', 1)[-1]}" for r, d, _ in RECORDED],
)
@pytest.mark.usefixtures("udev_test_tools")
def test_recorded_devices_are_classified(
    udev_db: Path,
    tmp_path: Path,
    recording: str,
    devpath: str,
    expected: dict[str, str],
) -> None:
    records = _recorded(udev_db, recording, devpath)
    assert ours(udevadm_test(records, devpath, tmp_path)) == expected


TB = "/devices/pci0000:00/0000:00:0d.2/domain0"
TB_RECORDS = [
    f"P: {TB}\nE: SUBSYSTEM=thunderbolt\nE: DEVTYPE=thunderbolt_domain",
    f"P: {TB}/0-0\nE: SUBSYSTEM=thunderbolt\nE: DEVTYPE=thunderbolt_device\nA: vendor_name=Intel",
    f"P: {TB}/0-0/0-1\nE: SUBSYSTEM=thunderbolt\nE: DEVTYPE=thunderbolt_device\n"
    "A: vendor_name=Lenovo\nA: device_name=ThinkPad Thunderbolt 3 Dock",
    f"P: {TB}/0-0/0-1/0-301\nE: SUBSYSTEM=thunderbolt\nE: DEVTYPE=thunderbolt_device\n"
    "A: vendor_name=CalDigit, Inc.\nA: device_name=TS3 Plus",
    f"P: {TB}/0-0/0-1.1\nE: SUBSYSTEM=thunderbolt\nE: DEVTYPE=thunderbolt_xdomain",
    "P: /devices/pci0000:00/0000:00:0d.2\nE: SUBSYSTEM=pci\nE: PCI_CLASS=C0340\n"
    "E: PCI_ID=8086:9A1B",
]


def _ancestors_first(devpath: str, records: list[str]) -> list[str]:
    mine = [r for r in records if devpath.startswith(r.split("\n", 1)[0][3:])]
    return sorted(mine, key=len, reverse=True)


@pytest.mark.umockdev
@pytest.mark.parametrize(
    ("devpath", "expected"),
    [
        (
            f"{TB}/0-0/0-1",
            {
                "RUNTIME_MODULES_CLASS": "thunderbolt-peripheral",
                "RUNTIME_MODULES_TB_VENDOR": "Lenovo",
                "RUNTIME_MODULES_TB_DEVICE": "ThinkPad Thunderbolt 3 Dock",
                "tag": TAG,
            },
        ),
        (  # daisy-chained behind the dock
            f"{TB}/0-0/0-1/0-301",
            {
                "RUNTIME_MODULES_CLASS": "thunderbolt-peripheral",
                "RUNTIME_MODULES_TB_VENDOR": "CalDigit, Inc.",
                "RUNTIME_MODULES_TB_DEVICE": "TS3 Plus",
                "tag": TAG,
            },
        ),
        (f"{TB}/0-0", {"RUNTIME_MODULES_CLASS": "thunderbolt-host", "tag": TAG}),
        (f"{TB}/0-0/0-1.1", {}),  # another computer (XDomain), not a dock
    ],
    ids=["dock", "daisy-chain", "host-router", "xdomain"],
)
def test_thunderbolt_routers(
    udev_test_tools: None, tmp_path: Path, devpath: str, expected: dict[str, str]
) -> None:
    records = _ancestors_first(devpath, TB_RECORDS)
    assert ours(udevadm_test(records, devpath, tmp_path)) == expected


@pytest.mark.umockdev
@pytest.mark.parametrize(
    ("pci_id", "pci_class", "expected"),
    [
        ("10DE:2684", "30000", {"RUNTIME_MODULES_GPU_VENDOR": "nvidia"}),
        ("10DE:1DB6", "30200", {"RUNTIME_MODULES_GPU_VENDOR": "nvidia"}),  # 3D controller
        ("1002:744C", "30000", {"RUNTIME_MODULES_GPU_VENDOR": "amd"}),
        ("8086:A7A0", "30000", {"RUNTIME_MODULES_GPU_VENDOR": "intel"}),
        ("1234:1111", "30000", {"RUNTIME_MODULES_GPU_VENDOR": "other"}),  # QEMU standard VGA
        ("10DE:22BC", "40300", None),  # the GPU's HD-audio function: not a display
        ("10DE:1AD8", "C0330", None),  # its USB controller
    ],
)
def test_display_controllers_by_class_and_vendor(
    udev_test_tools: None,
    tmp_path: Path,
    pci_id: str,
    pci_class: str,
    expected: dict[str, str] | None,
) -> None:
    devpath = "/devices/pci0000:00/0000:00:01.0/0000:01:00.0"
    records = [
        f"P: {devpath}\nE: SUBSYSTEM=pci\nE: PCI_CLASS={pci_class}\nE: PCI_ID={pci_id}",
        "P: /devices/pci0000:00/0000:00:01.0\nE: SUBSYSTEM=pci\nE: PCI_CLASS=60400",
    ]
    got = ours(udevadm_test(records, devpath, tmp_path))
    if expected is None:
        assert got == {}
    else:
        assert got == {"RUNTIME_MODULES_CLASS": "display", "tag": TAG, **expected}


@pytest.mark.umockdev
def test_a_network_adapter_on_another_bus_is_other(udev_test_tools: None, tmp_path: Path) -> None:
    devpath = "/devices/platform/soc/fe300000.mmc/mmc1/mmc1:0001/mmc1:0001:1/net/wlan0"
    records = [
        f"P: {devpath}\nE: SUBSYSTEM=net\nE: INTERFACE=wlan0\nE: DEVTYPE=wlan",
        "P: /devices/platform/soc/fe300000.mmc/mmc1/mmc1:0001/mmc1:0001:1\nE: SUBSYSTEM=sdio",
        "P: /devices/platform/soc/fe300000.mmc\nE: SUBSYSTEM=platform",
    ]
    props = udevadm_test(records, devpath, tmp_path)
    assert ours(props) == {
        "RUNTIME_MODULES_CLASS": "net",
        "RUNTIME_MODULES_NET_BUS": "other",
        "tag": TAG,
    }


# A Thunderbolt dock's PCIe NIC (its PCI device hangs below the tunnel's hotplug bridges) and the
# onboard NIC both have ID_BUS=pci. The kernel marks PCI devices below an external-facing port
# "removable" (drivers/pci/probe.c: pci_set_removable), as the USB core does for devices on a
# removable port; the rules read that from the ancestors.
_TB = "/devices/pci0000:00/0000:00:07.0/0000:20:00.0/0000:21:01.0/0000:22:00.0"


@pytest.mark.umockdev
@pytest.mark.parametrize(
    ("removable", "external"),
    [("removable", True), ("fixed", False), (None, False)],
    ids=["dock", "onboard", "no-attribute"],
)
def test_a_pci_nic_behind_an_external_port_is_external(
    udev_test_tools: None, tmp_path: Path, removable: str | None, external: bool
) -> None:
    devpath = f"{_TB}/net/enp34s0"
    attribute = f"\nA: removable={removable}" if removable is not None else ""
    records = [
        f"P: {devpath}\nE: SUBSYSTEM=net\nE: INTERFACE=enp34s0\nE: ID_BUS=pci",
        f"P: {_TB}\nE: SUBSYSTEM=pci\nE: DRIVER=igc{attribute}",
        "P: /devices/pci0000:00/0000:00:07.0/0000:20:00.0/0000:21:01.0\nE: SUBSYSTEM=pci",
        "P: /devices/pci0000:00/0000:00:07.0/0000:20:00.0\nE: SUBSYSTEM=pci",
        "P: /devices/pci0000:00/0000:00:07.0\nE: SUBSYSTEM=pci",
    ]
    expected = {"RUNTIME_MODULES_CLASS": "net", "RUNTIME_MODULES_NET_BUS": "pci", "tag": TAG}
    if external:
        expected["RUNTIME_MODULES_NET_EXTERNAL"] = "1"
    assert ours(udevadm_test(records, devpath, tmp_path)) == expected


@pytest.mark.umockdev
def test_a_usb_nic_on_a_removable_port_is_external(udev_test_tools: None, tmp_path: Path) -> None:
    usb = "/devices/pci0000:00/0000:00:14.0/usb1/1-2"
    devpath = f"{usb}/1-2:1.0/net/enx00e04c6800c8"
    records = [
        f"P: {devpath}\nE: SUBSYSTEM=net\nE: INTERFACE=enx00e04c6800c8\nE: ID_BUS=usb",
        f"P: {usb}/1-2:1.0\nE: SUBSYSTEM=usb\nE: DEVTYPE=usb_interface",
        f"P: {usb}\nE: SUBSYSTEM=usb\nE: DEVTYPE=usb_device\nA: removable=removable",
        "P: /devices/pci0000:00/0000:00:14.0\nE: SUBSYSTEM=pci\nA: removable=fixed",
    ]
    assert ours(udevadm_test(records, devpath, tmp_path)) == {
        "RUNTIME_MODULES_CLASS": "net",
        "RUNTIME_MODULES_NET_BUS": "usb",
        "RUNTIME_MODULES_NET_EXTERNAL": "1",
        "tag": TAG,
    }
