"""The netlink source: network links from rtnetlink, as a dump (coldplug) and as events.

A thin shell: it translates RTM_NEWLINK / RTM_DELLINK, and RTM_NEWADDR / RTM_DELADDR when a rule
tests addresses, into world changes and decides nothing.

The socket is a plain non-blocking AF_NETLINK socket bound to RTMGRP_LINK (and the IPv4 and IPv6
address groups when addresses are needed), read by the daemon's
``selectors`` loop: readable means "read me", and an overrun is ENOBUFS from recv(2), the signal
to re-enumerate. (pyroute2 ≥ 0.9 reads its sockets inside a private asyncio loop, where readiness
says nothing about messages already queued and an overrun becomes a synthetic message.)

The messages are decoded here, with ``struct``: a link message is a 16-byte header, a 16-byte
ifinfomsg and a list of attributes, and we need its flags and four of them (rtnetlink(7),
<linux/if_link.h>);
an address message an 8-byte ifaddrmsg and up to three (<linux/if_addr.h>).
That spares the daemon pyroute2, whose package imports all of itself on any import: about 15 MiB
of resident memory and 60 ms of start-up for the few lines below. The tests check this decoder
against pyroute2's on the same kernel messages.

The network namespace is the caller's choice (``netns``): the socket is created by a short-lived
thread that enters the namespace with setns(2), which affects that thread only; a socket keeps
the namespace it was created in for its whole life.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ._errors import ConfigError
from ._world import (
    AddressAdded,
    AddressRemoved,
    Link,
    LinkRemoved,
    LinkUpsert,
    OperState,
    WorldChange,
    WorldReplaced,
)

__all__ = ["NetlinkSource", "address_from_message", "enumerate_links", "link_from_message"]

log = logging.getLogger(__name__)

NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns add` mounts named namespaces (ip-netns(8))
CLONE_NEWNET = 0x40000000  # <linux/sched.h>
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python's socket module does not export it
# One recv(2) per read holds many messages; 64 KiB is what iproute2 and libmnl use (MNL_SOCKET
# _BUFFER_SIZE is the page size, iproute2's rtnl_listen uses 16 KiB; a dump part fits in 32 KiB).
RECV_SIZE = 65536
# Receive buffer of the event socket: 1 MiB, like pyroute2's default and systemd-networkd's
# minimum; a link flapping storm fits, and an overrun is recovered anyway.
DEFAULT_RCVBUF = 1 << 20
MAX_RECVS_PER_READ = 64  # bounds one read() under a storm, so other sources get their turn
DUMP_TIMEOUT = 5.0  # the kernel answers a link dump in microseconds; 5 s means it is stuck
DUMP_RETRIES = 8  # a dump interrupted by concurrent changes (NLM_F_DUMP_INTR) is redone
# After a failed re-enumeration (the storm that overran us keeps interrupting the dump), the next
# try comes this much later: soon enough to follow the machine, late enough to let a storm pass.
RESYNC_RETRY = 1.0

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x300
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_DADFAILED = 0x08  # IPv6 duplicate address detection found the address in use: unusable
IFLA_ADDRESS, IFLA_IFNAME, IFLA_OPERSTATE, IFLA_LINKINFO = 1, 3, 16, 18
IFF_LOWER_UP = 0x10000  # <linux/if.h>
IFLA_INFO_KIND = 1
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
# IF_OPER_* in RFC 2863 order (<linux/if.h>)
_OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefix length, flags, scope, index
_ATTR = struct.Struct("=HH")  # rtattr: length, type

_seq = itertools.count(1)


def _netns_path(netns: str) -> Path:
    if netns.startswith("/"):
        path = Path(netns)
    elif "/" in netns or netns in ("", ".", ".."):
        raise ConfigError(f"--netns {netns!r}: not a namespace name; see `ip netns list`")
    else:
        path = NETNS_RUN_DIR / netns
    if not path.exists():
        raise ConfigError(
            f"network namespace {netns!r} does not exist ({path}); create it with"
            f" `ip netns add {netns}` or pick one from `ip netns list`"
        )
    return path


def _open_socket(netns: str | None, *, nonblocking: bool) -> socket.socket:
    """An rtnetlink socket in ``netns`` (None: ours)."""
    flags = socket.SOCK_RAW | socket.SOCK_CLOEXEC | (socket.SOCK_NONBLOCK if nonblocking else 0)

    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, flags, socket.NETLINK_ROUTE)

    if netns is None:
        return make()
    path = _netns_path(netns)
    result: list[socket.socket | BaseException] = []

    def enter_and_make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns({path}): {os.strerror(code)}")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    worker = threading.Thread(target=enter_and_make, name=f"netns-{netns}")
    worker.start()
    worker.join()
    if isinstance(result[0], BaseException):
        exc = result[0]
        if isinstance(exc, PermissionError):
            raise ConfigError(f"entering network namespace {netns!r} needs root: {exc}") from None
        raise exc
    return result[0]


def _align(n: int) -> int:
    return (n + 3) & ~3  # NLMSG_ALIGN / RTA_ALIGN: 4 bytes


def _attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while start + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, start)
        if length < _ATTR.size or start + length > end:
            break  # malformed: keep what was read
        attrs[kind & NLA_TYPE_MASK] = data[start + _ATTR.size : start + length]
        start += _align(length)
    return attrs


def _string(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """The netlink messages in one datagram: (type, flags, sequence, payload)."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, flags, seq, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            break
        yield kind, flags, seq, data[offset + _HEADER.size : offset + length]
        offset += _align(length)


def link_from_message(payload: bytes) -> Link | None:
    """Translate an ifinfomsg payload (RTM_NEWLINK, RTM_DELLINK, a dump entry) into a ``Link``.

    None for what is not a link: too short, or a family other than AF_UNSPEC (bridges report
    their ports as AF_BRIDGE messages, and an AF_BRIDGE RTM_DELLINK means "left the bridge").
    """
    if len(payload) < _IFINFO.size:
        return None
    family, _type, index, flags, _change = _IFINFO.unpack_from(payload)
    if family != socket.AF_UNSPEC:
        return None
    attrs = _attributes(payload, _IFINFO.size, len(payload))
    kind = None
    if (info := attrs.get(IFLA_LINKINFO)) is not None:
        kind = _string(_attributes(info, 0, len(info)).get(IFLA_INFO_KIND))
    oper = attrs.get(IFLA_OPERSTATE)
    mac = attrs.get(IFLA_ADDRESS)
    return Link(
        index=index,
        ifname=_string(attrs.get(IFLA_IFNAME)) or "",
        kind=kind,
        operstate=OperState.parse(_OPERSTATES[oper[0]] if oper and oper[0] < 7 else None),
        # IFF_LOWER_UP, as `ip` shows it: the link is up and its driver reports carrier. (Not
        # IFLA_CARRIER, which a down link reports too: recordings and captures have the flag.)
        carrier=bool(flags & IFF_LOWER_UP),
        mac=mac.hex(":") if mac else None,
    )


def address_from_message(payload: bytes) -> tuple[int, str, bool] | None:
    """Translate an ifaddrmsg payload (RTM_NEWADDR, RTM_DELADDR, a dump entry).

    Returns (link index, the address as ``ip`` prints it, usable), or None for what is not an
    IPv4 or IPv6 address. The text is "10.20.0.5/16", or "10.0.0.1 peer 10.0.0.2/32" on a
    point-to-point link (two such addresses differ by their peer only). An address is usable
    unless IPv6 duplicate address detection failed; a tentative one (DAD still running) counts:
    the kernel makes addresses kept on a down link tentative without saying so, and counting
    them keeps what events built equal to a fresh dump.
    """
    if len(payload) < _IFADDR.size:
        return None
    family, prefix, flags, _scope, index = _IFADDR.unpack_from(payload)
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    attrs = _attributes(payload, _IFADDR.size, len(payload))
    if (extended := attrs.get(IFA_FLAGS)) is not None and len(extended) >= 4:
        flags = struct.unpack_from("=I", extended)[0]  # the 8-bit field holds only the low bits
    size = 4 if family == socket.AF_INET else 16
    # IFA_LOCAL is the address itself and IFA_ADDRESS the peer's on point-to-point links; IPv6
    # (and IPv4 without a peer) has IFA_ADDRESS only, or both equal.
    local, peer = attrs.get(IFA_LOCAL), attrs.get(IFA_ADDRESS)
    if local is None:
        local, peer = peer, None
    if local is None or len(local) != size or (peer is not None and len(peer) != size):
        return None
    text = f"{ipaddress.ip_address(local)}"
    if peer is not None and peer != local:
        text += f" peer {ipaddress.ip_address(peer)}"
    return index, f"{text}/{prefix}", not flags & IFA_F_DADFAILED


def _dump(sock: socket.socket, kind: int, body: bytes) -> list[bytes] | None:
    """The payloads of one dump request on a blocking socket; None when interrupted."""
    seq = next(_seq) & 0xFFFFFFFF
    request = _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    sock.send(request + body)
    payloads: list[bytes] = []
    interrupted = False
    while True:
        for got_kind, flags, got, payload in messages(sock.recv(RECV_SIZE)):
            if got != seq:
                continue
            interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
            if got_kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else errno.EIO
                if code:
                    raise OSError(code, f"rtnetlink dump failed: {os.strerror(code)}")
            elif got_kind == NLMSG_DONE:
                return None if interrupted else payloads
            elif got_kind == kind - 2:  # the answers of RTM_GET* are RTM_NEW*
                payloads.append(payload)


def _dump_links(sock: socket.socket, addresses: bool) -> list[Link] | None:
    """Every link (with its usable addresses when ``addresses``); None when interrupted."""
    payloads = _dump(sock, RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
    if payloads is None:
        return None
    links = {link.index: link for p in payloads if (link := link_from_message(p)) is not None}
    if not addresses:
        return list(links.values())
    payloads = _dump(sock, RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
    if payloads is None:
        return None
    found: dict[int, set[str]] = {}
    for p in payloads:
        if (entry := address_from_message(p)) is not None and entry[2]:
            found.setdefault(entry[0], set()).add(entry[1])
    return [
        replace(link, addresses=frozenset(found[index])) if index in found else link
        for index, link in links.items()
    ]


def enumerate_links(netns: str | None = None, *, addresses: bool = False) -> list[Link]:
    """Every link present now in ``netns`` (None: the daemon's own namespace).

    With ``addresses``, each link carries its usable IP addresses too (a second dump).
    """
    with _open_socket(netns, nonblocking=False) as sock:
        sock.settimeout(DUMP_TIMEOUT)
        sock.bind((0, 0))
        for _ in range(DUMP_RETRIES):
            links = _dump_links(sock, addresses)
            if links is not None:
                return links
        raise OSError(errno.EAGAIN, "link dump kept being interrupted by changes")


class NetlinkSource:
    """An rtnetlink socket subscribed to link events (RTMGRP_LINK), in ``netns``.

    With ``addresses`` (some rule tests them) it joins the IPv4 and IPv6 address groups too;
    without, address changes do not even wake the daemon.
    """

    def __init__(
        self,
        netns: str | None = None,
        *,
        addresses: bool = False,
        receive_buffer: int = DEFAULT_RCVBUF,
    ) -> None:
        self.netns = netns
        self.addresses = addresses
        self.resyncs = 0
        self.resync_due: float | None = None  # monotonic: a failed re-enumeration is retried
        self.sock = _open_socket(netns, nonblocking=True)
        try:
            try:
                # SO_RCVBUFFORCE (root) may exceed net.core.rmem_max; else SO_RCVBUF, capped.
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            groups = RTMGRP_LINK
            if addresses:
                groups |= RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
            self.sock.bind((0, groups))
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NetlinkSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, limit: int = MAX_RECVS_PER_READ) -> list[WorldChange]:
        """The changes ready now, or one ``WorldReplaced`` after an overrun (ENOBUFS).

        While a failed re-enumeration waits for its retry (``resync_due``), what arrives is
        dropped (the re-enumeration will see it) and nothing is returned.
        """
        if self.resync_due is not None:
            if time.monotonic() < self.resync_due:
                self._drain(limit)
                return []
            return self.try_resync()
        changes: list[WorldChange] = []
        for _ in range(limit):
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                log.warning(
                    "netlink link socket error (%s): re-enumerating links",
                    errno.errorcode.get(exc.errno or 0, exc),
                )
                return self.try_resync()
            changes.extend(self.changes_of(data))
        return changes

    def _drain(self, limit: int) -> None:
        for _ in range(limit):
            try:
                self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                continue

    def try_resync(self) -> list[WorldChange]:
        """``resync``, but a failure is logged and retried at ``resync_due``, never raised.

        Level-triggered: the links are re-enumerated until it works, however long that takes.
        """
        try:
            replaced = self.resync()
        # EAGAIN after DUMP_RETRIES interrupted dumps, TimeoutError; ConfigError: the namespace
        # is gone for now (deleted, about to be made again by whoever manages it).
        except (OSError, ConfigError) as exc:
            self.resync_due = time.monotonic() + RESYNC_RETRY
            log.warning("re-enumerating links failed (%s); retrying in %g s", exc, RESYNC_RETRY)
            return []
        self.resync_due = None
        return [replaced]

    def changes_of(self, data: bytes) -> Iterator[WorldChange]:
        for kind, _flags, _seq, payload in messages(data):
            if kind in (RTM_NEWADDR, RTM_DELADDR):
                entry = address_from_message(payload)
                if entry is not None:
                    index, address, usable = entry
                    if kind == RTM_NEWADDR and usable:
                        yield AddressAdded(index, address)
                    else:  # deleted, or duplicate address detection failed
                        yield AddressRemoved(index, address)
                continue
            if kind not in (RTM_NEWLINK, RTM_DELLINK):
                continue
            link = link_from_message(payload)
            if link is None:
                continue
            if kind == RTM_DELLINK:
                yield LinkRemoved(link.index)
            else:
                yield LinkUpsert(link)

    def resync(self) -> WorldReplaced:
        """Discard what is queued (older than the dump) and dump all links anew."""
        self.resyncs += 1
        deadline = time.monotonic() + 1.0  # a sender faster than us must not pin us here
        while time.monotonic() < deadline:
            try:
                self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError:
                continue
        links = enumerate_links(self.netns, addresses=self.addresses)
        return WorldReplaced(devices=None, links=tuple(links))
