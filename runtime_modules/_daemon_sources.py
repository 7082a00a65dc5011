"""The daemon's view of the machine: the udev and netlink monitors the rules need.

Opened before the enumeration, so that nothing happening during it is lost (what the monitors
queue meanwhile is applied after it: changes are idempotent). Only what the rules need is
listened to (``RuleSet.needs``): link rules alone cost no udev monitor, device rules alone no
netlink socket. A reload whose rules need something else opens new ones (and re-enumerates),
and swaps them in only when that worked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._errors import ConfigError, PermissionDeniedError
from ._rules import Needs
from ._world import World, WorldReplaced

__all__ = ["Sources"]


class Sources:
    """The open monitors. ``on_ready(source, name)`` runs in the loop when one has events.

    Args:
        add_reader, remove_reader: the loop's, to watch each monitor's descriptor.
        on_ready: called with the source and its name ("udev", "netlink") when it is readable.
        netns: the network namespace whose links are watched (None: the daemon's own).
        udev_receive_buffer, netlink_receive_buffer: socket buffer sizes (tests shrink them).
        udevd_control: udevd's control socket, probed when a udev monitor opens.

    After ``open``, ``udevd_missing`` is True when the rules need device events and udevd does
    not run to send them.
    """

    def __init__(
        self,
        *,
        add_reader: Callable[[Any, Callable[[int], None]], None],
        remove_reader: Callable[[Any], None],
        on_ready: Callable[[Any, str], None],
        netns: str | None = None,
        udev_receive_buffer: int | None = None,
        netlink_receive_buffer: int | None = None,
        udevd_control: Path | None = None,
    ) -> None:
        self._add_reader = add_reader
        self._remove_reader = remove_reader
        self._on_ready = on_ready
        self.netns = netns
        self.udev_receive_buffer = udev_receive_buffer
        self.netlink_receive_buffer = netlink_receive_buffer
        self.udevd_control = udevd_control
        self.needs: Needs | None = None
        self.udevd_missing = False
        self._udev: Any = None
        self._netlink: Any = None

    def open(self, needs: Needs, world: World) -> None:
        """Open the monitors ``needs`` asks for, enumerate into ``world``, then swap them in.

        The new monitors are opened beside the old ones, which are closed only once the new
        ones work: a reload that fails leaves the daemon listening as before, never deaf.

        Raises:
            PermissionDeniedError, ConfigError: a monitor cannot be opened or enumerated (the
                old monitors stay open).
        """
        opened: list[tuple[Any, str]] = []
        try:
            self._open(needs, world, opened)
        except Exception as exc:
            for source, _name in opened:
                source.close()
            if isinstance(exc, PermissionError):
                raise PermissionDeniedError(
                    f"cannot listen to udev and netlink events ({exc.strerror}); run watch as root"
                ) from None
            if isinstance(exc, OSError):
                raise ConfigError(
                    f"cannot listen to udev and netlink events: {exc}; is this a Linux machine "
                    "with udev (/run/udev) and netlink?"
                ) from None
            raise
        self.close()
        self.needs = needs
        self.udevd_missing = needs.devices and not self._udevd_listening()
        for source, name in opened:
            if name == "udev":
                self._udev = source
            else:
                self._netlink = source
            self._add_reader(source, self._reader(source, name))

    def _udevd_listening(self) -> bool:
        from ._udev_source import UDEVD_CONTROL, udevd_listening

        return udevd_listening(self.udevd_control or UDEVD_CONTROL)

    def _reader(self, source: Any, name: str) -> Callable[[int], None]:
        return lambda mask: self._on_ready(source, name)

    def _open(self, needs: Needs, world: World, opened: list[tuple[Any, str]]) -> None:
        from ._netlink_source import NetlinkSource, enumerate_links
        from ._udev_source import UdevSource, enumerate_devices

        if needs.devices:
            import pyudev

            context = pyudev.Context()
            udev = UdevSource(context, needs, receive_buffer=self.udev_receive_buffer)
            opened.append((udev, "udev"))
            world.apply(WorldReplaced(devices=tuple(enumerate_devices(context, needs)), links=None))
        else:
            world.apply(WorldReplaced(devices=(), links=None))
        if needs.links:
            buffer = {}
            if self.netlink_receive_buffer is not None:
                buffer["receive_buffer"] = self.netlink_receive_buffer
            netlink = NetlinkSource(self.netns, addresses=needs.addresses, **buffer)
            opened.append((netlink, "netlink"))
            links = enumerate_links(self.netns, addresses=needs.addresses)
            world.apply(WorldReplaced(devices=None, links=tuple(links)))
        else:
            world.apply(WorldReplaced(devices=None, links=()))

    def resync_due(self) -> float | None:
        """When (monotonic) a source's failed re-enumeration is to be retried, or None."""
        dues = [s.resync_due for s in (self._udev, self._netlink) if s is not None and s.resync_due]
        return min(dues, default=None)

    def retry_resyncs(self, now: float) -> None:
        """Hand each source whose re-enumeration is due to ``on_ready``: its read() retries."""
        for source, name in ((self._udev, "udev"), (self._netlink, "netlink")):
            if source is not None and source.resync_due is not None and source.resync_due <= now:
                self._on_ready(source, name)

    def close(self) -> None:
        for source in (self._udev, self._netlink):
            if source is not None:
                self._remove_reader(source)
                source.close()
        self._udev = self._netlink = None
