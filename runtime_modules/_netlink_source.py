"""The netlink source: network links from rtnetlink, as a dump (coldplug) and as events.

A thin shell: it translates RTM_NEWLINK / RTM_DELLINK into world changes and decides nothing.

pyroute2 encodes and parses the messages; the socket is our own. pyroute2 ≥ 0.9 performs its
socket I/O inside a private asyncio loop, so its file descriptor being readable says nothing about
messages it has already queued, and an overrun (ENOBUFS) turns into a synthetic error message.
A daemon driven by one ``selectors`` loop needs the opposite: readiness that means "read me", and
ENOBUFS as the exception that tells it to re-enumerate. A plain non-blocking AF_NETLINK socket
bound to RTMGRP_LINK gives exactly that.

The network namespace is the caller's choice (``netns``): the socket is created by a short-lived
thread that enters the namespace with setns(2), which affects that thread only; a socket keeps
the namespace it was created in for its whole life.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyroute2.netlink import NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_GETLINK, RTM_NEWLINK, RTMGRP_LINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from ._errors import ConfigError
from ._world import Link, LinkRemoved, LinkUpsert, OperState, WorldChange, WorldReplaced

__all__ = ["NetlinkSource", "enumerate_links", "link_from_message"]

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


def link_from_message(msg: Any) -> Link:
    """Translate an ifinfmsg (RTM_NEWLINK/RTM_DELLINK or a dump entry) into a ``Link``."""
    carrier = msg.get_attr("IFLA_CARRIER")
    mac = msg.get_attr("IFLA_ADDRESS")
    name = msg.get_attr("IFLA_IFNAME")
    return Link(
        index=int(msg["index"]),
        ifname=name if isinstance(name, str) else "",
        kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
        operstate=OperState.parse(msg.get_attr("IFLA_OPERSTATE")),
        carrier=None if carrier is None else bool(carrier),
        mac=mac.lower() if isinstance(mac, str) else None,
    )


def _is_link_message(msg: Any) -> bool:
    # Bridges also report their ports as RTM_NEWLINK/RTM_DELLINK with family AF_BRIDGE; an
    # AF_BRIDGE RTM_DELLINK means "left the bridge", not "link gone". Only AF_UNSPEC is a link.
    return bool(msg["header"]["type"] in (RTM_NEWLINK, RTM_DELLINK) and msg["family"] == 0)


def _dump(sock: socket.socket) -> list[Link] | None:
    """One RTM_GETLINK dump on a blocking socket; None when the kernel says it was interrupted."""
    seq = next(_seq)
    request = ifinfmsg()
    request["family"] = socket.AF_UNSPEC
    request["header"]["type"] = RTM_GETLINK
    request["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    request["header"]["sequence_number"] = seq
    request.encode()
    sock.send(request.data)
    marshal = MarshalRtnl()
    links: list[Link] = []
    interrupted = False
    while True:
        data = sock.recv(RECV_SIZE)
        for msg in marshal.parse(data):
            header = msg["header"]
            if header["sequence_number"] != seq:
                continue
            if header.get("flags", 0) & NLM_F_DUMP_INTR:
                interrupted = True
            error = header.get("error")
            if header["type"] == NLMSG_ERROR and error is not None:
                raise OSError(getattr(error, "code", errno.EIO), f"link dump failed: {error}")
            if header["type"] == NLMSG_DONE:
                return None if interrupted else links
            if _is_link_message(msg):
                links.append(link_from_message(msg))


def enumerate_links(netns: str | None = None) -> list[Link]:
    """Every link present now in ``netns`` (None: the daemon's own namespace)."""
    with _open_socket(netns, nonblocking=False) as sock:
        sock.settimeout(DUMP_TIMEOUT)
        sock.bind((0, 0))
        for _ in range(DUMP_RETRIES):
            links = _dump(sock)
            if links is not None:
                return links
        raise OSError(errno.EAGAIN, "link dump kept being interrupted by changes")


class NetlinkSource:
    """An rtnetlink socket subscribed to link events (RTMGRP_LINK), in ``netns``.

    The world model holds no addresses yet, so no address group is joined: a rule that needs
    addresses will add RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR here, with the world field.
    """

    def __init__(self, netns: str | None = None, *, receive_buffer: int = DEFAULT_RCVBUF) -> None:
        self.netns = netns
        self.resyncs = 0
        self._marshal = MarshalRtnl()
        self.sock = _open_socket(netns, nonblocking=True)
        try:
            try:
                # SO_RCVBUFFORCE (root) may exceed net.core.rmem_max; else SO_RCVBUF, capped.
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            self.sock.bind((0, RTMGRP_LINK))
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
        """The changes ready now, or one ``WorldReplaced`` after an overrun (ENOBUFS)."""
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
                return [self.resync()]
            changes.extend(self.changes_of(data))
        return changes

    def changes_of(self, data: bytes) -> Iterator[WorldChange]:
        for msg in self._marshal.parse(data):
            if not _is_link_message(msg):
                continue
            if msg["header"]["type"] == RTM_DELLINK:
                yield LinkRemoved(int(msg["index"]))
            else:
                yield LinkUpsert(link_from_message(msg))

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
        return WorldReplaced(devices=None, links=tuple(enumerate_links(self.netns)))
