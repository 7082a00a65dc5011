"""Replay: captures made by the real tools, through the real evaluator and reconciler."""

# The captures below are verbatim tool output, long lines and trailing spaces included.
# ruff: noqa: E501, W291

from __future__ import annotations

import argparse
import io
import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime_modules._dumps import world_from_files
from runtime_modules._errors import DumpError
from runtime_modules._reconciler_events import (
    RuleActivated,
    RuleDeactivated,
    RuleSettling,
    StartApply,
)
from runtime_modules._replay import (
    Decision,
    add_events_option,
    parse_events,
    read_events,
    replay,
    run_events,
    summary,
)
from runtime_modules._rules import RuleSet, load_rules, parse_rules
from runtime_modules._world import (
    AddressAdded,
    AddressRemoved,
    DeviceMoved,
    DeviceRemoved,
    DeviceUpsert,
    LinkRemoved,
    LinkUpsert,
    OperState,
    World,
)
from tests.fixtures.system import REPO, ip_netns

# Real output of `udevadm monitor --udev --property` (systemd 252) and of iproute2 6.1's
# `ip -ts monitor link`, `ip -t monitor link` and `ip -d -ts monitor link`, cut down.
UDEVADM = """\
monitor will print the received events for:
UDEV - the event which udev sends out after rule processing
KERNEL - the kernel uevent

KERNEL[1079.170000] add      /devices/virtual/net/rmxa (net)
ACTION=add
DEVPATH=/devices/virtual/net/rmxa
SUBSYSTEM=net

UDEV  [1079.179659] add      /devices/virtual/net/rmxa (net)
ACTION=add
DEVPATH=/devices/virtual/net/rmxa
SUBSYSTEM=net
INTERFACE=rmxa
IFINDEX=20
SEQNUM=1290
USEC_INITIALIZED=1079172807
ID_NET_DRIVER=veth
TAGS=:systemd:
CURRENT_TAGS=:systemd:

UDEV  [1080.500000] move     /devices/virtual/net/lab0 (net)
ACTION=move
DEVPATH=/devices/virtual/net/lab0
DEVPATH_OLD=/devices/virtual/net/rmxa
SUBSYSTEM=net
INTERFACE=lab0

UDEV  [1081.198088] remove   /devices/virtual/net/lab0 (net)
ACTION=remove
DEVPATH=/devices/virtual/net/lab0
SUBSYSTEM=net
"""

IP_TS = """\
[2026-11-22T05:03:23.593404] 2: vb@NONE: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN group default 
    link/ether 82:c4:dd:1f:05:07 brd ff:ff:ff:ff:ff:ff
[2026-11-22T05:03:23.597120] 3: va@vb: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP group default 
    link/ether DA:8C:34:66:36:BC brd ff:ff:ff:ff:ff:ff
[2026-11-22T05:03:24.602482] Deleted 3: va@NONE: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN group default 
    link/ether da:8c:34:66:36:bc brd ff:ff:ff:ff:ff:ff
"""

IP_T = """\
Timestamp: Sun Nov 22 05:03:23 2026 593118 usec
2: vb@NONE: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 qdisc noop state LOWERLAYERDOWN group default 
    link/ether 82:c4:dd:1f:05:07 brd ff:ff:ff:ff:ff:ff
Timestamp: Sun Nov 22 05:03:25 2026 93118 usec
2: vb@va: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP group default 
    link/ether 82:c4:dd:1f:05:07 brd ff:ff:ff:ff:ff:ff
"""

IP_D = """\
[2026-11-22T05:03:23.593225] 2: vb@NONE: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN group default 
    link/ether 82:c4:dd:1f:05:07 brd ff:ff:ff:ff:ff:ff promiscuity 0  allmulti 0 minmtu 68 maxmtu 65535 
    veth numtxqueues 2 numrxqueues 2 gso_max_size 65536 gso_max_segs 65535 
[2026-11-22T05:03:23.593300] 1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN group default 
    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00 promiscuity 0  allmulti 0 minmtu 0 maxmtu 0 
    addrgenmode eui64 numtxqueues 1 numrxqueues 1 gso_max_size 65536 gso_max_segs 65535 
"""

# `ip -ts monitor link address` on a veth: an IPv4 address, an IPv6 one first tentative (duplicate
# address detection) then usable, the IPv4 one deleted, a point-to-point one, one that failed DAD.
IP_ADDR = """\
[2026-11-22T07:05:07.905384] 3: va@vb: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP group default 
    link/ether 56:0e:a1:fb:23:81 brd ff:ff:ff:ff:ff:ff
[2026-11-22T07:05:07.906898] 3: va    inet 10.20.0.5/16 scope global va
       valid_lft forever preferred_lft forever
[2026-11-22T07:05:07.908708] 3: va    inet6 fd00:7::5/64 scope global tentative 
       valid_lft forever preferred_lft forever
[2026-11-22T07:05:08.212156] Deleted 3: va    inet 10.20.0.5/16 scope global va
       valid_lft forever preferred_lft forever
[2026-11-22T07:05:09.838627] 3: va    inet6 fd00:7::5/64 scope global 
       valid_lft forever preferred_lft forever
[2026-11-22T07:05:10.000000] 3: va    inet 10.0.0.1 peer 10.0.0.2/32 scope global va
       valid_lft forever preferred_lft forever
[2026-11-22T07:05:11.000000] 3: va    inet6 fd00:9::5/64 scope global dadfailed tentative 
       valid_lft forever preferred_lft forever
"""

LINK_RULES = """
[[rule]]
name = "va-up"
modules = ["virtualization"]
settle = "1s"
linger = "5s"
[rule.when.link]
ifname = "va"
operstate = "up"
"""


def _rules(text: str) -> RuleSet:
    return parse_rules(text, "rules.toml")


# --- parsing ----------------------------------------------------------------------------------


def test_udevadm_blocks_become_changes_and_kernel_blocks_are_skipped() -> None:
    events = parse_events(UDEVADM, "capture")
    assert [(e.time, e.clock) for e in events] == [
        (1079.179659, "udev"),
        (1080.5, "udev"),
        (1081.198088, "udev"),
    ]
    added, moved, removed = (e.change for e in events)
    assert isinstance(added, DeviceUpsert)
    assert added.device.devpath == "/devices/virtual/net/rmxa"
    assert added.device.subsystem == "net"
    assert added.device.tags == {"systemd"}
    assert added.device.properties["ID_NET_DRIVER"] == "veth"
    assert "SEQNUM" not in added.device.properties  # as the live source: event keys dropped
    assert isinstance(moved, DeviceMoved) and moved.old_devpath == "/devices/virtual/net/rmxa"
    assert removed == DeviceRemoved("/devices/virtual/net/lab0")


def test_ip_monitor_lines_become_link_changes() -> None:
    events = parse_events(IP_TS, "capture")
    assert [e.clock for e in events] == ["ip"] * 3
    assert events[1].time - events[0].time == pytest.approx(0.003716, abs=1e-5)
    first, up, deleted = (e.change for e in events)
    assert isinstance(up, LinkUpsert)
    assert up.link.ifname == "va" and up.link.index == 3
    assert up.link.operstate is OperState.UP and up.link.carrier is True
    assert up.link.mac == "da:8c:34:66:36:bc"
    assert isinstance(first, LinkUpsert) and first.link.carrier is False
    assert deleted == LinkRemoved(3)


def test_ip_monitor_address_lines_become_address_changes(tmp_path: Path) -> None:
    events = parse_events(IP_ADDR, "capture")
    assert [e.change for e in events[1:]] == [
        AddressAdded(3, "10.20.0.5/16"),
        AddressAdded(3, "fd00:7::5/64"),  # tentative counts, as live
        AddressRemoved(3, "10.20.0.5/16"),
        AddressAdded(3, "fd00:7::5/64"),  # duplicate detection passed: nothing new
        AddressAdded(3, "10.0.0.1 peer 10.0.0.2/32"),
        AddressRemoved(3, "fd00:9::5/64"),  # duplicate detection failed: unusable
    ]
    assert events[4].time - events[0].time == pytest.approx(1.933243, abs=1e-5)
    rules = _rules(LINK_RULES.replace('ifname = "va"', 'ip = "fd00::/8"').replace('"1s"', '"0.5s"'))
    capture = tmp_path / "addresses.txt"
    capture.write_text(IP_ADDR)
    decisions = replay(capture, rules, World(), applied=frozenset())
    activated = next(d for d in decisions if type(d.action).__name__ == "RuleActivated")
    assert activated.time == pytest.approx(0.003324 + 0.5, abs=1e-5)  # from the first one


def test_ip_monitor_all_is_read_for_its_links_and_addresses() -> None:
    tagged = "".join(
        line if not line.startswith("[2026") else line.replace("] ", "] [ADDR]" if " inet" in
                                                                 line else "] [LINK]", 1)
        for line in IP_ADDR.splitlines(keepends=True)
    )  # fmt: skip
    noise = (
        "[2026-11-22T07:05:07.905000] [NETCONF]inet va forwarding off rp_filter off\n"
        "[2026-11-22T07:05:07.906999] [ROUTE]10.20.0.0/16 dev va proto kernel scope link\n"
    )
    assert "[LINK]3: va@vb" in tagged and "[ADDR]3: va    inet 10.20.0.5/16" in tagged
    assert [e.change for e in parse_events(noise + tagged, "all")] == [
        e.change for e in parse_events(IP_ADDR, "plain")
    ]


def test_a_bridge_port_line_is_not_a_kind() -> None:
    # `ip -d monitor link` of a physical NIC in a bridge: its detail line after link/ether says
    # where it is ("bridge_slave"), not what it is; it has no kind, as netlink says.
    text = (
        "[2026-11-22T05:03:23.593225] 2: enp3s0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 "
        "master br0 state UP group default\n"
        "    link/ether 02:00:00:00:00:01 brd ff:ff:ff:ff:ff:ff promiscuity 1 minmtu 68\n"
        "    bridge_slave state forwarding priority 32 cost 4 hairpin off guard off\n"
    )
    (event,) = parse_events(text, "capture")
    assert isinstance(event.change, LinkUpsert)
    assert (event.change.link.kind, event.change.link.carrier) == (None, True)


def test_ip_dash_t_timestamps_and_dash_d_kinds() -> None:
    t = parse_events(IP_T, "capture")
    assert t[1].time - t[0].time == pytest.approx(1.5)
    d = [e.change for e in parse_events(IP_D, "capture")]
    assert isinstance(d[0], LinkUpsert) and d[0].link.kind == "veth"
    assert isinstance(d[1], LinkUpsert) and d[1].link.kind is None  # "addrgenmode" is no kind


def test_unreadable_captures_are_dump_errors(tmp_path: Path) -> None:
    with pytest.raises(DumpError, match="no udev or link event"):
        empty = tmp_path / "empty.txt"
        empty.write_text("hello\n")
        read_events(empty)
    with pytest.raises(DumpError, match="cannot read"):
        read_events(tmp_path / "missing.txt")
    with pytest.raises(DumpError, match=":1: DEVPATH"):
        parse_events("UDEV  [1.0] add /x (net)\nDEVPATH=relative\n", "capture")
    # Without --property a bind would erase the GPU's properties (and the gaming rule with them).
    headers = "UDEV  [1.0] remove /devices/y (pci)\nUDEV  [2.0] bind /devices/x (pci)\n"
    with pytest.raises(DumpError) as info:
        parse_events(headers, "capture")
    assert str(info.value) == (
        "capture:2: a udev event without its properties; capture with "
        "`udevadm monitor --udev --property > FILE`"
    )


# --- replaying --------------------------------------------------------------------------------


def _kinds(decisions: list[Decision]) -> list[str]:
    return [type(d.action).__name__ for d in decisions]


def test_replay_on_the_virtual_clock(tmp_path: Path) -> None:
    capture = tmp_path / "links.txt"
    capture.write_text(IP_TS)  # va up at +0.004 s, deleted at +1.009 s
    decisions = replay(capture, _rules(LINK_RULES), World(), applied=frozenset())
    assert _kinds(decisions) == [
        "RuleSettling",
        "RuleActivated",
        "ApplyScheduled",
        "RuleLingering",  # deleted 5 ms after it settled: lingering keeps the module wanted
        "StartApply",
        "RuleDeactivated",
        "ApplyScheduled",
        "StartApply",
    ]
    times = [d.time for d in decisions]
    ms = pytest.approx
    assert times[0] == ms(0.003716, abs=1e-5)  # va up, 3.7 ms after the first line
    assert times[1] == ms(1.003716, abs=1e-5)  # settle: 1 s later
    assert times[3] == ms(1.009078, abs=1e-5)  # deleted
    assert times[4] == ms(1.503716, abs=1e-5)  # the reconciler's quiet of 0.5 s after settling
    assert times[5] == ms(6.009078, abs=1e-5)  # linger: 5 s after the delete
    assert str(decisions[4]).endswith("apply #1 would start: {virtualization} (+virtualization)")
    assert "rule va-up holds (va)" in decisions[0].text


def test_replay_from_a_udev_database_snapshot(udev_db: Path, tmp_path: Path) -> None:
    world = world_from_files([udev_db / "gpu-nvidia-nvs310-vga-desktop-hp400g2.udevdb.txt"])
    rules = load_rules([REPO / "rules" / "gaming.toml"])
    gpu = "/devices/pci0000:00/0000:00:01.0/0000:01:00.0"
    capture = tmp_path / "unplug.txt"
    capture.write_text(
        f"UDEV  [500.000000] remove   {gpu} (pci)\nACTION=remove\nDEVPATH={gpu}\n"
        "SUBSYSTEM=pci\n\n"
        f"UDEV  [510.000000] add      {gpu} (pci)\nACTION=add\nDEVPATH={gpu}\nSUBSYSTEM=pci\n"
        "PCI_ID=10DE:107D\nPCI_CLASS=30000\n"
    )
    # Steady start: the GPU is there and gaming applied; pulled for 10 s, under the 30 s linger.
    decisions = replay(capture, rules, world)
    assert summary(decisions).get("StartApply", 0) == 0
    assert _kinds(decisions) == ["RuleLingering", "RuleActivated"]
    assert decisions[0].time == 0.0
    resumed = decisions[1]
    assert isinstance(resumed.action, RuleActivated) and resumed.action.resumed
    assert resumed.time == 10.0
    # From the base system (a reboot): gaming comes up after the 3 s settle and 0.5 s quiet.
    fresh = replay(capture, rules, world, applied=frozenset())
    (start,) = [d for d in fresh if isinstance(d.action, StartApply)]
    assert start.action.target == {"gaming"}


def test_run_events_prints_every_decision(tmp_path: Path) -> None:
    capture = tmp_path / "links.txt"
    capture.write_text(IP_TS)
    parser = argparse.ArgumentParser()
    add_events_option(parser)
    args = parser.parse_args(["--events", str(capture), "--apply-time", "2", "--from-base"])
    out = io.StringIO()
    assert run_events(args, _rules(LINK_RULES), World(), out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"replaying {capture}: 1 rules, 0 devices and 0 links")
    assert "applied: base system" in lines[0]
    assert any("apply #1 would start: {virtualization}" in line for line in lines)
    assert lines[-1] == "2 applies would run"


# --- captures made live with the real tools ---------------------------------------------------


def _capture(argv: list[str], out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # let the monitor subscribe before anything happens
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    time.sleep(0.3)  # let the last events be written
    proc.terminate()
    proc.wait()


@pytest.mark.root
def test_run_events_as_json(tmp_path: Path) -> None:
    capture = tmp_path / "links.txt"
    capture.write_text(IP_TS)
    args = argparse.Namespace(events=[capture], from_base=True, apply_time=0.0, json=True)
    out = io.StringIO()
    assert run_events(args, _rules(LINK_RULES), World(), out=out) == 0
    data = json.loads(out.getvalue())  # JSON only: nothing else on stdout
    assert data["start"] == {"devices": 0, "links": 0, "applied": []}
    assert data["applies"] == 2
    first = data["decisions"][0]
    assert first["action"] == "RuleSettling" and first["rule"] == "va-up"
    assert first["time"] == pytest.approx(0.003716, abs=1e-5) and "va-up" in first["text"]
    assert [d["action"] for d in data["decisions"]].count("StartApply") == 2


def test_replay_of_a_live_ip_monitor_capture(netns: str, tmp_path: Path) -> None:
    capture = tmp_path / "ip.txt"
    monitor = _capture(["ip", "-n", netns, "-ts", "-d", "monitor", "link"], capture)
    try:
        ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip_netns(netns, "link", "set", "va", "up")
        ip_netns(netns, "link", "set", "vb", "up")
        time.sleep(0.4)
        ip_netns(netns, "link", "set", "vb", "down")
    finally:
        _stop(monitor)
    rules = _rules(LINK_RULES.replace('settle = "1s"', 'settle = "0.2s"'))
    decisions = replay(capture, rules, World(), applied=frozenset())
    kinds = _kinds(decisions)
    assert kinds[:4] == ["RuleSettling", "RuleActivated", "ApplyScheduled", "RuleLingering"]
    assert kinds.count("StartApply") == 2  # on, and off again after the linger
    settling = decisions[0]
    assert isinstance(settling.action, RuleSettling)
    assert decisions[1].time - settling.time == pytest.approx(0.2)
    assert decisions[3].time - settling.time >= 0.35  # the test slept 0.4 s before the down


@pytest.mark.root
def test_replay_of_a_live_udevadm_capture(udevd: None, tmp_path: Path) -> None:
    capture = tmp_path / "udev.txt"
    name = f"rmr{uuid.uuid4().hex[:8]}"
    monitor = _capture(
        ["udevadm", "monitor", "--udev", "--property", "--subsystem-match=net"], capture
    )
    try:
        subprocess.run(
            ["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"], check=True
        )
        time.sleep(0.3)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)
        _stop(monitor)
    rules = parse_rules(
        f"""
[[rule]]
name = "veth-seen"
modules = ["virtualization"]
settle = "0.1s"
linger = "0s"
[rule.when.device]
subsystem = "net"
sysname = "{name}"
properties = {{ ID_NET_DRIVER = "veth" }}
""",
        "rules.toml",
    )
    decisions = replay(capture, rules, World(), applied=frozenset())
    kinds = _kinds(decisions)
    assert "RuleSettling" in kinds
    # the pair lived 0.3 s, more than the settle: activated, then gone
    assert kinds.index("RuleActivated") < kinds.index("RuleDeactivated")
    deactivated = next(d for d in decisions if isinstance(d.action, RuleDeactivated))
    assert deactivated.time >= 0.25  # the pair lived 0.3 s (linger 0: gone when removed)


# --- any text ---------------------------------------------------------------------------------

_LINES = st.sampled_from(
    [
        "UDEV  [12.5] add      /devices/x (net)",
        "UDEV  [12.5] move     /devices/y (net)",
        "UDEV  [1e9] remove   /devices/x (net)",
        "KERNEL[1.0] add /devices/x (net)",
        "DEVPATH=/devices/x",
        "DEVPATH_OLD=/devices/x",
        "DEVPATH=",
        "TAGS=::a:\x00:",
        "SUBSYSTEM=${evil}",
        "Timestamp: Sun Nov 22 05:03:23 2026 593118 usec",
        "Timestamp: Mon Feb 30 99:99:99 0 1 usec",
        "[2026-13-45T25:61:61.1] 3: va@vb: <UP,LOWER_UP> mtu 1500 state UP",
        "[2026-11-22T05:03:23.5] Deleted 3: va: <> state DOWN",
        '7: "quoted\\name: <NO-CARRIER> state bogus',
        "    link/ether 02:00:00:00:00:01 brd ff:ff:ff:ff:ff:ff",
        "    link/none",
        "3: va    inet 10.20.0.5/16 scope global va",
        "Deleted 3: va    inet6 fd00::1/129 scope global",
        "3: va    inet 999.1.1.1/8 scope global tentative",
        "    veth",
        "",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_LINES, st.text(max_size=40)), max_size=30))
def test_any_capture_text_parses_or_is_a_dump_error(lines: list[str]) -> None:
    text = "\n".join(lines)
    try:
        events = parse_events(text, "capture")
    except DumpError as exc:
        assert "capture:" in str(exc)
        return
    world = World()
    for event in events:
        world.apply(event.change)  # every change is one the world takes
