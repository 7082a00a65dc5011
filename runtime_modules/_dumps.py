"""Recorded worlds: readers for files users already know how to make.

- ``udevadm info --export-db`` dumps (``read_udev_db``), in the old format (``P:``/``N:``/``S:``/
  ``E:`` lines) and in the newer one that adds ``M:`` sysname, ``R:`` sysnum, ``J:`` device id,
  ``U:`` subsystem, ``B:`` driver subsystem, ``T:`` devtype, ``D:`` device number, ``I:`` ifindex,
  ``L:`` devlink priority, ``Q:`` diskseq, ``V:`` driver (systemd's ``print_record``).
- umockdev recordings (``read_umockdev``, from ``umockdev-record``): ``P:`` devpath, ``E:``
  property, ``A:`` sysfs attribute (C-escaped), ``H:`` binary attribute (hex), ``L:`` sysfs link
  (``driver=../../bus/…/drivers/x``), ``N:`` device node, ``S:`` device symlink.
- ``ip -j link`` output (``read_ip_link_json``; ``ip -j -d link`` also gives each link's kind,
  ``ip -j addr`` its addresses).

The same letter means different things in the two device formats (``L:`` is a priority in one,
a link in the other), so each has its own reader. Records are separated by blank lines; a
device's ancestors are the records whose devpath is a prefix of its own, as in ``World``.
Errors are ``DumpError`` naming the file and line and saying how to make a good file.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._errors import DumpError
from ._world import Device, Link, OperState, World

__all__ = [
    "parse_ip_link_json",
    "parse_udev_db",
    "parse_umockdev",
    "read_ip_link_json",
    "read_udev_db",
    "read_umockdev",
    "records_addresses",
    "world_from_files",
]

# The biggest real dumps are a few MiB (a DGX: 0.4 MiB); far more is not a dump.
MAX_DUMP_SIZE = 256 * 1024 * 1024

_PROPERTY_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
_UDEV_HELP = "make one with `udevadm info --export-db > FILE`"
_UMOCKDEV_HELP = "make one with `umockdev-record /sys/… > FILE`"
_IP_HELP = "make one with `ip -j -d link > FILE`"
_ADDR_HELP = "make one with `ip -j -d addr > FILE`"


def _read_text(path: Path, what: str, help_: str) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_DUMP_SIZE + 1)
    except FileNotFoundError:
        raise DumpError(f"{path}: no such file; {help_}") from None
    except IsADirectoryError:
        raise DumpError(f"{path}: is a folder, not {what}; {help_}") from None
    except OSError as exc:
        raise DumpError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_DUMP_SIZE:
        raise DumpError(f"{path}: larger than {MAX_DUMP_SIZE >> 20} MiB; not {what}")
    if b"\0" in data:
        raise DumpError(f"{path}: a binary file, not {what}; {help_}")
    # Property values are raw bytes in udev; a stray non-UTF-8 byte must not lose the record.
    return data.decode("utf-8", "backslashreplace")


def _records(text: str) -> Iterator[list[tuple[int, str]]]:
    """Blank-line separated records as lists of (line number, line)."""
    record: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            record.append((number, line))
        elif record:
            yield record
            record = []
    if record:
        yield record


def _split_line(source: str, number: int, line: str, help_: str) -> tuple[str, str]:
    """("E", "KEY=VALUE") from "E: KEY=VALUE"."""
    if len(line) >= 2 and line[1] == ":" and line[0].isascii() and line[0].isupper():
        return line[0], line[2:].removeprefix(" ")
    raise DumpError(f"{source}:{number}: not a record line: {line[:80]!r}; {help_}")


def _key_value(source: str, number: int, text: str, help_: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise DumpError(f"{source}:{number}: expected KEY=VALUE, got {text[:80]!r}; {help_}")
    return key, value


def tags_of(properties: Mapping[str, str], extra: Sequence[str] = ()) -> frozenset[str]:
    """A device's tags from its udev properties (dumps and replayed captures alike)."""
    # TAGS is ":a:b:" (udev keeps every tag ever set there; CURRENT_TAGS only the current ones).
    raw = properties.get("TAGS", "")
    return frozenset([*(t for t in raw.split(":") if t), *extra])


def _devpath(source: str, number: int, value: str, help_: str) -> str:
    devpath = value.strip()
    if not devpath.startswith("/"):
        raise DumpError(f"{source}:{number}: devpath {devpath[:80]!r} must start with '/'; {help_}")
    return devpath


# --- udevadm info --export-db -----------------------------------------------------------------


def parse_udev_db(text: str, source: str) -> list[Device]:
    """The devices of a ``udevadm info --export-db`` dump (``source`` names it in errors)."""
    devices: list[Device] = []
    for record in _records(text):
        number, first = record[0]
        letter, value = _split_line(source, number, first, _UDEV_HELP)
        if letter != "P":
            raise DumpError(
                f"{source}:{number}: a record must start with a `P: /devices/…` line; {_UDEV_HELP}"
            )
        devpath = _devpath(source, number, value, _UDEV_HELP)
        props: dict[str, str] = {}
        fields: dict[str, str] = {}
        tags: list[str] = []
        for number, line in record[1:]:
            if _PROPERTY_LINE.match(line):
                # A property line that lost its "E: " (dumps pasted into bug reports do that).
                key, value = _key_value(source, number, line, _UDEV_HELP)
                props[key] = value
                continue
            letter, value = _split_line(source, number, line, _UDEV_HELP)
            if letter == "E":
                key, value = _key_value(source, number, value, _UDEV_HELP)
                props[key] = value
            elif letter in "MUTV":
                fields[letter] = value
            elif letter == "G":  # a tag, in the dumps of some udev versions
                tags.append(value)
            elif letter == "P":
                raise DumpError(
                    f"{source}:{number}: a second `P:` line in one record; records are "
                    f"separated by blank lines; {_UDEV_HELP}"
                )
            # Other letters (N S L R J B D I Q, and those of later udevadm versions) carry
            # nothing the world model keeps.
        devices.append(
            Device(
                devpath=devpath,
                subsystem=props.get("SUBSYSTEM", fields.get("U")),
                devtype=props.get("DEVTYPE", fields.get("T")),
                driver=props.get("DRIVER", fields.get("V")),
                sysname=fields.get("M", ""),
                properties=props,
                tags=tags_of(props, tags),
            )
        )
    if not devices:
        raise DumpError(f"{source}: no device records (`P: /devices/…` lines); {_UDEV_HELP}")
    return devices


def read_udev_db(path: Path) -> list[Device]:
    """The devices of the ``udevadm info --export-db`` dump at ``path``."""
    return parse_udev_db(_read_text(path, "a udev database dump", _UDEV_HELP), str(path))


# --- umockdev-record ------------------------------------------------------------------------

_C_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_OCTAL = re.compile(r"[0-7]{1,3}")


def _unescape(text: str) -> str:
    r"""GLib's ``g_strcompress``, which umockdev uses for ``A:`` values: \n, \\, \101, …"""
    if "\\" not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "\\" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        m = _OCTAL.match(text, i + 1)
        if m:
            out.append(chr(int(m.group(), 8) & 0xFF))
            i = m.end()
        else:
            out.append(_C_ESCAPES.get(nxt, nxt))
            i += 2
    return "".join(out)


def _link_target_name(target: str) -> str:
    return target.rstrip("/").rsplit("/", 1)[-1]


def parse_umockdev(text: str, source: str) -> list[Device]:
    """The devices of a umockdev recording, with their recorded sysfs attributes."""
    devices: list[Device] = []
    for raw_record in _records(text):
        record = [(n, line) for n, line in raw_record if not line.startswith("#")]
        if not record:
            continue
        number, first = record[0]
        letter, value = _split_line(source, number, first, _UMOCKDEV_HELP)
        if letter != "P":
            raise DumpError(
                f"{source}:{number}: a record must start with a `P: /devices/…` line; "
                f"{_UMOCKDEV_HELP}"
            )
        devpath = _devpath(source, number, value, _UMOCKDEV_HELP)
        props: dict[str, str] = {}
        attrs: dict[str, str] = {}
        links: dict[str, str] = {}
        for number, line in record[1:]:
            letter, value = _split_line(source, number, line, _UMOCKDEV_HELP)
            if letter in "NS":  # device node (and its contents) and symlinks: not world facts
                continue
            if letter not in "EAHL":
                raise DumpError(
                    f"{source}:{number}: unknown line type `{letter}:` in a umockdev recording "
                    f"(expected P, E, A, H, L, N or S); {_UMOCKDEV_HELP}"
                )
            key, value = _key_value(source, number, value, _UMOCKDEV_HELP)
            if letter == "E":
                props[key] = value
            elif letter == "A":
                # Keep the value as a live sysfs read gives it, minus the final newline.
                attrs[key] = _unescape(value).rstrip("\n")
            elif letter == "L":
                links[key] = value
            else:  # H: binary attribute; keep it only when it is text
                try:
                    raw = bytes.fromhex(value)
                except ValueError:
                    raise DumpError(
                        f"{source}:{number}: `H: {key}=` is not hexadecimal; {_UMOCKDEV_HELP}"
                    ) from None
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if decoded.isprintable() or decoded.rstrip("\n").isprintable():
                    attrs[key] = decoded.rstrip("\n")
        driver = props.get("DRIVER")
        if driver is None and "driver" in links:
            driver = _link_target_name(links["driver"])
        subsystem = props.get("SUBSYSTEM")
        if subsystem is None and "subsystem" in links:
            subsystem = _link_target_name(links["subsystem"])
        devices.append(
            Device(
                devpath=devpath,
                subsystem=subsystem,
                devtype=props.get("DEVTYPE"),
                driver=driver,
                properties=props,
                attributes=attrs,
                tags=tags_of(props),
            )
        )
    if not devices:
        raise DumpError(f"{source}: no device records (`P: /devices/…` lines); {_UMOCKDEV_HELP}")
    return devices


def read_umockdev(path: Path) -> list[Device]:
    """The devices of the umockdev recording at ``path``."""
    return parse_umockdev(_read_text(path, "a umockdev recording", _UMOCKDEV_HELP), str(path))


# --- ip -j link ---------------------------------------------------------------------------------


def _link(entry: Any, source: str, number: int) -> Link:
    where = f"{source}: entry {number}"
    if not isinstance(entry, dict):
        raise DumpError(f"{where}: must be an object; {_IP_HELP}")
    index, name = entry.get("ifindex"), entry.get("ifname")
    if not isinstance(index, int) or isinstance(index, bool) or index <= 0:
        raise DumpError(f"{where}: `ifindex` must be a positive number; {_IP_HELP}")
    if not isinstance(name, str) or not name:
        raise DumpError(f"{where}: `ifname` must be a non-empty string; {_IP_HELP}")
    flags = entry.get("flags", [])
    flags = [f for f in flags if isinstance(f, str)] if isinstance(flags, list) else []
    info = entry.get("linkinfo")
    kind = info.get("info_kind") if isinstance(info, dict) else None
    address = entry.get("address")
    operstate = entry.get("operstate")
    addresses = _addresses(entry.get("addr_info"), f"{where} ({name})")
    return Link(
        index=index,
        ifname=name,
        kind=kind if isinstance(kind, str) else None,
        operstate=OperState.parse(operstate if isinstance(operstate, str) else None),
        # LOWER_UP is the kernel's IFF_LOWER_UP (up, and the driver reports carrier), as live.
        carrier="LOWER_UP" in flags,
        mac=address.lower() if isinstance(address, str) else None,
        addresses=addresses,
    )


def _addresses(info: Any, where: str) -> frozenset[str]:
    """The addresses of ``ip -j addr``'s ``addr_info`` list (absent: none known), as the live
    source writes them: "10.20.0.5/16", "10.0.0.1 peer 10.0.0.2/32"; not those that failed DAD."""
    if info is None:
        return frozenset()
    if not isinstance(info, list):
        raise DumpError(f"{where}: `addr_info` must be a list; {_ADDR_HELP}")
    found = set()
    for item in info:
        if not isinstance(item, dict) or item.get("family") not in ("inet", "inet6"):
            continue
        if item.get("dadfailed"):
            continue  # unusable, as the live source sees it
        local, peer, prefix = item.get("local"), item.get("address"), item.get("prefixlen")
        try:
            if isinstance(local, str) and isinstance(peer, str) and peer != local:
                far = ipaddress.ip_interface(f"{peer}/{prefix}")
                text = f"{ipaddress.ip_address(local)} peer {far}"
            else:
                text = str(ipaddress.ip_interface(f"{local}/{prefix}"))
        except ValueError:
            raise DumpError(
                f"{where}: {local!r}/{prefix!r} is not an IP address with a prefix; {_ADDR_HELP}"
            ) from None
        found.add(text)
    return frozenset(found)


def parse_ip_link_json(text: str, source: str) -> list[Link]:
    """The links of ``ip -j link`` (or ``ip -j -d link``, ``ip -j addr``) output."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DumpError(
            f"{source}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}); {_IP_HELP}"
        ) from None
    except (RecursionError, ValueError) as exc:
        raise DumpError(f"{source}: not valid JSON ({exc}); {_IP_HELP}") from None
    if not isinstance(data, list):
        raise DumpError(f"{source}: must be a JSON list of links; {_IP_HELP}")
    return [_link(entry, source, n) for n, entry in enumerate(data, start=1)]


def records_addresses(path: Path) -> bool:
    """Whether the ``ip -j`` output at ``path`` holds addresses (``ip -j addr``, not ``link``).

    True for what is no list of links at all: reading it says what is wrong, not this.
    """
    try:
        data = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError, RecursionError):
        return True
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        return True
    return any("addr_info" in e for e in data)


def read_ip_link_json(path: Path) -> list[Link]:
    """The links of the ``ip -j link`` output at ``path``."""
    return parse_ip_link_json(_read_text(path, "ip -j link output", _IP_HELP), str(path))


def world_from_files(
    udev_dbs: Sequence[Path] = (),
    umockdevs: Sequence[Path] = (),
    links: Sequence[Path] = (),
) -> World:
    """One world from recordings of one machine; a later record of a devpath replaces an earlier.

    Raises:
        DumpError: naming the file and line that cannot be read.
    """
    devices: list[Device] = []
    for path in udev_dbs:
        devices.extend(read_udev_db(path))
    for path in umockdevs:
        devices.extend(read_umockdev(path))
    found: list[Link] = []
    for path in links:
        found.extend(read_ip_link_json(path))
    return World.of(devices, found)
