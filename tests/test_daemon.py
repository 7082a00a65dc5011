"""The daemon with real parts: netlink in a namespace of the test's, umockdev uevents through a
real libudev monitor, the real applier against the fake nixos-rebuild, and real journald.

In-process tests drive ``Daemon.step``; the umockdev ones run ``runtime-modules watch`` itself
under the testbed driver and watch it from outside (notify socket, state file, the fake's
record of nixos-rebuild runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from runtime_modules._daemon import ActionTaken, ApplyDone, Daemon, DecisionTimes, Notice
from runtime_modules._journal import Journal, JournalEvent
from runtime_modules._notify import Notifier
from runtime_modules._reconciler_events import StartApply
from runtime_modules._state import load_state
from tests.fixtures.applier import FakeSystem
from tests.fixtures.daemon import LINK_RULE, NotifyListener, UmockdevBed
from tests.fixtures.system import REPO, eventually, ip_netns, journal_entries

pytestmark = pytest.mark.root


def _rule(settle: float = 0.2, linger: float = 1.0) -> str:
    return LINK_RULE.format(settle=settle, linger=linger)


def _veth(netns: str, up: bool) -> None:
    ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    if up:
        ip_netns(netns, "link", "set", "va", "up")
        ip_netns(netns, "link", "set", "vb", "up")


def _starts(fake: FakeSystem) -> int:
    return len(fake.records("start"))


def _settle_down(daemon: Daemon, seconds: float) -> None:
    """Let the daemon run for ``seconds`` whatever happens (to show that nothing more does)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        daemon.step(left)


# --- in-process: netlink in the test's namespace ------------------------------------------------


def test_idle_daemon_has_no_timer_at_all(make_daemon: Any, netns: str) -> None:
    daemon = make_daemon(_rule(settle=0.1, linger=0.2), notifier=Notifier({}))
    assert daemon.wait_time() is None  # nothing pending: select() blocks with no timeout
    _veth(netns, up=True)
    daemon.run_until(lambda: daemon.wait_time() is not None, 5)
    assert daemon.wait_time() is not None  # settling: one timer, for the settle deadline
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 10)
    assert daemon.run_until(lambda: daemon.wait_time() is None, 5), daemon.snapshot()
    ip_netns(netns, "link", "set", "vb", "down")  # va goes down: linger, then an apply
    assert daemon.run_until(lambda: daemon.applied == frozenset(), 10)
    assert daemon.run_until(lambda: daemon.wait_time() is None, 5), daemon.snapshot()


def test_link_up_applies_once_after_settle(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    decisions: list[DecisionTimes] = []
    daemon = make_daemon(_rule(settle=0.3), on_decision=decisions.append)
    _veth(netns, up=True)
    up_at = time.time()
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 10)
    (start,) = fake_system.records("start")
    assert start["time"] - up_at >= 0.3  # not before the settle
    assert load_state(fake_system.settings).applied == {"virtualization"}
    assert decisions and all(d.decided >= d.received for d in decisions)
    _settle_down(daemon, 0.5)
    assert _starts(fake_system) == 1


_ADDRESS_RULE = """
[[rule]]
name = "lab-network"
modules = ["podman"]
settle = "0.1s"
linger = "0.3s"
[rule.when.link]
operstate = "up"
ip = ["10.20.0.0/16", "fd00:20::/48"]
"""


def test_an_address_in_the_lab_network_brings_the_module(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    _veth(netns, up=True)
    daemon = make_daemon(_ADDRESS_RULE)
    assert daemon.sources.needs.addresses  # the rule tests addresses: the groups are joined
    _settle_down(daemon, 0.3)
    assert daemon.applied == frozenset()  # up, but no address in the network yet
    ip_netns(netns, "addr", "add", "10.21.0.5/16", "dev", "va")  # another network
    _settle_down(daemon, 0.3)
    assert daemon.applied == frozenset() and _starts(fake_system) == 0
    ip_netns(netns, "addr", "add", "10.20.0.5/16", "dev", "va")
    assert daemon.run_until(lambda: daemon.applied == {"podman"}, 10)
    # Link messages (a carrier change, a rename) keep the address: nothing churns.
    ip_netns(netns, "link", "set", "va", "mtu", "1400")
    _settle_down(daemon, 0.5)
    assert daemon.applied == {"podman"} and _starts(fake_system) == 1
    ip_netns(netns, "addr", "del", "10.20.0.5/16", "dev", "va")
    assert daemon.run_until(lambda: daemon.applied == frozenset(), 10)
    assert _starts(fake_system) == 2


def test_a_restart_sees_the_addresses_present(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    _veth(netns, up=True)
    ip_netns(netns, "addr", "add", "fd00:20::5/64", "dev", "vb", "nodad")
    daemon = make_daemon(_ADDRESS_RULE)  # coldplug dumps the addresses with the links
    assert daemon.run_until(lambda: daemon.applied == {"podman"}, 10)
    daemon.close()
    again = make_daemon(_ADDRESS_RULE)
    _settle_down(again, 0.5)
    assert again.applied == {"podman"} and _starts(fake_system) == 1  # present: nothing to apply


def test_a_reload_that_adds_an_address_rule_starts_following_addresses(
    make_daemon: Any, netns: str, fake_system: FakeSystem, tmp_path: Path
) -> None:
    _veth(netns, up=True)
    ip_netns(netns, "addr", "add", "10.20.0.5/16", "dev", "va")
    daemon = make_daemon(_rule())
    assert not daemon.sources.needs.addresses  # no rule tests addresses: none are read
    assert all(not link.addresses for link in daemon.world.links.values())
    (tmp_path / "rules.toml").write_text(_ADDRESS_RULE)
    daemon.signal(signal.SIGHUP)
    # New monitors with the address groups, and a dump that brings the present address.
    assert daemon.run_until(lambda: daemon.applied == {"podman"}, 10)
    assert daemon.sources.needs.addresses
    ip_netns(netns, "addr", "del", "10.20.0.5/16", "dev", "va")  # and its events from now on
    assert daemon.run_until(lambda: daemon.applied == frozenset(), 10)


def test_nic_flapping_fifty_times_makes_at_most_one_apply(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    _veth(netns, up=False)
    ip_netns(netns, "link", "set", "va", "up")
    daemon = make_daemon(_rule(settle=0.3, linger=1.0))
    # 50 flaps in 5 s: the peer goes down and up every 0.1 s, so va is up 50 ms at a time.
    script = (
        "for i in $(seq 50); do "
        f"ip -n {netns} link set vb down; sleep 0.05; ip -n {netns} link set vb up; sleep 0.05; "
        "done"
    )
    flapper = subprocess.Popen(["sh", "-c", script])
    try:
        daemon.run_until(lambda: flapper.poll() is not None, 20)
    finally:
        flapper.wait()
    assert daemon.stats["netlink_changes"] >= 100  # the flapping reached the daemon
    _settle_down(daemon, 1.0)  # it ends up, so the module ends up applied: by one apply at most
    assert _starts(fake_system) <= 1
    assert daemon.applied == {"virtualization"}


def test_restart_with_everything_present_applies_nothing(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    _veth(netns, up=True)
    first = make_daemon(_rule(settle=0.1))
    assert first.run_until(lambda: first.applied == {"virtualization"}, 10)
    first.stop()
    first.close()
    assert _starts(fake_system) == 1

    second = make_daemon()
    _settle_down(second, 0.6)  # past settle and quiet: an apply would have started
    assert _starts(fake_system) == 1
    snapshot = second.snapshot()
    assert snapshot.applied == snapshot.wanted == {"virtualization"}


def test_a_switch_from_outside_brings_the_wanted_set_back(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    _veth(netns, up=True)
    daemon = make_daemon(_rule(settle=0.1))
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 10)
    _settle_down(daemon, 0.5)  # our own activation moved the link: that is no switch from outside
    assert _starts(fake_system) == 1
    # `nixos-rebuild switch` of the base, by hand: the link is replaced by one to the base.
    link = fake_system.settings.current_system
    fresh = link.with_name(link.name + ".new")
    fresh.symlink_to(fake_system.initial_system)
    fresh.replace(link)
    assert daemon.run_until(lambda: _starts(fake_system) == 2 and daemon.applying is None, 10), (
        "the daemon did not notice the switch"
    )
    assert daemon.applied == {"virtualization"}
    assert fake_system.current_imports() == ["virtualization"]
    _settle_down(daemon, 0.5)
    assert _starts(fake_system) == 2


def test_a_switch_from_outside_during_our_apply_is_looked_at_when_it_ends(
    make_daemon: Any, netns: str, fake_system: FakeSystem, tmp_path: Path
) -> None:
    # A post-apply hook runs after our activation, while the apply still runs: there, once,
    # the base is switched to by hand, and the hook waits so that the daemon sees the switch
    # before the apply's end.
    link = fake_system.settings.current_system
    hook = fake_system.settings.hooks_dir / "post-apply.d" / "10-switch-by-hand"
    hook.parent.mkdir(parents=True)
    done = tmp_path / "switched"
    hook.write_text(
        "#!/bin/sh\n"
        f"[ -e {done} ] && exit 0\n"
        f"touch {done}\n"
        f"ln -sfn {fake_system.initial_system} {link}.new && mv -T {link}.new {link}\n"
        "sleep 0.5\n"
    )
    hook.chmod(0o755)
    _veth(netns, up=True)
    daemon = make_daemon(_rule(settle=0.1))
    assert daemon.run_until(done.exists, 10)
    assert daemon.run_until(lambda: _starts(fake_system) == 2 and daemon.applying is None, 10), (
        "the switch during the apply was forgotten"
    )
    assert daemon.applied == {"virtualization"}
    assert fake_system.current_imports() == ["virtualization"]
    said = fake_system.stderr.getvalue()
    assert "taking the base system as applied, the wanted set is applied again" in said
    _settle_down(daemon, 0.5)
    assert _starts(fake_system) == 2


@pytest.mark.usefixtures("journald")
def test_a_system_switched_while_the_daemon_was_away_is_journaled_as_drift(
    make_daemon: Any, netns: str, fake_system: FakeSystem, journal_tag: str
) -> None:
    _veth(netns, up=True)
    first = make_daemon(_rule(settle=0.1))
    assert first.run_until(lambda: first.applied == {"virtualization"}, 10)
    first.stop()
    first.close()
    link = fake_system.settings.current_system
    fresh = link.with_name(link.name + ".new")
    fresh.symlink_to(fake_system.initial_system)
    fresh.replace(link)  # `nixos-rebuild switch` of the base, by hand, while no daemon ran
    second = make_daemon(journal=Journal(identifier=journal_tag))
    assert second.run_until(lambda: _starts(fake_system) == 2 and second.applying is None, 10)
    assert fake_system.current_imports() == ["virtualization"]
    (entry,) = journal_entries(
        SYSLOG_IDENTIFIER=journal_tag, MESSAGE_ID=JournalEvent.SYSTEM_DRIFTED.message_id
    )
    assert entry["PRIORITY"] == "4"  # warning
    assert entry["MESSAGE"].startswith("the applied set is uncertain (the running system ")
    assert entry["MESSAGE"].endswith("): rebuilding the wanted set")
    assert "switched outside runtime-modules" in entry["RUNTIME_MODULES_PROBLEM"]
    assert entry["RUNTIME_MODULES_APPLIED"] == "virtualization"  # what the state file said
    assert entry["RUNTIME_MODULES_SYSTEM"] == str(fake_system.initial_system.resolve())
    scheduled = journal_entries(
        SYSLOG_IDENTIFIER=journal_tag, MESSAGE_ID=JournalEvent.APPLY_SCHEDULED.message_id
    )
    assert not [e for e in scheduled if "uncertain" in e["MESSAGE"]]


@pytest.mark.usefixtures("journald")
def test_broken_rules_on_sighup_keep_the_old_ones_and_say_why(
    make_daemon: Any, netns: str, journal_tag: str, tmp_path: Path
) -> None:
    daemon = make_daemon(_rule(settle=0.1), journal=Journal(identifier=journal_tag))
    (tmp_path / "rules.toml").write_text('[[rule]]\nname = "x"\nmodules = "not a list"\n')
    daemon.signal(signal.SIGHUP)
    daemon.step(1)
    assert [r.name for r in daemon.rules.rules] == ["lab-link-up"]
    entries = journal_entries(
        SYSLOG_IDENTIFIER=journal_tag, MESSAGE_ID=JournalEvent.RULES_REJECTED.message_id
    )
    assert len(entries) == 1
    assert "rules.toml" in entries[0]["MESSAGE"] and "keeping the 1 loaded" in entries[0]["MESSAGE"]
    # `status` says it too, until a reload works: the files on disk are not what runs.
    (warning,) = [w for w in daemon.control.status()["warnings"] if "reload" in w]
    assert warning.startswith("a reload at ") and "rules.toml: rule x: modules: " in warning
    assert warning.endswith("fix it, then reload again (`systemctl reload runtime-modules`)")
    # ... and the old rules still work
    _veth(netns, up=True)
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 10)

    (tmp_path / "rules.toml").write_text(_rule(settle=0.1).replace("lab-link-up", "renamed"))
    daemon.signal(signal.SIGHUP)
    daemon.step(1)
    assert [r.name for r in daemon.rules.rules] == ["renamed"]
    assert not [w for w in daemon.control.status()["warnings"] if "reload" in w]
    assert journal_entries(
        SYSLOG_IDENTIFIER=journal_tag, MESSAGE_ID=JournalEvent.RULES_RELOADED.message_id
    )


def test_failing_apply_backs_off_then_succeeds(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    fake_system.control(mode="fail")
    daemon = make_daemon(_rule(settle=0.1))
    _veth(netns, up=True)
    assert daemon.run_until(lambda: daemon.stats["failed_applies"] >= 2, 10)
    fake_system.control(mode="ok")
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 10)
    starts = [r["time"] for r in fake_system.records("start")]
    assert len(starts) >= 3
    # backoff 0.2 s, then 0.4 s (the cap): each retry waits at least the delay
    assert starts[1] - starts[0] >= 0.2 and starts[2] - starts[1] >= 0.4
    assert load_state(fake_system.settings).applied == {"virtualization"}


def test_sigterm_during_an_apply_cancels_and_rolls_back(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    fake_system.control(mode="hang")
    daemon = make_daemon(_rule(settle=0.1), stop_timeout=0.3)
    _veth(netns, up=True)
    assert daemon.run_until(lambda: bool(fake_system.records("hang")), 10)
    daemon.signal(signal.SIGTERM)
    assert daemon.run_until(lambda: daemon.stopped, 30)
    state = load_state(fake_system.settings)
    assert state.applied == frozenset() and state.in_progress is None
    assert fake_system.current() == fake_system.initial_system.resolve()


def test_status_keeps_the_stop_message_while_an_apply_finishes(
    make_daemon: Any, netns: str, fake_system: FakeSystem, notify_socket: NotifyListener
) -> None:
    fake_system.hold()
    daemon = make_daemon(_rule(settle=0.1), notifier=Notifier(notify_socket.env()))
    _veth(netns, up=True)
    assert daemon.run_until(lambda: daemon.applying == 1, 10)
    assert eventually(lambda: bool(fake_system.records("waiting")))  # the worker's thread
    daemon.signal(signal.SIGTERM)
    daemon.step(1)
    stopping = notify_socket.wait_for("STOPPING", "1")["STATUS"]
    assert stopping.startswith("stopping: waiting for apply #1")
    fake_system.release()
    assert daemon.run_until(lambda: daemon.stopped, 30)
    daemon.close()
    notify_socket.sock.settimeout(0.5)
    with contextlib.suppress(TimeoutError):  # whatever else was sent
        while True:
            notify_socket.messages.append({"raw": notify_socket.sock.recv(4096).decode()})
    after = notify_socket.messages[
        notify_socket.messages.index({"STOPPING": "1", "STATUS": stopping}) + 1 :
    ]
    assert not any("STATUS=" in m.get("raw", "") for m in after), after


def test_sigterm_lets_a_short_apply_finish(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    fake_system.control(sleep=0.5)
    done: list[Notice] = []
    daemon = make_daemon(_rule(settle=0.1), stop_timeout=20)
    daemon.subscribe(done.append)
    _veth(netns, up=True)
    assert daemon.run_until(lambda: bool(fake_system.records("evaluated")), 10)
    daemon.signal(signal.SIGTERM)
    assert daemon.run_until(lambda: daemon.stopped, 30)
    assert load_state(fake_system.settings).applied == {"virtualization"}
    assert [n.ok for n in done if isinstance(n, ApplyDone)] == [True]


def test_netlink_overrun_is_recovered_by_re_enumeration(
    make_daemon: Any, netns: str, fake_system: FakeSystem
) -> None:
    daemon = make_daemon(_rule(settle=0.1), netlink_receive_buffer=1)
    _veth(netns, up=False)
    for _ in range(10):  # far more than the smallest receive buffer holds, unread
        ip_netns(netns, "link", "set", "va", "up")
        ip_netns(netns, "link", "set", "va", "down")
    ip_netns(netns, "link", "set", "va", "up")
    ip_netns(netns, "link", "set", "vb", "up")
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 10)
    assert daemon.stats["resyncs"] >= 1
    assert _starts(fake_system) == 1


def test_watchdog_pings_at_half_the_period(make_daemon: Any, notify_socket: NotifyListener) -> None:
    notifier = Notifier({**notify_socket.env(), "WATCHDOG_USEC": "200000"})
    daemon = make_daemon(_rule(), notifier=notifier)
    notify_socket.wait_for("READY", "1")
    assert daemon.wait_time() is not None and daemon.wait_time() <= 0.1
    daemon.step(1)
    notify_socket.wait_for("WATCHDOG", "1", timeout=1)


def test_dry_run_prints_each_decision(
    make_daemon: Any, netns: str, fake_system: FakeSystem, tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    with out.open("w") as stream:
        daemon = make_daemon(_rule(settle=0.1, linger=0.2), dry_run=True, out=stream)
        _veth(netns, up=True)
        assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 10)
        ip_netns(netns, "link", "set", "vb", "down")
        assert daemon.run_until(lambda: daemon.applied == frozenset(), 10)
    lines = out.read_text().splitlines()
    text = "\n".join(lines)
    assert "rule lab-link-up holds (va)" in text
    assert "rule lab-link-up activated (va)" in text
    assert "apply #1 would start: {virtualization} (+virtualization)" in text
    assert "rule lab-link-up lingering" in text
    assert "apply #2 would start: {base system} (-virtualization)" in text
    assert _starts(fake_system) == 0  # nixos-rebuild never ran


def test_listeners_see_actions_in_order(make_daemon: Any, netns: str) -> None:
    seen: list[Notice] = []
    daemon = make_daemon(_rule(settle=0.1))
    daemon.subscribe(seen.append)
    _veth(netns, up=True)
    assert daemon.run_until(lambda: any(isinstance(n, ApplyDone) for n in seen), 10)
    kinds = [type(n.action).__name__ for n in seen if isinstance(n, ActionTaken)]
    assert kinds[:3] == ["RuleSettling", "RuleActivated", "ApplyScheduled"]
    assert kinds[-1] == "StartApply"
    starts = [n.action for n in seen if isinstance(n, ActionTaken)]
    assert sum(isinstance(a, StartApply) for a in starts) == 1


# --- out of process: `runtime-modules watch` under a umockdev testbed ---------------------------

GPU_RULE = """
[[rule]]
name = "egpu"
modules = ["gaming"]
settle = "0.3s"
linger = "1s"
[rule.when.device]
subsystem = "pci"
properties = { PCI_ID = "10DE:*" }
"""

DOCK_RULE = """
[[rule]]
name = "dock"
modules = ["virtualization"]
settle = "0.2s"
linger = "1.5s"
[rule.when.device]
subsystem = "usb"
properties = { PRODUCT = "2109/2822/*" }
"""


def _watch(
    bed: UmockdevBed,
    fake: FakeSystem,
    notify: NotifyListener,
    rules: str,
    tmp_path: Path,
) -> int:
    path = tmp_path / "rules.toml"
    path.write_text(rules)
    env = {**fake.env, **notify.env(), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "runtime_modules", "watch", "--rules", str(path)]
    pid = bed.spawn(argv, tmp_path / "watch.log", env=env)
    notify.wait_for("READY", "1")
    return pid


def _applied(fake: FakeSystem) -> frozenset[str]:
    return load_state(fake.settings).applied


def _stop(bed: UmockdevBed, pid: int) -> int:
    os.kill(pid, signal.SIGTERM)
    return int(bed.call("wait", pid=pid, timeout=30)["returncode"])


@pytest.mark.umockdev
def test_gpu_added_applies_gaming_once_after_settle(
    umockdev_bed: UmockdevBed,
    fake_system: FakeSystem,
    notify_socket: NotifyListener,
    tmp_path: Path,
) -> None:
    pid = _watch(umockdev_bed, fake_system, notify_socket, GPU_RULE, tmp_path)
    added = time.time()
    umockdev_bed.add("pci", "gpu0", properties={"PCI_ID": "10DE:1DB2", "PCI_CLASS": "30000"})
    assert eventually(lambda: _applied(fake_system) == {"gaming"})
    (start,) = fake_system.records("start")
    assert start["time"] - added >= 0.3
    # Idle (nothing applying, nothing next) with gaming applied: the decision is final; a
    # follow-up would have been scheduled when the apply ended, before this status.
    notify_socket.wait_for("STATUS", "1 rules (1 not inactive); applied: gaming")
    assert _stop(umockdev_bed, pid) == 0  # an apply started meanwhile would finish first
    assert _starts(fake_system) == 1
    notify_socket.wait_for("STOPPING", "1")


@pytest.mark.umockdev
def test_dock_replugged_within_linger_causes_no_churn(
    umockdev_bed: UmockdevBed,
    fake_system: FakeSystem,
    notify_socket: NotifyListener,
    tmp_path: Path,
) -> None:
    pid = _watch(umockdev_bed, fake_system, notify_socket, DOCK_RULE, tmp_path)
    hub = {"PRODUCT": "2109/2822/9013", "DEVTYPE": "usb_device"}
    dock = umockdev_bed.add("usb", "1-2", properties=hub)
    assert eventually(lambda: _applied(fake_system) == {"virtualization"})
    umockdev_bed.remove(dock)
    time.sleep(0.3)  # unplugged for a moment, well within the linger of 1.5 s
    umockdev_bed.add("usb", "1-2", properties=hub)
    # Churn would be decided at unplug + linger (1.5 s) + quiet (0.5 s, the default): wait
    # past it with a margin for a loaded machine. Then stop: an apply it started would finish
    # (and be recorded) before the daemon exits, so the fake's start-up is out of the window.
    time.sleep(1.5 + 0.5 + 1.5 - 0.3)
    assert _stop(umockdev_bed, pid) == 0
    assert _starts(fake_system) == 1
    assert _applied(fake_system) == {"virtualization"}


@pytest.mark.umockdev
def test_storm_of_one_thousand_uevents_makes_one_apply(
    umockdev_bed: UmockdevBed,
    fake_system: FakeSystem,
    notify_socket: NotifyListener,
    tmp_path: Path,
) -> None:
    pid = _watch(umockdev_bed, fake_system, notify_socket, GPU_RULE, tmp_path)
    gpu = umockdev_bed.add("pci", "gpu0", properties={"PCI_ID": "10DE:1DB2"})
    umockdev_bed.add("pci", "nic0", properties={"PCI_ID": "8086:1533"})
    umockdev_bed.uevent(gpu, "change", count=1000)
    assert eventually(lambda: _applied(fake_system) == {"gaming"})
    notify_socket.wait_for("STATUS", "1 rules (1 not inactive); applied: gaming")  # idle
    assert _stop(umockdev_bed, pid) == 0
    assert _starts(fake_system) == 1
    assert json.loads(json.dumps(fake_system.state_json()))["applied"] == ["gaming"]


@pytest.mark.umockdev
def test_events_show_the_udev_action_and_no_ancestor_upsert(
    umockdev_bed: UmockdevBed,
    fake_system: FakeSystem,
    notify_socket: NotifyListener,
    tmp_path: Path,
) -> None:
    import threading

    from runtime_modules._control_client import ControlClient
    from runtime_modules._control_protocol import Accepted, EventMessage, EventsRequest

    pid = _watch(umockdev_bed, fake_system, notify_socket, GPU_RULE, tmp_path)
    seen: list[EventMessage] = []
    subscribed = threading.Event()
    client = ControlClient(fake_system.settings.control_socket, idle_timeout=30)

    def listen() -> None:
        with contextlib.suppress(Exception):
            for answer in client.request(EventsRequest()):
                if isinstance(answer, Accepted):
                    subscribed.set()
                elif isinstance(answer, EventMessage) and answer.kind == "device":
                    seen.append(answer)

    threading.Thread(target=listen, daemon=True).start()
    assert subscribed.wait(10)
    bridge = umockdev_bed.add("pci", "bridge0", properties={"PCI_ID": "8086:1901"})
    # The GPU's first event brings its bridge along (for parent conditions): no event of its own.
    gpu = umockdev_bed.add("pci", "gpu0", parent=bridge, properties={"PCI_ID": "10DE:1DB2"})
    umockdev_bed.set_property(gpu, "DRIVER", "nvidia")
    umockdev_bed.uevent(gpu, "bind")
    umockdev_bed.uevent(gpu, "offline")
    # Added and bound at once (most likely one batch): still "add", then "bind".
    nic = umockdev_bed.add("pci", "nic0", properties={"PCI_ID": "8086:1533", "DRIVER": "igb"})
    umockdev_bed.uevent(nic, "bind")
    assert eventually(lambda: len(seen) >= 6)
    time.sleep(0.3)  # nothing more comes
    assert [(e.text, e.data["action"]) for e in seen] == [
        ("add /devices/bridge0 (pci)", "add"),
        ("add /devices/bridge0/gpu0 (pci)", "add"),
        ("bind /devices/bridge0/gpu0 (pci, driver nvidia)", "bind"),
        ("offline /devices/bridge0/gpu0 (pci, driver nvidia)", "offline"),
        ("add /devices/nic0 (pci, driver igb)", "add"),
        ("bind /devices/nic0 (pci, driver igb)", "bind"),
    ]
    assert eventually(lambda: _applied(fake_system) == {"gaming"})
    assert _stop(umockdev_bed, pid) == 0


# --- real udevd: a veth's uevent, classified by our udev rules, reaches the daemon ---------------


@pytest.fixture
def our_udev_rules(udevd: None) -> Any:
    """udev/90-runtime-modules.rules in effect, under a name of this test's own (removed after)."""
    target = Path("/run/udev/rules.d") / f"90-runtime-modules-test-{uuid.uuid4().hex[:8]}.rules"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "udev" / "90-runtime-modules.rules", target)
    subprocess.run(["udevadm", "control", "--reload"], check=True)
    try:
        yield target
    finally:
        target.unlink(missing_ok=True)
        subprocess.run(["udevadm", "control", "--reload"], check=False)


def test_real_veth_through_udevd_and_our_rules_reaches_the_daemon(
    make_daemon: Any, fake_system: FakeSystem, our_udev_rules: Path
) -> None:
    name = f"rmd{uuid.uuid4().hex[:8]}"
    rules = f"""
[[rule]]
name = "virtual-nic"
modules = ["virtualization"]
settle = "0.1s"
linger = "0.2s"
[rule.when.device]
subsystem = "net"
sysname = "{name}"
tags = ["runtime-modules"]
properties = {{ RUNTIME_MODULES_NET_BUS = "virtual" }}
"""
    daemon = make_daemon(rules)
    try:
        subprocess.run(
            ["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"], check=True
        )
        assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 10)
        (path,) = daemon.pipeline.holding["virtual-nic"]
        assert path == f"/devices/virtual/net/{name}"
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)
    assert daemon.run_until(lambda: daemon.applied == frozenset(), 10)
    assert _starts(fake_system) == 2


# --- sd_notify ------------------------------------------------------------------------------------


def test_notifier_speaks_the_sd_notify_protocol(notify_socket: NotifyListener) -> None:
    notifier = Notifier({**notify_socket.env(), "WATCHDOG_USEC": "30000000"})
    assert notifier.watchdog_interval == 15.0  # half of WatchdogSec, per sd_watchdog_enabled(3)
    notifier.ready("2 rules")
    notifier.status("2 rules")  # unchanged: not sent again
    notifier.status("3 rules\nand a newline")
    notifier.stopping("bye")
    notifier.close()
    notify_socket.wait_for("STOPPING", "1")
    assert notify_socket.messages == [
        {"READY": "1", "STATUS": "2 rules"},
        {"STATUS": "3 rules and a newline"},
        {"STOPPING": "1", "STATUS": "bye"},
    ]


def test_notifier_is_quiet_outside_systemd_and_for_other_pids() -> None:
    assert not Notifier({}).send("READY=1")
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    other = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is some other process's


def test_reload_with_rules_that_need_devices_opens_the_udev_monitor(
    make_daemon: Any, fake_system: FakeSystem, tmp_path: Path, udevd: None
) -> None:
    daemon = make_daemon(_rule())
    assert daemon.world.devices == {}  # link rules only: udev is not even listened to
    (tmp_path / "rules.toml").write_text(_rule() + _LOOPBACK_RULE)
    daemon.signal(signal.SIGHUP)
    assert daemon.run_until(lambda: daemon.applied == {"podman"}, 10)
    assert "/devices/virtual/net/lo" in daemon.world.devices
    assert daemon.world.links  # the links of the namespace are still known


_LOOPBACK_RULE = """
[[rule]]
name = "loopback"
modules = ["podman"]
settle = "0.1s"
[rule.when.device]
subsystem = "net"
sysname = "lo"
"""


@pytest.mark.parametrize("udevd_state", ["running", "ended", "never-started"])
def test_device_rules_without_udevd_say_so(
    make_daemon: Any, fake_system: FakeSystem, tmp_path: Path, udevd: None, udevd_state: str
) -> None:
    import socket as socket_module

    from runtime_modules._udev_source import UDEVD_CONTROL

    control = {
        "running": UDEVD_CONTROL,
        "ended": tmp_path / "udevd.control",
        "never-started": None,
    }[udevd_state]
    if udevd_state == "ended":  # a socket file left behind by a udevd that is gone: refuses
        with socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_SEQPACKET) as sock:
            sock.bind(str(control))
            sock.listen()
    elif control is None:
        control = tmp_path / "no-such-control"
    daemon = make_daemon(_LOOPBACK_RULE, start=False)
    daemon.sources.udevd_control = control
    daemon.start()
    # The devices present still count: coldplug enumerates sysfs and udev's database.
    assert daemon.run_until(lambda: daemon.applied == {"podman"}, 10)
    said = fake_system.stderr.getvalue()
    if udevd_state == "running":
        assert "udevd is not running" not in said
    else:
        assert f"systemd-udevd is not running (nothing listens on {control})" in said
        assert "start systemd-udevd, then reload (SIGHUP) or restart runtime-modules" in said


def test_stored_pins_survive_a_restart_and_expire_on_time(
    make_daemon: Any, fake_system: FakeSystem
) -> None:
    from runtime_modules._overrides import OverrideSource, OverrideState, OverrideStore

    store = OverrideStore.from_settings(fake_system.settings)
    now = time.time()
    source = OverrideSource(uid=0, user="root", command="runtime-modules enable gaming --for 1s")
    store.pin(["gaming"], OverrideState.ON, until=now + 1.0, source=source, persist=False, now=now)
    daemon = make_daemon(_rule())  # no link is up: only the pin wants anything
    assert daemon.run_until(lambda: daemon.applied == {"gaming"}, 10)
    assert daemon.run_until(lambda: daemon.applied == frozenset(), 10)  # expired: back to rules
    assert store.load(time.time()).pins == {}  # and gone from the store


def test_one_daemon_per_socket_and_the_socket_goes_with_it(
    make_daemon: Any, fake_system: FakeSystem
) -> None:
    from runtime_modules._errors import ControlError

    first = make_daemon(_rule())
    socket_path = fake_system.settings.control_socket
    assert socket_path.is_socket()
    second = make_daemon(start=False)
    with pytest.raises(ControlError, match="another runtime-modules daemon is already running"):
        second.start()
    assert socket_path.is_socket()  # the refused one did not take the first one's socket
    first.stop()
    first.close()
    assert not socket_path.exists()
    third = make_daemon()  # and a stale socket of a killed daemon would be replaced
    assert third.control is not None and socket_path.is_socket()


def test_a_reload_whose_monitors_fail_keeps_the_old_rules_and_monitors(
    make_daemon: Any, netns: str, fake_system: FakeSystem, tmp_path: Path, monkeypatch: Any
) -> None:
    import errno

    import runtime_modules._udev_source as udev_source

    daemon = make_daemon(_rule(settle=0.1))
    (tmp_path / "rules.toml").write_text(_rule(settle=0.1) + _LOOPBACK_RULE)

    def broken(*args: Any, **kwargs: Any) -> Any:  # no real udev fails on demand
        raise OSError(errno.EIO, "udev enumeration failed")

    monkeypatch.setattr(udev_source, "enumerate_devices", broken)
    daemon.signal(signal.SIGHUP)
    daemon.step(1)  # raising here would be the daemon's death
    assert [r.name for r in daemon.rules.rules] == ["lab-link-up"]
    assert "new rules rejected, keeping the 1 loaded ones" in fake_system.stderr.getvalue()
    assert "udev enumeration failed" in fake_system.stderr.getvalue()
    _veth(netns, up=True)  # the old netlink monitor still hears
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 10)


def test_sighup_while_stopping_is_ignored(make_daemon: Any) -> None:
    daemon = make_daemon(_rule())
    daemon.stop()
    assert daemon.reload() is False


def test_a_reload_feeds_the_pins_against_the_new_registry(
    make_daemon: Any, fake_system: FakeSystem
) -> None:
    from runtime_modules._overrides import OverrideSource, OverrideState, OverrideStore
    from tests.fixtures.applier import MODULES

    # The base system has every module; the registry lists "gaming" only after the reload.
    fake_system.write_registry(
        [{"name": "podman"}, {"name": "virtualization"}], base_modules=MODULES
    )
    store = OverrideStore.from_settings(fake_system.settings)
    source = OverrideSource(uid=0, user="root")
    store.pin(
        ["podman", "gaming"],
        OverrideState.ON,
        until=None,
        source=source,
        persist=False,
        now=time.time(),
    )
    daemon = make_daemon(_rule(settle=0.1))  # the "gaming" pin is kept in the store, ignored
    assert daemon.run_until(lambda: daemon.applied == {"podman"}, 10)
    done: list[ApplyDone] = []
    daemon.subscribe(lambda n: done.append(n) if isinstance(n, ApplyDone) else None)
    fake_system.write_registry(
        [{"name": "gaming"}, {"name": "virtualization"}], base_modules=MODULES
    )
    daemon.signal(signal.SIGHUP)
    assert daemon.run_until(lambda: daemon.applied == {"gaming"}, 10), (done, daemon.snapshot())
    assert done and all(d.ok for d in done), done  # never "unknown module 'podman'"


def test_apply_ids_go_on_across_restarts(make_daemon: Any, fake_system: FakeSystem) -> None:
    from runtime_modules._overrides import OverrideSource, OverrideState, OverrideStore

    store = OverrideStore.from_settings(fake_system.settings)
    root = OverrideSource(uid=0, user="root")
    starts: list[int] = []

    def run(module: str) -> None:
        store.pin(
            [module], OverrideState.ON, until=None, source=root, persist=False, now=time.time()
        )
        daemon = make_daemon(_rule(), reconciler=None, start=False)  # its own reconciler
        daemon.subscribe(
            lambda n: (
                starts.append(n.action.apply_id)
                if isinstance(n, ActionTaken) and isinstance(n.action, StartApply)
                else None
            )
        )
        daemon.start()
        assert daemon.run_until(lambda: module in daemon.applied, 10)  # a pin skips quiet
        daemon.close()

    run("gaming")
    run("podman")
    assert starts == [1, 2]


def test_echo_never_waits_for_a_reader_that_does_not_read(tmp_path: Path) -> None:
    import io
    import threading

    from runtime_modules._decision_log import DecisionLog

    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 4096)  # the reader is paused (`watch --dry-run | less`)
    os.set_blocking(w, True)
    out = os.fdopen(w, "w")
    journal = Journal(socket_path=tmp_path / "no-journal.socket", stderr=io.StringIO())
    log = DecisionLog(journal, out, dry_run=True, holding=lambda r: (), modules_of=lambda r: ())
    echo = threading.Thread(target=log.echo, args=("rule dock holds",), daemon=True)
    echo.start()
    echo.join(5)
    assert not echo.is_alive()  # it did not block the loop
    assert log.dropped == 1
    with os.fdopen(r, "rb") as reader:
        os.set_blocking(r, False)
        with contextlib.suppress(BlockingIOError):
            while reader.read(65536):
                pass
        log.echo("apply #2 would start")
        text = reader.read(65536).decode()
    out.close()
    assert "(1 lines dropped: the output was not read)" in text and "apply #2 would start" in text
    assert log.dropped == 0
