"""The umockdev side of the latency and storm benchmarks; bench/bench_latency.py runs it as

    ip netns exec NS umockdev-wrapper python bench/_umockdev_worker.py MODE JSON

so that libudev in this process (and in its children) sees a umockdev testbed whose uevents are
real libudev monitor messages. It prints one JSON line of results.

latency   the testbed and an in-process daemon in one thread: flip a GPU's PCI_ID between an
          NVIDIA and an Intel value, send a "change" uevent, run the daemon's loop until the
          reconciler has decided; time from just before the uevent is sent to the decision.
          Then the baseline: the same flip and uevent, and a fresh `runtime-modules explain`
          process deciding the same (what a udev RUN+= hook would do), to its exit.
storm     the testbed in this process, the daemon in a child process (``daemon`` mode) on the
          fake machine; this process sends N uevents as fast as umockdev can while the child
          reads; the child reports how fast it got through them and what it applied. The GPU
          starts as an Intel one (the rule does not hold, nothing is applied) and its PCI_ID
          flips between Intel and NVIDIA every N/100 uevents, ending NVIDIA: only a daemon that
          followed the storm to its end (or re-enumerated after an overrun) applies "gaming".
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

NVIDIA, INTEL = "10DE:1DB2", "8086:1533"
# How many blocks of uevents the storm sends, the GPU's PCI_ID alternating from one to the next.
FLIPS = 100
GPU_RULE = """
[[rule]]
name = "egpu"
modules = ["gaming"]
settle = "{settle}"
linger = "{linger}"
[rule.when.device]
subsystem = "pci"
properties = {{ PCI_ID = "10DE:*" }}
"""


def _settings(args: dict[str, Any]) -> Any:
    from runtime_modules._settings import settings_from_env

    return settings_from_env()


def _daemon(args: dict[str, Any], **kwargs: Any) -> Any:
    from runtime_modules._daemon import Daemon
    from runtime_modules._journal import Journal
    from runtime_modules._reconciler import Reconciler

    rules = Path(args["rules"])
    return Daemon(
        _settings(args),
        rules=[rules],
        journal=Journal(socket_path=Path("/nonexistent"), stderr=open(os.devnull, "w")),
        reconciler=Reconciler(quiet=0.05, backoff=0.2, backoff_cap=0.4),
        **kwargs,
    )


def latency(args: dict[str, Any]) -> dict[str, Any]:
    tb = UMockdev.Testbed.new()
    os.environ["UMOCKDEV_DIR"] = tb.get_root_dir()
    gpu = tb.add_device("pci", "gpu0", None, [], ["PCI_ID", INTEL, "PCI_CLASS", "30000"])
    Path(args["rules"]).write_text(GPU_RULE.format(settle="1h", linger="1h"))
    decided: list[Any] = []
    daemon = _daemon(args, on_decision=decided.append)
    daemon.start()
    samples: list[tuple[float, float]] = []
    value = INTEL
    try:
        for _ in range(int(args["events"])):
            value = NVIDIA if value == INTEL else INTEL
            tb.set_property(gpu, "PCI_ID", value)
            before = len(decided)
            t0 = time.monotonic()
            tb.uevent(gpu, "change")
            while len(decided) == before:
                daemon.step(5.0)
            d = decided[-1]
            samples.append((d.received - t0, d.decided - t0))
    finally:
        daemon.close()
    spawn: list[float] = []
    env = {**os.environ}
    argv = [sys.executable, "-m", "runtime_modules", "explain", "--rules", args["rules"], "gaming"]
    for _ in range(int(args["spawns"])):
        value = NVIDIA if value == INTEL else INTEL
        tb.set_property(gpu, "PCI_ID", value)
        t0 = time.monotonic()
        tb.uevent(gpu, "change")  # what would start the hook; nobody else listens now
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        spawn.append(time.monotonic() - t0)
        if done.returncode != 0 or "gaming" not in done.stdout:
            raise RuntimeError(f"explain failed: {done.stdout}{done.stderr}")
    return {
        "received": [r for r, _ in samples],
        "decided": [d for _, d in samples],
        "spawn": spawn,
    }


def storm(args: dict[str, Any]) -> dict[str, Any]:
    tb = UMockdev.Testbed.new()
    os.environ["UMOCKDEV_DIR"] = tb.get_root_dir()
    gpu = tb.add_device("pci", "gpu0", None, [], ["PCI_ID", INTEL, "PCI_CLASS", "30000"])
    tb.add_device("pci", "nic0", None, [], ["PCI_ID", INTEL])
    Path(args["rules"]).write_text(GPU_RULE.format(settle="0.2s", linger="1s"))
    child = subprocess.Popen(
        [sys.executable, __file__, "daemon", json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError("the daemon child did not start")
    n = int(args["events"])
    block = max(1, n // FLIPS)
    blocks = -(-n // block)
    retries = flips = 0
    value = INTEL
    t0 = time.monotonic()
    for i in range(n):
        if i % block == 0:
            # Blocks alternate so that the last one is NVIDIA: the storm ends with the rule true.
            wanted = NVIDIA if (blocks - 1 - i // block) % 2 == 0 else INTEL
            if wanted != value:
                value = wanted
                tb.set_property(gpu, "PCI_ID", value)
                flips += 1
        while True:
            try:
                tb.uevent(gpu, "change")
                break
            except gi.repository.GLib.Error:  # the reader's queue is full: let it catch up
                retries += 1
                time.sleep(0.0005)
    injected = time.monotonic() - t0
    child.stdin.write("sent\n")
    child.stdin.flush()
    result = json.loads(child.stdout.readline())
    child.wait(30)
    result.update(inject_s=injected, inject_retries=retries, inject_start=t0, flips=flips)
    return result


def daemon_child(args: dict[str, Any]) -> None:
    """The daemon side of ``storm``: report how it got through the uevents."""
    from runtime_modules._daemon import WorldChanged

    batches: list[tuple[float, int]] = []

    def listen(notice: Any) -> None:
        if isinstance(notice, WorldChanged):
            batches.append((time.monotonic(), len(notice.changes)))

    daemon = _daemon(args)
    daemon.subscribe(listen)
    daemon.start()
    n = int(args["events"])
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    print("ready", flush=True)
    daemon.run_until(lambda: daemon.stats["udev_changes"] >= n, 120)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    last = time.monotonic()
    daemon.run_until(lambda: daemon.applied == {"gaming"} and daemon.wait_time() is None, 60)
    end = time.monotonic()
    while time.monotonic() - end < 1.5:  # past linger and quiet: nothing more must happen
        daemon.step(0.2)
    sys.stdin.readline()
    print(
        json.dumps(
            {
                "events": daemon.stats["udev_changes"],
                "batches": len(batches),
                "first": batches[0][0] if batches else None,
                "last": last,
                "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
                "resyncs": daemon.stats["resyncs"],
                "applies": daemon.stats["applies"],
                "applied": sorted(daemon.applied),
            }
        ),
        flush=True,
    )
    daemon.close()


def main() -> int:
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    if mode == "daemon":
        daemon_child(args)
        return 0
    result = latency(args) if mode == "latency" else storm(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
