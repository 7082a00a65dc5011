"""Benchmark: rule evaluation on a large machine, from scratch and change by change.

    python bench/bench_evaluate.py [--rules 200] [--devices 5000] [--links 100] [--events 20000]

Builds a synthetic but realistic world (a PCI tree with GPUs and NICs, USB controllers with hubs,
docks and their network adapters, Thunderbolt domains, block, input, ACPI and platform devices,
and links), a rule set in the shape of the examples in rules/ (device tables with property globs,
``parent`` conditions, link conditions, any/all/not), then reports:

- the time of one full ``evaluate`` (target: 200 rules x 5,000 devices ≤ 1 s, issue 7);
- the time per ``IncrementalEvaluator.update`` over a stream of uevent-like changes (docks
  plugged and unplugged, drivers binding, links flapping; target ≥ 20,000 events/s, issue 4).

It checks at the end that the incremental result equals a full evaluation. No timing is ever
asserted: the numbers are for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime_modules._dumps import read_udev_db
from runtime_modules._evaluate import IncrementalEvaluator, evaluate
from runtime_modules._rules import RuleSet, parse_rules
from runtime_modules._world import (
    Device,
    DeviceRemoved,
    DeviceUpsert,
    Link,
    LinkUpsert,
    OperState,
    World,
    WorldChange,
)

PCI_VENDORS = ["10DE", "1002", "8086", "14E4", "10EC", "1B4B", "144D", "1AF4"]
PCI_CLASSES = ["30000", "30200", "38000", "20000", "10802", "C0330", "60400", "40300"]
USB_VENDORS = ["0bda", "0424", "214b", "17ef", "2357", "046d", "1d6b", "8087", "05ac", "0b95"]


def _pci(path: str, rng: random.Random) -> Device:
    vendor = rng.choice(PCI_VENDORS)
    return Device(
        devpath=path,
        subsystem="pci",
        driver=rng.choice([None, "nvidia", "amdgpu", "i915", "xhci_hcd", "igb", "nvme"]),
        properties={
            "PCI_ID": f"{vendor}:{rng.randrange(0x10000):04X}",
            "PCI_CLASS": rng.choice(PCI_CLASSES),
            "PCI_SUBSYS_ID": f"{rng.choice(PCI_VENDORS)}:{rng.randrange(0x10000):04X}",
            "SUBSYSTEM": "pci",
        },
    )


def dock(root: str, port: int, rng: random.Random) -> list[Device]:
    """A USB-C dock below a root hub: hub, network adapter (USB device, interface, net)."""
    hub = f"{root}/{root.rsplit('usb', 1)[-1]}-{port}"
    hub_name = hub.rsplit("/", 1)[-1]
    nic = f"{hub}/{hub_name}.2"
    iface = f"{nic}/{hub_name}.2:1.0"
    net = f"{iface}/net/enx{rng.randrange(1 << 48):012x}"
    return [
        Device(
            devpath=hub,
            subsystem="usb",
            devtype="usb_device",
            driver="usb",
            properties={"ID_VENDOR_ID": rng.choice(USB_VENDORS), "TYPE": "9/0/1"},
            tags=frozenset({"seat"}),
        ),
        Device(
            devpath=nic,
            subsystem="usb",
            devtype="usb_device",
            driver="r8152-cfgselector",
            properties={"ID_VENDOR_ID": "0bda", "ID_MODEL_ID": "8153", "TYPE": "0/0/0"},
        ),
        Device(devpath=iface, subsystem="usb", devtype="usb_interface", driver="r8152"),
        Device(
            devpath=net,
            subsystem="net",
            properties={"ID_BUS": "usb", "ID_NET_DRIVER": "r8152", "INTERFACE": net[-15:]},
        ),
    ]


def make_world(n_devices: int, n_links: int, seed: int = 1) -> World:
    rng = random.Random(seed)
    devices: list[Device] = []
    bridges = [f"/devices/pci0000:00/0000:00:{i:02x}.0" for i in range(32)]
    for b in bridges:
        devices.append(_pci(b, rng))
    roots = []
    for i, b in enumerate(bridges[:8]):
        root = f"{b}/usb{i + 1}"
        roots.append(root)
        devices.append(Device(devpath=root, subsystem="usb", devtype="usb_device", driver="usb"))
    for j in range(4):
        domain = f"{bridges[8 + j]}/domain{j}"
        for path, devtype in ((domain, "domain"), (f"{domain}/{j}-0", "device")):
            devices.append(
                Device(devpath=path, subsystem="thunderbolt", devtype=f"thunderbolt_{devtype}")
            )
    port = 1
    kinds = ["acpi", "platform", "memory", "tty", "input", "block", "pci", "usb", "net", "drm"]
    weights = [25, 12, 10, 8, 8, 8, 10, 12, 3, 4]
    while len(devices) < n_devices:
        kind = rng.choices(kinds, weights)[0]
        n = len(devices)
        if kind == "usb":
            devices.extend(dock(rng.choice(roots), port, rng))
            port += 1
        elif kind == "pci":
            # Bus numbers from the running count keep every devpath distinct.
            devices.append(_pci(f"{rng.choice(bridges)}/0000:{n >> 3:04x}:00.{n % 8}", rng))
        elif kind == "net":
            path = f"{rng.choice(bridges)}/net/enp{n}s0"
            devices.append(Device(devpath=path, subsystem="net", properties={"ID_BUS": "pci"}))
        elif kind == "input":
            path = f"/devices/platform/i8042/serio{n}/input/input{n}"
            props = {"ID_INPUT": "1", rng.choice(["ID_INPUT_KEYBOARD", "ID_INPUT_MOUSE"]): "1"}
            devices.append(
                Device(devpath=path, subsystem="input", properties=props, tags=frozenset({"seat"}))
            )
        elif kind == "block":
            props = {"DEVTYPE": "disk", "ID_FS_TYPE": rng.choice(["ext4", "vfat", "btrfs", ""])}
            path = f"/devices/virtual/block/loop{n}"
            devices.append(Device(devpath=path, subsystem="block", properties=props))
        else:
            devices.append(Device(devpath=f"/devices/{kind}/{kind}{n}", subsystem=kind))
    links = [
        Link(
            index=i + 1,
            ifname="lo" if i == 0 else f"{rng.choice(['enp', 'wlp', 'veth', 'lab'])}{i}",
            kind=rng.choice([None, None, "veth", "bridge", "wireguard"]),
            operstate=rng.choice([OperState.UP, OperState.DOWN, OperState.UNKNOWN]),
            carrier=rng.choice([True, False, None]),
            mac=f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}",
        )
        for i in range(n_links)
    ]
    return World.of(devices[:n_devices], links)


# Rule templates in the shape of rules/*.toml; {i} makes each rule distinct.
TEMPLATES = [
    """[[rule]]
name = "gpu-{i}"
modules = ["m{m}"]
[rule.when.device]
subsystem = "pci"
properties = {{ PCI_ID = "{vendor}:*", PCI_CLASS = ["30000", "30200", "38000"] }}
""",
    """[[rule]]
name = "dock-{i}"
modules = ["m{m}"]
[rule.when.device]
subsystem = "net"
properties = {{ ID_BUS = "usb" }}
[rule.when.device.parent]
subsystem = "usb"
devtype = "usb_device"
sysname = "*-*"
properties = {{ TYPE = "9/*", ID_VENDOR_ID = "{usb}" }}
""",
    """[[rule]]
name = "tb-{i}"
modules = ["m{m}"]
[rule.when.device]
subsystem = "thunderbolt"
devtype = "thunderbolt_device"
sysname = "*-[1-9a-f]*"
""",
    """[[rule]]
name = "link-{i}"
modules = ["m{m}"]
[rule.when.link]
ifname = "{prefix}{n}*"
operstate = "up"
""",
    """[[rule]]
name = "usb-{i}"
modules = ["m{m}"]
[rule.when.device]
subsystem = "usb"
devtype = "usb_device"
properties = {{ ID_VENDOR_ID = "{usb}", ID_MODEL_ID = "8153" }}
""",
    """[[rule]]
name = "any-{i}"
modules = ["m{m}"]
[[rule.when.any]]
device = {{ subsystem = "pci", driver = "{driver}" }}
[[rule.when.any]]
link = {{ kind = "wireguard", carrier = true }}
""",
    """[[rule]]
name = "all-{i}"
modules = ["m{m}"]
[[rule.when.all]]
device = {{ subsystem = "input", tags = ["seat"], properties = {{ ID_INPUT_KEYBOARD = "1" }} }}
[[rule.when.all]]
not = {{ device = {{ subsystem = "block", properties = {{ ID_FS_TYPE = "{fs}" }} }} }}
""",
]


def make_rules(n_rules: int, seed: int = 1) -> RuleSet:
    rng = random.Random(seed)
    parts = []
    for i in range(n_rules):
        parts.append(
            TEMPLATES[i % len(TEMPLATES)].format(
                i=i,
                m=i % 20,
                vendor=rng.choice(PCI_VENDORS),
                usb=rng.choice(USB_VENDORS),
                prefix=rng.choice(["enp", "wlp", "veth", "lab"]),
                n=rng.randrange(10),
                driver=rng.choice(["nvidia", "amdgpu", "vfio-pci"]),
                fs=rng.choice(["btrfs", "zfs", "ntfs"]),
            )
        )
    return parse_rules("\n".join(parts), "bench.toml")


def make_changes(world: World, n: int, seed: int = 2) -> list[WorldChange]:
    """uevent-like changes: docks plugged and unplugged, GPU drivers binding, links flapping."""
    rng = random.Random(seed)
    roots = sorted(p for p in world.devices if p.rsplit("/", 1)[-1].startswith("usb"))
    pcis = sorted(p for p, d in world.devices.items() if d.subsystem == "pci")
    changes: list[WorldChange] = []
    plugged: list[list[Device]] = []
    port = 10_000
    while len(changes) < n:
        r = rng.random()
        if r < 0.45:  # a dock arrives: one uevent per device, parents first
            devices = dock(rng.choice(roots), port, rng)
            port += 1
            plugged.append(devices)
            changes.extend(DeviceUpsert(d) for d in devices)
        elif r < 0.75 and plugged:  # a dock leaves: children first, as the kernel sends them
            devices = plugged.pop(rng.randrange(len(plugged)))
            changes.extend(DeviceRemoved(d.devpath) for d in reversed(devices))
        elif r < 0.9:  # a driver binds or unbinds
            d = world.devices[rng.choice(pcis)]
            driver = rng.choice([None, "nvidia", "vfio-pci"])
            changes.append(
                DeviceUpsert(
                    Device(
                        devpath=d.devpath,
                        subsystem=d.subsystem,
                        driver=driver,
                        properties=d.properties,
                    )
                )
            )
        else:  # a link flaps
            link = world.links[rng.randrange(1, len(world.links) + 1)]
            state = rng.choice([OperState.UP, OperState.DOWN])
            changes.append(
                LinkUpsert(
                    Link(
                        index=link.index,
                        ifname=link.ifname,
                        kind=link.kind,
                        operstate=state,
                        carrier=state is OperState.UP,
                        mac=link.mac,
                    )
                )
            )
    return changes[:n]


def run(
    n_rules: int,
    n_devices: int,
    n_links: int,
    n_events: int,
    *,
    repeat: int = 5,
    recording: Path | None = None,
) -> dict[str, float]:
    rules = make_rules(n_rules)
    world = make_world(n_devices, n_links)
    if recording is not None:  # a real machine's devices instead of the synthetic ones
        world = World.of(read_udev_db(recording), list(world.links.values()))
    full = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        evaluate(rules, world)
        full.append(time.perf_counter() - t0)
    inc = IncrementalEvaluator(rules)
    t0 = time.perf_counter()
    inc.reset(world)
    reset = time.perf_counter() - t0
    changes = make_changes(world, n_events)
    live = world.copy()
    elapsed = applying = 0.0
    for change in changes:
        t0 = time.perf_counter()
        live.apply(change)
        t1 = time.perf_counter()
        inc.update(live, change)
        elapsed += time.perf_counter() - t1
        applying += t1 - t0
    if inc.results() != evaluate(rules, live):
        raise SystemExit("BUG: the incremental result differs from a full evaluation")
    return {
        "full_s": statistics.median(full),
        "reset_s": reset,
        "update_us": elapsed / len(changes) * 1e6,
        "events_per_s": len(changes) / elapsed,
        "apply_us": applying / len(changes) * 1e6,
        "active_rules": sum(1 for r in inc.results().values() if r.holds),
        "devices": len(world.devices),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", type=int, default=200)
    p.add_argument("--devices", type=int, default=5000)
    p.add_argument("--links", type=int, default=100)
    p.add_argument("--events", type=int, default=20000)
    p.add_argument(
        "--udev-db",
        type=Path,
        metavar="FILE",
        help="evaluate on this `udevadm info --export-db` dump instead of a synthetic world "
        "(e.g. ../shared/fixtures/udev-db/gpu-nvidia-4x-v100-dgx-station.udevdb.txt)",
    )
    args = p.parse_args(argv)
    r = run(args.rules, args.devices, args.links, args.events, recording=args.udev_db)
    where = f" from {args.udev_db}" if args.udev_db else ""
    print(f"world: {r['devices']:.0f} devices{where}, {args.links} links; {args.rules} rules")
    print(f"full evaluation:    {r['full_s'] * 1000:8.1f} ms (median of 5)")
    print(f"incremental reset:  {r['reset_s'] * 1000:8.1f} ms (coldplug)")
    print(f"incremental update: {r['update_us']:8.1f} µs per change ({r['events_per_s']:,.0f}/s)")
    print(f"World.apply:        {r['apply_us']:8.1f} µs per change (not counted above)")
    print(f"rules holding at the end: {r['active_rules']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
