"""A umockdev testbed driven over stdin/stdout, for tests that need real libudev uevents.

Run it under ``umockdev-wrapper`` (tests/fixtures/daemon.py does): libudev in this process, and
in every child it spawns, then sees the testbed's /sys and receives the testbed's uevents on a
real libudev monitor. One JSON request per line on stdin, one JSON reply per line on stdout::

    {"op": "add", "subsystem": "pci", "name": "gpu0", "parent": null,
     "attributes": {"vendor": "0x10de"}, "properties": {"PCI_ID": "10DE:1DB2"}}
        -> {"syspath": "/sys/devices/gpu0"}          (add_device also emits the "add" uevent)
    {"op": "add_string", "text": "P: /devices/...\\nE: SUBSYSTEM=drm\\n"}   (umockdev record)
    {"op": "set_property", "syspath": ..., "name": "DRIVER", "value": "nvidia"}
    {"op": "uevent", "syspath": ..., "action": "change", "count": 1}
    {"op": "remove", "syspath": ...}   (a "remove" uevent, then the device leaves /sys)
    {"op": "spawn", "argv": [...], "log": PATH}   -> {"pid": N}  (a child sharing the testbed)
    {"op": "wait", "pid": N, "timeout": 30}       -> {"returncode": 0}
    {"op": "source", "subsystems": [...] | null, "attributes": []}
        -> {"coldplug": [device, ...]}   (a UdevSource in this process)
    {"op": "read", "timeout": 1.0, "min": 1} -> {"changes": [change, ...]}
    {"op": "quit"}

Errors come back as {"error": "..."}. umockdev sends uevents over a Unix datagram socket and
aborts when a receiver's queue is full; that queue holds ``net.unix.max_dgram_qlen`` datagrams
(10 by default), a per-namespace sysctl. Run this driver in a network namespace of its own with
``--own-netns`` and it raises the limit there, so an injected storm queues up as kernel uevents
would.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

QLEN = Path("/proc/sys/net/unix/max_dgram_qlen")


def _raise_qlen() -> None:
    # Asked for with --own-netns only: the host's value belongs to the host.
    QLEN.write_text("1000000\n")


def device_json(device: Any) -> dict[str, Any]:
    return {
        "devpath": device.devpath,
        "subsystem": device.subsystem,
        "devtype": device.devtype,
        "driver": device.driver,
        "sysname": device.sysname,
        "properties": dict(device.properties),
        "attributes": dict(device.attributes),
        "tags": sorted(device.tags),
    }


def change_json(change: Any) -> dict[str, Any]:
    from runtime_modules._world import (
        DeviceMoved,
        DeviceRemoved,
        DeviceUpsert,
        WorldReplaced,
    )

    match change:
        case DeviceUpsert(device):
            return {"type": "upsert", "device": device_json(device)}
        case DeviceRemoved(devpath):
            return {"type": "removed", "devpath": devpath}
        case DeviceMoved(old, device):
            return {"type": "moved", "old": old, "device": device_json(device)}
        case WorldReplaced(devices, _):
            return {"type": "replaced", "devices": [device_json(d) for d in devices or ()]}
    raise TypeError(change)


class Needs:
    def __init__(self, req: dict[str, Any]) -> None:
        subsystems = req.get("subsystems")
        self.subsystems = None if subsystems is None else frozenset(subsystems)
        self.attributes = frozenset(req.get("attributes", ()))


class Driver:
    def __init__(self) -> None:
        import gi

        gi.require_version("UMockdev", "1.0")
        from gi.repository import UMockdev

        if "--own-netns" in sys.argv[1:]:
            _raise_qlen()
        self.testbed = UMockdev.Testbed.new()
        # The testbed sets UMOCKDEV_DIR in the C environment only; children started with an
        # explicit env (spawn) must get it from os.environ to find the testbed.
        os.environ["UMOCKDEV_DIR"] = self.testbed.get_root_dir()
        self.children: list[subprocess.Popen[bytes]] = []
        self.source: Any = None

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        tb = self.testbed
        if op == "add":
            attrs = [x for kv in req.get("attributes", {}).items() for x in kv]
            props = [x for kv in req.get("properties", {}).items() for x in kv]
            path = tb.add_device(req["subsystem"], req["name"], req.get("parent"), attrs, props)
            return {"syspath": path}
        if op == "add_string":
            tb.add_from_string(req["text"])
            return {}
        if op == "set_property":
            tb.set_property(req["syspath"], req["name"], req["value"])
            return {}
        if op == "set_attribute":
            tb.set_attribute(req["syspath"], req["name"], req["value"])
            return {}
        if op == "uevent":
            for _ in range(int(req.get("count", 1))):
                tb.uevent(req["syspath"], req["action"])
            return {"sent": int(req.get("count", 1))}
        if op == "remove":
            tb.uevent(req["syspath"], "remove")
            tb.remove_device(req["syspath"])
            return {}
        if op == "spawn":
            with open(req["log"], "ab") as log:
                child = subprocess.Popen(
                    req["argv"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **req.get("env", {})},
                )
            self.children.append(child)
            return {"pid": child.pid}
        if op == "wait":
            for child in self.children:
                if child.pid == req["pid"]:
                    return {"returncode": child.wait(timeout=float(req.get("timeout", 30)))}
            raise ValueError(f"no child with pid {req['pid']}")
        if op == "source":
            import pyudev

            from runtime_modules._udev_source import UdevSource, enumerate_devices

            context = pyudev.Context()
            needs = Needs(req)
            self.source = UdevSource(context, needs)
            return {"coldplug": [device_json(d) for d in enumerate_devices(context, needs)]}
        if op == "read":
            deadline = time.monotonic() + float(req.get("timeout", 1.0))
            changes: list[dict[str, Any]] = []
            while len(changes) < int(req.get("min", 1)):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.source], [], [], left)[0]:
                    break
                changes.extend(change_json(c) for c in self.source.read())
            return {"changes": changes}
        raise ValueError(f"unknown op {op!r}")

    def close(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait()


def main() -> int:
    driver = Driver()
    print(json.dumps({"ready": True, "root": driver.testbed.get_root_dir()}), flush=True)
    try:
        for line in sys.stdin:
            req = json.loads(line)
            if req["op"] == "quit":
                break
            try:
                reply = driver.handle(req)
            except Exception as exc:  # reported to the test, which fails with it
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    finally:
        driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
