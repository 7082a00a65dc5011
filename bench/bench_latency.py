"""Benchmarks 1 and 2: decision latency, and a storm of uevents.

    python bench/bench_latency.py [--events 10000] [--spawns 200] [--veth 2000] [--hooks 100]

1. From a uevent leaving the kernel side to the reconciler's decision, in the running daemon:
   (a) umockdev injects a "change" uevent into a real libudev monitor (bench/_umockdev_worker.py);
   (b) a real veth appears or goes (netlink request to the kernel), real udevd runs its rules and
       sends the event the daemon's monitor gets. Side by side, the same decisions made the way a
       udev ``RUN+=`` hook makes them: a fresh ``runtime-modules explain`` process per event,
       (a) spawned right after the umockdev uevent, (b) started by udevd itself from a RUN+= rule
       installed for the run, timed to the hook's end.
2. 10,000 uevents as fast as umockdev sends them to a daemon applying with the fake
   ``nixos-rebuild``, the GPU flipping between Intel and NVIDIA and ending NVIDIA: events per
   second, daemon CPU per event, resyncs, the set applied at the end and rebuilds made.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    REPO,
    Section,
    fake_system,
    last_json,
    met,
    netns,
    starts,
    summary_ms,
)

WORKER = REPO / "bench" / "_umockdev_worker.py"


def _worker(mode: str, args: dict[str, Any], env: dict[str, str], ns: str) -> dict[str, Any]:
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "umockdev-wrapper",
            PYTHON,
            str(WORKER),
            mode,
            json.dumps(args),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return last_json(done.stdout)


def _raise_qlen(ns: str) -> None:
    # umockdev delivers uevents as Unix datagrams; the receiver's queue is this per-namespace
    # sysctl (10 by default): raised in our own namespace so a storm queues as kernel events do.
    subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.unix.max_dgram_qlen=1000000"],
        check=True,
    )


def umockdev_runs(root: Path, events: int, spawns: int, storm: int) -> dict[str, Any]:
    fake = fake_system(root / "fake")
    env = {**os.environ, **fake.env, "PYTHONPATH": str(REPO)}
    with netns() as ns:
        _raise_qlen(ns)
        lat = _worker(
            "latency",
            {"rules": str(root / "lat.toml"), "events": events, "spawns": spawns},
            env,
            ns,
        )
        st = _worker("storm", {"rules": str(root / "storm.toml"), "events": storm}, env, ns)
    st["rebuilds"] = starts(fake.record_file)
    return {"latency": lat, "storm": st}


VETH_RULE = """
[[rule]]
name = "bench-nic"
modules = ["virtualization"]
settle = "1h"
linger = "1h"
[rule.when.device]
subsystem = "net"
sysname = "{prefix}*"
"""


def veth_runs(root: Path, count: int, hooks: int) -> dict[str, Any]:
    """Real veths through real udevd: the daemon in this process, then RUN+= hooks."""
    from pyroute2 import IPRoute

    from runtime_modules._daemon import Daemon, DecisionTimes
    from runtime_modules._journal import Journal

    fake = fake_system(root / "veth")
    prefix = f"rb{uuid.uuid4().hex[:4]}"
    rules = root / "veth.toml"
    rules.write_text(VETH_RULE.format(prefix=prefix))
    decided: list[DecisionTimes] = []
    daemon = Daemon(
        fake.settings,
        rules=[rules],
        journal=Journal(socket_path=Path("/nonexistent"), stderr=open(os.devnull, "w")),  # noqa: SIM115
        on_decision=decided.append,
    )
    daemon.start()
    ipr = IPRoute()
    samples: list[float] = []
    woke: list[float] = []
    name, peer = f"{prefix}a", f"{prefix}p"
    try:
        for i in range(count):
            before = len(decided)
            t0 = time.monotonic()
            if i % 2 == 0:
                ipr.link("add", ifname=name, kind="veth", peer=peer)
            else:
                ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
            deadline = t0 + 10
            while len(decided) == before and time.monotonic() < deadline:
                daemon.step(1.0)
            if len(decided) > before:
                samples.append(decided[before].decided - t0)
                woke.append(decided[before].received - t0)
    finally:
        for ifname in (name, peer):
            idx = ipr.link_lookup(ifname=ifname)
            if idx:
                ipr.link("del", index=idx[0])
        daemon.close()

    # The baseline: udevd starts a fresh process per event from a RUN+= rule, as autorandr does.
    done_file = root / "hook-done.txt"
    hook = root / "hook.sh"
    hook.write_text(
        "#!/bin/sh\n"
        f"{PYTHON} -m runtime_modules --registry {fake.settings.registry} explain "
        f"--rules {rules} virtualization >/dev/null 2>&1\n"
        f'echo "$1 $(date +%s.%N)" >> {done_file}\n'
    )
    hook.chmod(0o755)
    rule_file = Path("/run/udev/rules.d") / f"99-{prefix}-bench-hook.rules"
    rule_file.parent.mkdir(parents=True, exist_ok=True)
    rule_file.write_text(
        f'ACTION=="add", SUBSYSTEM=="net", KERNEL=="{prefix}h*", RUN+="{hook} $kernel"\n'
    )
    subprocess.run(["udevadm", "control", "--reload"], check=True)
    hook_samples: list[float] = []
    try:
        for i in range(hooks):
            ifname = f"{prefix}h{i}"
            t0 = time.time()
            ipr.link("add", ifname=ifname, kind="veth", peer=f"{prefix}q{i}")
            deadline = time.monotonic() + 30
            end = None
            while end is None and time.monotonic() < deadline:
                time.sleep(0.002)
                if done_file.exists():
                    for line in done_file.read_text().splitlines():
                        who, _, when = line.partition(" ")
                        if who == ifname:
                            end = float(when)
            ipr.link("del", index=ipr.link_lookup(ifname=ifname)[0])
            if end is not None:
                hook_samples.append(end - t0)
    finally:
        rule_file.unlink(missing_ok=True)
        subprocess.run(["udevadm", "control", "--reload"], check=False)
        ipr.close()
    return {"decided": samples, "woke": woke, "hooks": hook_samples, "lost": count - len(samples)}


def sections(u: dict[str, Any], v: dict[str, Any]) -> list[Section]:
    lat, st = u["latency"], u["storm"]
    ours = summary_ms(lat["decided"])
    recv = summary_ms(lat["received"])
    spawn = summary_ms(lat["spawn"])
    vours = summary_ms(v["decided"])
    vhook = summary_ms(v["hooks"]) if v["hooks"] else None
    s1 = Section(
        "1. Decision latency",
        "p99 ≤ 2 ms from the uevent to the decision, and ≥ 50x faster than a process per event",
    )
    ratio = spawn["p50"] / ours["p50"]
    s1.rows += [
        (
            f"umockdev uevent → decision, p50 / p99 / max (n = {ours['n']:,})",
            f"{ours['p50']:.3f} / {ours['p99']:.3f} / {ours['max']:.2f} ms",
            f"{spawn['p50']:.0f} / {spawn['p99']:.0f} / {spawn['max']:.0f} ms (n = {spawn['n']})",
            "p99 ≤ 2 ms",
            met(ours["p99"] <= 2.0),
        ),
        (
            "… of which uevent → daemon woke, p50 / p99",
            f"{recv['p50']:.3f} / {recv['p99']:.3f} ms",
            "",
            "",
            "",
        ),
        ("umockdev: how much faster (p50)", f"{ratio:,.0f}x", "1x", "≥ 50x", met(ratio >= 50)),
        (
            f"real veth through udevd → decision, p50 / p99 / max (n = {vours['n']:,})",
            f"{vours['p50']:.2f} / {vours['p99']:.2f} / {vours['max']:.1f} ms",
            (
                f"{vhook['p50']:.0f} / {vhook['p99']:.0f} / {vhook['max']:.0f} ms "
                f"(n = {vhook['n']})"
                if vhook
                else "n/a"
            ),
            "p99 ≤ 2 ms",
            met(vours["p99"] <= 2.0),
        ),
    ]
    vwoke = summary_ms(v["woke"])
    ownv = summary_ms([d - w for d, w in zip(v["decided"], v["woke"], strict=True)])
    s1.rows.append(
        (
            "… of which netlink request → udevd's message woke the daemon, p50 / p99",
            f"{vwoke['p50']:.2f} / {vwoke['p99']:.2f} ms",
            "(the same udevd work precedes the hook)",
            "",
            "",
        )
    )
    s1.rows.append(
        (
            "… and the daemon's own part (woke → decided), p50 / p99 / max",
            f"{ownv['p50']:.3f} / {ownv['p99']:.3f} / {ownv['max']:.2f} ms",
            "",
            "p99 ≤ 2 ms",
            met(ownv["p99"] <= 2.0),
        )
    )
    if vhook:
        vr = vhook["p50"] / vours["p50"]
        s1.rows.append(("veth: how much faster (p50)", f"{vr:,.0f}x", "1x", "≥ 50x", met(vr >= 50)))
    s1.notes += [
        "- umockdev: a GPU's `PCI_ID` flips between NVIDIA and Intel and a `change` uevent is "
        "sent; each one moves a rule's truth, so each is a decision (settle is 1 h: nothing "
        "applies). "
        "The clock starts just before umockdev sends the uevent and stops when the reconciler has "
        "answered (`Daemon.on_decision`).",
        "- Baseline (umockdev): after the same uevent, `python -m runtime_modules explain --rules "
        "… gaming` in a fresh process (the decision a hook would make: enumerate, evaluate, "
        "print), to its exit; measured on a smaller sample because each costs a whole interpreter "
        "start.",
        "- Real veth: a netlink request creates (or deletes) a veth pair; the kernel's uevent goes "
        "through the real udevd (its rules, then its monitor message) to the daemon's monitor. "
        "Add and remove alternate; both are decisions. Most of this figure is udevd's own "
        "work on the event, before our monitor sees it.",
        "- Baseline (veth): a `RUN+=` rule installed for the run makes udevd start a fresh "
        "`runtime-modules explain` for each new veth, as autorandr's hook does; timed from the "
        "netlink request to the hook's last line (wall clock).",
    ]
    if vours["p99"] > 2.0:
        s1.notes.append(
            f"- Missed on the veth path, and what bounds it: the daemon's own part (woke → "
            f"decided) has a p99 of {ownv['p99']:.2f} ms; the rest, {vwoke['p50']:.1f} ms at p50 "
            "and more at p99, passes before our monitor gets anything: the kernel's uevent, then "
            "udevd running its rules for a new network device (link setup, naming, the "
            "database) and only then sending its monitor message. It is outside the daemon, "
            "and a `RUN+=` hook waits for the same work before it even starts. The daemon was "
            "not profiled for it (py-spy, bench/requirements.lock): its share is measured "
            "directly above."
        )
    if v["lost"]:
        s1.notes.append(f"- {v['lost']} veth events gave no decision within 10 s (left out).")
    n = st["events"]
    # Recovered: the re-enumeration ended on the set the storm's last uevents want, applied once.
    resyncs = st["resyncs"]
    right = st["applied"] == ["gaming"] and st["rebuilds"] == 1
    overrun = "0" if resyncs == 0 else f"{resyncs}, " + ("recovered" if right else "NOT recovered")
    wall = st["last"] - st["inject_start"]
    rate = n / wall
    capacity = n / st["cpu_s"] if st["cpu_s"] else float("inf")
    s2 = Section(
        "2. Throughput: a storm of uevents",
        "≥ 20,000 events/s processed; no overrun, or one recovered by re-enumeration with the "
        "right final set; exactly one apply",
        header=("measure", "runtime-modules", "target", "met"),
    )
    s2.rows += [
        ("uevents injected by umockdev, processed", f"{n:,}", "10,000", met(n >= 10_000)),
        (
            "processed per second (first sent to last decided, wall)",
            f"{rate:,.0f}/s",
            "≥ 20,000/s",
            met(rate >= 20_000),
        ),
        ("umockdev's own sending rate", f"{n / st['inject_s']:,.0f}/s", "", ""),
        (
            "daemon CPU per event → capacity",
            f"{st['cpu_s'] / n * 1e6:.1f} µs → {capacity:,.0f}/s",
            "≥ 20,000/s",
            met(capacity >= 20_000),
        ),
        ("batches (loop wake-ups) for those events", f"{st['batches']:,}", "", ""),
        ("sends umockdev retried (reader's queue full)", f"{st['inject_retries']:,}", "", ""),
        ("GPU vendor flips during the storm (Intel ↔ NVIDIA)", f"{st['flips']:,}", "", ""),
        ("re-enumerations (overrun)", overrun, "0, or recovered", met(resyncs == 0 or right)),
        (
            "nixos-rebuild runs (the fake's record)",
            str(st["rebuilds"]),
            "1",
            met(st["rebuilds"] == 1),
        ),
        (
            "set applied at the end",
            "{" + ", ".join(st["applied"]) + "}",
            "{gaming}",
            met(st["applied"] == ["gaming"]),
        ),
    ]
    s2.notes += [
        "- The GPU starts as an Intel one, so the rule does not hold and nothing is applied at "
        "start; during the storm its `PCI_ID` alternates between Intel and NVIDIA in blocks of "
        "uevents, the last block NVIDIA. The set applied at the end is `{gaming}`, with one "
        "rebuild, only if the daemon followed the storm to its last uevent (or re-enumerated "
        "after an overrun and found the GPU as it is now).",
        "- The daemon (a child of the injector, sharing its testbed) reads while umockdev sends; "
        "the wall rate is therefore bounded by how fast umockdev sends (it is a Python loop "
        "calling `Testbed.uevent`), which is why the daemon's CPU time per event is shown too: "
        "it is what the daemon could sustain with a faster sender.",
        "- An overrun with the real kernel socket and its recovery (re-enumeration, right final "
        "set, one apply) is shown by the reliability suite "
        "(`test_udev_overrun_at_the_daemon_ends_on_the_right_set`, "
        "`test_netlink_overrun_is_recovered_by_re_enumeration`).",
    ]
    return [s1, s2]


def run(events: int, spawns: int, veth: int, hooks: int, storm: int) -> list[Section]:
    with tempfile.TemporaryDirectory(prefix="rm-bench-") as tmp:
        root = Path(tmp)
        u = umockdev_runs(root, events, spawns, storm)
        v = veth_runs(root, veth, hooks)
    return sections(u, v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--spawns", type=int, default=200)
    p.add_argument("--veth", type=int, default=2_000)
    p.add_argument("--hooks", type=int, default=100)
    p.add_argument("--storm", type=int, default=10_000)
    a = p.parse_args(argv)
    for s in run(a.events, a.spawns, a.veth, a.hooks, a.storm):
        print(s.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
