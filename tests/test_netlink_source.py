"""The netlink source against real rtnetlink, in a network namespace each test creates."""

from __future__ import annotations

import contextlib
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runtime_modules._errors import ConfigError
from runtime_modules._netlink_source import NetlinkSource, enumerate_links
from runtime_modules._rules import Networks
from runtime_modules._world import (
    AddressAdded,
    AddressRemoved,
    Link,
    LinkRemoved,
    LinkUpsert,
    OperState,
    World,
    WorldChange,
    WorldReplaced,
)
from tests.fixtures.applier import FakeSystem
from tests.fixtures.daemon import LINK_RULE
from tests.fixtures.system import ip_netns

pytestmark = pytest.mark.root


def _read_until(
    source: NetlinkSource, done: Callable[[list[WorldChange]], bool], timeout: float = 5.0
) -> list[WorldChange]:
    deadline = time.monotonic() + timeout
    seen: list[WorldChange] = []
    while not done(seen):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if select.select([source], [], [], left)[0]:
            seen.extend(source.read())
    return seen


def _last(changes: list[WorldChange], ifname: str) -> Link | None:
    links = [c.link for c in changes if isinstance(c, LinkUpsert) and c.link.ifname == ifname]
    return links[-1] if links else None


def test_enumerate_translates_kind_state_carrier_and_mac(netns: str) -> None:
    ip_netns(netns, "link", "add", "va", "address", "02:AB:CD:00:00:01", "type", "veth")
    ip_netns(netns, "link", "set", "va", "up")
    links = {link.ifname: link for link in enumerate_links(netns)}
    assert set(links) == {"lo", "va", "veth0"}  # the namespace's own, nothing of the host's
    va = links["va"]
    assert va.kind == "veth"
    assert va.mac == "02:ab:cd:00:00:01"
    assert va.operstate is OperState.LOWERLAYERDOWN  # its peer is still down
    assert va.carrier is False
    assert links["lo"].kind is None


def test_events_follow_links_up_down_and_away(netns: str) -> None:
    with NetlinkSource(netns) as source:
        ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip_netns(netns, "link", "set", "va", "up")
        ip_netns(netns, "link", "set", "vb", "up")
        seen = _read_until(
            source, lambda s: (_last(s, "va") or Link(index=0, ifname="")).carrier is True
        )
        va = _last(seen, "va")
        assert va is not None and va.operstate is OperState.UP and va.kind == "veth"

        ip_netns(netns, "link", "set", "vb", "down")
        seen = _read_until(
            source, lambda s: getattr(_last(s, "va"), "operstate", None) is OperState.LOWERLAYERDOWN
        )
        va = _last(seen, "va")
        assert va is not None and va.carrier is False

        ip_netns(netns, "link", "del", "va")
        seen = _read_until(source, lambda s: sum(isinstance(c, LinkRemoved) for c in s) >= 2)
        removed = {c.index for c in seen if isinstance(c, LinkRemoved)}
        assert len(removed) == 2


def test_bridge_port_leaving_is_not_a_link_removal(netns: str) -> None:
    ip_netns(netns, "link", "add", "br0", "type", "bridge")
    ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    with NetlinkSource(netns) as source:
        ip_netns(netns, "link", "set", "va", "master", "br0")
        ip_netns(netns, "link", "set", "va", "nomaster")
        # AF_BRIDGE RTM_DELLINK is sent when the port leaves; a removal must not come of it.
        ip_netns(netns, "link", "set", "vb", "mtu", "1400")  # a marker after the bridge events
        seen = _read_until(source, lambda s: getattr(_last(s, "vb"), "ifname", None) == "vb")
        assert _last(seen, "vb") is not None
        assert not any(isinstance(c, LinkRemoved) for c in seen)


def test_overrun_is_answered_by_a_fresh_dump(netns: str) -> None:
    # The smallest receive buffer the kernel allows: a handful of RTM_NEWLINK overflow it.
    with NetlinkSource(netns, receive_buffer=1) as source:
        ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        for _ in range(10):
            ip_netns(netns, "link", "set", "va", "up")
            ip_netns(netns, "link", "set", "va", "down")
        changes = source.read()
        assert source.resyncs == 1
        assert len(changes) == 1 and isinstance(changes[0], WorldReplaced)
        world = World()
        world.apply(changes[0])
        assert world == World.of(links=enumerate_links(netns))
        assert {link.ifname for link in world.links.values()} == {"lo", "va", "vb"}


def test_other_namespaces_are_not_heard(netns: str) -> None:
    other = f"{netns}x"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        with NetlinkSource(netns) as source:
            ip_netns(other, "link", "add", "xa", "type", "veth", "peer", "name", "xb")
            ip_netns(netns, "link", "set", "lo", "up")  # a marker in ours
            seen = _read_until(source, lambda s: _last(s, "lo") is not None)
            assert {c.link.ifname for c in seen if isinstance(c, LinkUpsert)} == {"lo"}
    finally:
        subprocess.run(["ip", "netns", "del", other], check=False)


@pytest.mark.parametrize("name", ["no-such-namespace-rm", "../etc"])
def test_unknown_namespace_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="ip netns"):
        NetlinkSource(name)


def test_our_decoder_agrees_with_pyroute2(netns: str) -> None:
    from pyroute2 import IPRoute

    ip_netns(netns, "link", "add", "br0", "type", "bridge")
    ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    ip_netns(netns, "link", "set", "va", "master", "br0", "up")
    ip_netns(netns, "link", "set", "vb", "up")
    ip_netns(netns, "link", "set", "lo", "up")
    with IPRoute(netns=netns, flags=0) as ipr:
        theirs = {
            msg["index"]: Link(
                index=msg["index"],
                ifname=msg.get_attr("IFLA_IFNAME"),
                kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
                operstate=OperState.parse(msg.get_attr("IFLA_OPERSTATE")),
                carrier=bool(msg["flags"] & 0x10000),  # IFF_LOWER_UP
                mac=msg.get_attr("IFLA_ADDRESS"),
            )
            for msg in ipr.get_links()
        }
    ours = {link.index: link for link in enumerate_links(netns)}
    assert ours == theirs
    assert {link.kind for link in ours.values()} == {None, "bridge", "veth"}


@contextlib.contextmanager
def _unenterable(netns: str) -> Iterator[None]:
    """Make ``netns`` impossible to enter by name for a while (setns fails: EINVAL)."""
    path = f"/run/netns/{netns}"
    subprocess.run(["mount", "--bind", "/dev/null", path], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", path], check=True)


def _overrun(netns: str) -> None:
    ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    for _ in range(10):  # far more than the smallest receive buffer holds, unread
        ip_netns(netns, "link", "set", "va", "up")
        ip_netns(netns, "link", "set", "va", "down")


def test_a_failed_re_enumeration_is_retried_not_raised(netns: str) -> None:
    with NetlinkSource(netns, receive_buffer=1) as source:
        _overrun(netns)
        with _unenterable(netns):
            assert source.read() == []  # the overrun's dump failed: said, not raised
            assert source.resync_due is not None
            assert source.read() == []  # before the retry is due: nothing (and the queue drained)
        source.resync_due = time.monotonic()  # the daemon's timer calls read() when it is due
        changes = source.read()
        assert source.resync_due is None
        assert len(changes) == 1 and isinstance(changes[0], WorldReplaced)
        assert {link.ifname for link in changes[0].links or ()} == {"lo", "va", "vb"}


def test_the_daemon_retries_a_failed_re_enumeration_on_its_timer(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    daemon = make_daemon(LINK_RULE.format(settle=0.1, linger=1.0), netlink_receive_buffer=1)
    _overrun(netns)
    ip_netns(netns, "link", "set", "va", "up")
    ip_netns(netns, "link", "set", "vb", "up")
    with _unenterable(netns):
        daemon.step(0.5)  # the overrun is read; its re-enumeration fails; the daemon lives on
        assert daemon.wait_time() is not None  # a retry is due: the loop will wake for it
        assert daemon.world.link_by_name("va") is None
    # No event comes any more: only the timer's retry can bring the links in.
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 10)
    assert daemon.world.link_by_name("va") is not None


# --- addresses ------------------------------------------------------------------------------


def _addresses(world: World, ifname: str) -> frozenset[str]:
    link = world.link_by_name(ifname)
    return link.addresses if link is not None else frozenset()


def test_address_events_follow_adds_dad_and_removals(netns: str) -> None:
    ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    for name in ("va", "vb"):  # no link-local addresses arriving at their own pace
        ip_netns(netns, "link", "set", name, "addrgenmode", "none")
    world = World.of(links=enumerate_links(netns, addresses=True))
    with NetlinkSource(netns, addresses=True) as source:
        ip_netns(netns, "link", "set", "va", "up")
        ip_netns(netns, "link", "set", "vb", "up")
        ip_netns(netns, "addr", "add", "10.20.0.5/16", "dev", "va")
        ip_netns(netns, "addr", "add", "fd00:7::5/64", "dev", "va")  # with duplicate detection

        def wanted(seen: list[WorldChange]) -> bool:
            for change in seen:
                world.apply(change)
            seen.clear()
            return {"10.20.0.5/16", "fd00:7::5/64"} <= _addresses(world, "va")

        _read_until(source, wanted)
        assert {"10.20.0.5/16", "fd00:7::5/64"} <= _addresses(world, "va")
        ip_netns(netns, "addr", "del", "10.20.0.5/16", "dev", "va")
        seen = _read_until(source, lambda s: any(isinstance(c, AddressRemoved) for c in s))
        index = world.link_by_name("va").index  # type: ignore[union-attr]
        assert AddressRemoved(index, "10.20.0.5/16") in seen
        for change in seen:
            world.apply(change)
        assert "10.20.0.5/16" not in _addresses(world, "va")
        # What the events built is what a fresh dump says (link-local addresses included).
        _read_until(source, lambda s: False, timeout=0.2)
        assert world == World.of(links=enumerate_links(netns, addresses=True))


def test_a_tentative_address_counts_and_one_kept_on_a_down_link_stays(netns: str) -> None:
    ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    for name in ("va", "vb"):
        ip_netns(netns, "link", "set", name, "addrgenmode", "none")
        ip_netns(netns, "link", "set", name, "up")
    # keep_addr_on_down: the kernel keeps va's address when it goes down, makes it tentative
    # and tells nobody; counting tentative addresses keeps the events' world equal to a dump.
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.va.keep_addr_on_down=1"],
        check=True,
    )
    world = World.of(links=enumerate_links(netns, addresses=True))
    with NetlinkSource(netns, addresses=True) as source:
        ip_netns(netns, "addr", "add", "fd00:7::5/64", "dev", "va")
        early = {link.ifname: link for link in enumerate_links(netns, addresses=True)}
        index = early["va"].index
        seen = _read_until(source, lambda s: AddressAdded(index, "fd00:7::5/64") in s)
        assert "fd00:7::5/64" in early["va"].addresses  # tentative, and counted at once
        for change in seen:
            world.apply(change)
        time.sleep(2.5)  # duplicate address detection passes (its RTM_NEWADDR changes nothing)
        ip_netns(netns, "link", "set", "va", "down")
        time.sleep(0.2)
        for change in _read_until(source, lambda s: False, timeout=0.3):
            world.apply(change)
    assert _addresses(world, "va") == {"fd00:7::5/64"}
    assert world == World.of(links=enumerate_links(netns, addresses=True))


def test_point_to_point_addresses_differ_by_their_peer(netns: str) -> None:
    ip_netns(netns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    world = World.of(links=enumerate_links(netns, addresses=True))
    with NetlinkSource(netns, addresses=True) as source:
        ip_netns(netns, "addr", "add", "10.0.0.1", "peer", "10.0.0.2", "dev", "d0")
        ip_netns(netns, "addr", "add", "10.0.0.1", "peer", "10.0.0.3", "dev", "d0")
        ip_netns(netns, "addr", "del", "10.0.0.1", "peer", "10.0.0.2", "dev", "d0")
        for change in _read_until(source, lambda s: len(s) >= 3):
            world.apply(change)
    assert _addresses(world, "d0") == {"10.0.0.1 peer 10.0.0.3/32"}  # one is left, as ip says
    assert world == World.of(links=enumerate_links(netns, addresses=True))
    assert Networks.of("10.0.0.0/8").match(_addresses(world, "d0"))  # by the local address
    assert not Networks.of("10.0.0.3").match(_addresses(world, "d0"))  # not by the peer


def test_without_address_rules_address_changes_are_not_heard(netns: str) -> None:
    ip_netns(netns, "link", "add", "va", "type", "veth")
    with NetlinkSource(netns) as source:
        ip_netns(netns, "addr", "add", "10.20.0.5/16", "dev", "va")
        ip_netns(netns, "link", "set", "lo", "up")  # a marker after the address
        seen = _read_until(source, lambda s: _last(s, "lo") is not None)
    assert _last(seen, "lo") is not None
    assert not any(isinstance(c, AddressAdded | AddressRemoved) for c in seen)
    assert all(not link.addresses for link in enumerate_links(netns))  # not even dumped


def test_our_address_decoder_agrees_with_pyroute2(netns: str) -> None:
    from pyroute2 import IPRoute

    ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    ip_netns(netns, "link", "set", "lo", "up")
    ip_netns(netns, "addr", "add", "10.20.0.5/16", "dev", "va")
    ip_netns(netns, "addr", "add", "192.168.7.1", "peer", "192.168.7.2", "dev", "vb")  # ptp
    ip_netns(netns, "addr", "add", "fd00:7::5/64", "dev", "vb", "nodad")
    with IPRoute(netns=netns, flags=0) as ipr:
        theirs: dict[int, set[str]] = {}
        for msg in ipr.get_addr():
            local, peer = msg.get_attr("IFA_LOCAL"), msg.get_attr("IFA_ADDRESS")
            text = local or peer
            if local and peer and peer != local:
                text += f" peer {peer}"
            theirs.setdefault(msg["index"], set()).add(f"{text}/{msg['prefixlen']}")
    ours = {link.index: set(link.addresses) for link in enumerate_links(netns, addresses=True)}
    assert {i: a for i, a in ours.items() if a} == theirs
    by_name = {link.ifname: link for link in enumerate_links(netns, addresses=True)}
    assert by_name["lo"].addresses == {"127.0.0.1/8", "::1/128"}
    assert by_name["vb"].addresses == {"192.168.7.1 peer 192.168.7.2/32", "fd00:7::5/64"}


def test_overrun_with_addresses_re_enumerates_them_too(netns: str) -> None:
    with NetlinkSource(netns, addresses=True, receive_buffer=1) as source:
        _overrun(netns)
        ip_netns(netns, "addr", "add", "10.20.0.5/16", "dev", "va")
        changes = source.read()
        assert len(changes) == 1 and isinstance(changes[0], WorldReplaced)
        world = World()
        world.apply(changes[0])
        assert _addresses(world, "va") == {"10.20.0.5/16"}
