"""The reliability suite: faults that must end with the system on a known module set, the state
file telling the truth, one clear line for the user, and the details in the journal.

Only what the other test files do not show already lives here: the faults through the daemon with
the real journald, the daemon killed at random points of an apply, the state directory failing
during an apply, bad registry and rule files at the daemon, journald absent for a real command,
a udev overrun at the daemon, and fuzzing of device values, interface names and rule files
through everything down to the generated flake. ``tests/reliability/cases.py`` lists the cases
and the tests elsewhere that prove the rest; the run writes docs/reliability.md.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime_modules._applier import Applier, ApplyResult
from runtime_modules._cli import main as cli_main
from runtime_modules._daemon import ApplyDone, Daemon, Notice
from runtime_modules._decision_log import describe
from runtime_modules._errors import RegistryError, RuleError
from runtime_modules._flake import FLAKE_NIX
from runtime_modules._journal import Journal, JournalEvent
from runtime_modules._pipeline import Pipeline
from runtime_modules._process import process_alive
from runtime_modules._reconciler import Reconciler
from runtime_modules._reconciler_events import StartApply
from runtime_modules._registry import Registry
from runtime_modules._rules import parse_rules
from runtime_modules._runner import JOURNAL_OUTPUT_LINES
from runtime_modules._settings import Settings
from runtime_modules._state import ModuleStatus, load_state
from runtime_modules._world import Device, DeviceUpsert, Link, LinkUpsert, OperState, World
from tests.fixtures.applier import FakeSystem, Tmpfs
from tests.fixtures.daemon import LINK_RULE
from tests.fixtures.system import REPO, ip_netns, journal_entries
from tests.reliability.cases import CASES

reliability = pytest.mark.reliability


def _rule(settle: float = 0.05, linger: float = 1.0) -> str:
    return LINK_RULE.format(settle=settle, linger=linger)


def _veth_up(netns: str) -> None:
    ip_netns(netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    ip_netns(netns, "link", "set", "va", "up")
    ip_netns(netns, "link", "set", "vb", "up")


def _first_done(daemon: Daemon, timeout: float = 30.0) -> ApplyDone:
    seen: list[Notice] = []
    unsubscribe = daemon.subscribe(seen.append)
    try:
        assert daemon.run_until(lambda: any(isinstance(n, ApplyDone) for n in seen), timeout)
    finally:
        unsubscribe()
    return next(n for n in seen if isinstance(n, ApplyDone))


def _ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["MESSAGE_ID"] for e in entries]


def _journal_of_apply(apply_id: str) -> list[dict[str, Any]]:
    return journal_entries(RUNTIME_MODULES_APPLY_ID=apply_id)


# --- the matrix itself --------------------------------------------------------------------------


def test_every_listed_test_exists() -> None:
    """A renamed test must not silently leave its case without proof."""
    import ast

    for case in CASES:
        for ref in case.tests:
            path, _, name = ref.partition("::")
            tree = ast.parse((REPO / path).read_text())
            names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{case.name}: {ref} does not exist"


# --- nixos-rebuild faults through the daemon, with the real journald ----------------------------

FAULTS = {
    "fail": ({"mode": "fail"}, "exited with status 1", ApplyResult.FAILED),
    "hang": ({"mode": "hang"}, "timed out after 1 s and was killed", ApplyResult.TIMED_OUT),
    "sigkill": ({"mode": "sigkill"}, "killed by signal SIGKILL", ApplyResult.FAILED),
    "10mb": ({"mode": "fail", "output_mb": 10}, "builder for", ApplyResult.FAILED),
}
FAULT_CASES = {
    "fail": "nixos-rebuild fails",
    "hang": "nixos-rebuild hangs past the timeout",
    "sigkill": "nixos-rebuild is SIGKILLed",
    "10mb": "nixos-rebuild prints 10 MB of output",
}


@pytest.mark.root
@pytest.mark.usefixtures("journald")
@pytest.mark.parametrize(
    "fault", [pytest.param(f, id=f, marks=reliability(FAULT_CASES[f])) for f in FAULTS]
)
def test_rebuild_fault_through_the_daemon(
    fault: str, make_daemon: Any, netns: str, fake_system: FakeSystem, journal_tag: str
) -> None:
    behaviour, reason, result = FAULTS[fault]
    journal = Journal(identifier=journal_tag)
    # What runs before: {gaming}, applied by hand. The rules then want {virtualization} instead.
    assert (
        Applier(fake_system.settings, fake_system.registry(), journal=journal)
        .apply(frozenset({"gaming"}), reason="before")
        .ok
    )
    previous = fake_system.current()
    if fault == "hang":
        fake_system.settings = fake_system.settings.with_(apply_timeout=1.0)
    fake_system.control(**behaviour)
    _veth_up(netns)
    daemon = make_daemon(_rule(), journal=journal)
    done = _first_done(daemon)

    # 1. a known set: the previous one, really running
    assert not done.ok and done.applied == {"gaming"}
    assert fake_system.current() == previous and fake_system.current_imports() == ["gaming"]
    # 2. the state file tells the truth
    state = load_state(fake_system.settings)
    assert state.applied == {"gaming"} and state.in_progress is None
    assert state.last_apply is not None and state.last_apply.result is result
    failed = state.module_status("virtualization")
    assert failed.status is ModuleStatus.FAILED and failed.message == done.message
    # 3. one clear line: what failed, that nothing was touched (only the build ran), the log
    assert "\n" not in done.message and len(done.message) < 1000
    assert done.message.startswith("could not enable virtualization and disable gaming: ")
    assert reason in done.message
    assert "the running system was not touched; full log: " in done.message
    # 4. the journal holds the details, under the apply's id
    entries = _journal_of_apply(state.last_apply.apply_id)
    ids = _ids(entries)
    assert ids[0] == JournalEvent.APPLY_STARTED.message_id
    assert JournalEvent.APPLY_FAILED.message_id in ids
    assert JournalEvent.APPLY_ROLLED_BACK.message_id not in ids  # a build has nothing to undo
    assert entries[-1]["RUNTIME_MODULES_PHASE"] == "build"
    assert entries[-1]["MESSAGE"] == done.message
    assert entries[-1]["RUNTIME_MODULES_RESULT"] == result.value
    output = [e for e in entries if e["MESSAGE_ID"] == JournalEvent.APPLY_OUTPUT.message_id]
    if fault == "10mb":
        assert JOURNAL_OUTPUT_LINES <= len(output) <= JOURNAL_OUTPUT_LINES + 50
        assert any("more lines of output are not in the journal" in e["MESSAGE"] for e in entries)
    else:
        assert output  # the rebuild's own words are there

    # And once the fault is gone, the daemon gets the system to the wanted set by itself.
    fake_system.control()
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 30)
    assert fake_system.current_imports() == ["virtualization"]
    assert load_state(fake_system.settings).module_status("virtualization").status is (
        ModuleStatus.ENABLED
    )


# --- the daemon SIGKILLed at random points of an apply, then restarted --------------------------

KILL_RUNS = 20


def _run_daemon_child(fake: FakeSystem, rules: Path, netns: str, tag: str) -> int:
    """Fork a daemon process (no interpreter start-up to wait for); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        daemon = Daemon(
            fake.settings,
            rules=[rules],
            netns=netns,
            journal=Journal(identifier=tag),
            reconciler=Reconciler(quiet=0.02, backoff=0.2, backoff_cap=0.4),
        )
        code = daemon.run()
    finally:
        os._exit(code)


@pytest.mark.root
@pytest.mark.usefixtures("journald")
@reliability("daemon SIGKILLed at a random point of an apply, then restarted (20 seeded runs)")
@pytest.mark.parametrize("seed", range(KILL_RUNS))
def test_daemon_killed_mid_apply_recovers_on_restart(
    *,
    seed: int,
    make_daemon: Any,
    netns: str,
    fake_system: FakeSystem,
    journal_tag: str,
    tmp_path: Path,
) -> None:
    rng = random.Random(seed)
    rules = tmp_path / "rules.toml"
    rules.write_text(_rule(settle=0.1))
    _veth_up(netns)
    # The apply starts ~0.15 s after the fork (start-up, settle, quiet) and lasts Nix's
    # evaluation + 0.2 s + the switch: kills land before it, in every part of it, and after it.
    fake_system.control(sleep=0.2)
    delay = rng.uniform(0.0, 0.6)
    pid = _run_daemon_child(fake_system, rules, netns, journal_tag)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    starts, ends = fake_system.records("start"), fake_system.records("end")
    phase = "before the rebuild" if not starts else "during it" if not ends else "after it"
    # Killed after the rebuild ended but before the applier recorded it, the apply is still
    # "in progress": recovery rolls it back and the restarted daemon rebuilds once more.
    left_in_progress = load_state(fake_system.settings).in_progress is not None
    context = f"seed {seed}: killed {delay:.3f} s in, {phase}"

    fake_system.control()
    restarted = make_daemon(_rule(settle=0.02), journal=Journal(identifier=journal_tag))
    assert restarted.run_until(lambda: restarted.applied == {"virtualization"}, 30), context
    done_at = time.monotonic()
    while time.monotonic() - done_at < 0.1:  # nothing else happens once it is there
        restarted.step(0.1)

    # A known set, and the state file says so with nothing left in progress.
    state = load_state(fake_system.settings)
    assert state.applied == {"virtualization"} and state.in_progress is None, context
    assert fake_system.current_imports() == ["virtualization"], context
    # The orphaned rebuild is gone, and rebuilds never overlapped.
    for start in fake_system.records("start"):
        assert not process_alive(start["pid"], None), context
    # Recovery, when the kill left an apply in progress, is one line in the journal: killed
    # while building, nothing was activated and nothing is rolled back; later, it rolls back.
    recovered = [
        entry
        for event in (JournalEvent.APPLY_ROLLED_BACK, JournalEvent.APPLY_FAILED)
        for entry in journal_entries(SYSLOG_IDENTIFIER=journal_tag, MESSAGE_ID=event.message_id)
        if "was interrupted" in entry["MESSAGE"]
    ]
    if phase == "during it":
        assert len(recovered) == 1, context
        assert "\n" not in recovered[0]["MESSAGE"], context
        if not fake_system.records("switch"):
            assert (
                "while building; the running system was not touched" in (recovered[0]["MESSAGE"])
            ), context
    # Each rebuild started after the one before had ended, or after recovery had stopped it.
    recovered_at = [int(e["__REALTIME_TIMESTAMP"]) / 1e6 for e in recovered]
    records = fake_system.records()
    starts = [r["time"] for r in records if r["event"] == "start"]
    for first, then in itertools.pairwise(starts):
        between = [r for r in records if first < r["time"] < then]
        assert any(r["event"] == "end" for r in between) or any(
            first < t < then for t in recovered_at
        ), f"{context}: a rebuild started while another ran"
    if phase == "after it" and ends[0]["ok"] and not left_in_progress:
        assert len(fake_system.records("start")) == 1, f"{context}: rebuilt what was applied"


# --- the state directory fails while the daemon applies -----------------------------------------


@pytest.mark.root
@pytest.mark.usefixtures("journald")
@reliability("state dir read-only when state is written")
def test_read_only_state_dir_at_the_daemon_then_writable_again(
    make_daemon: Any, netns: str, fake_system: FakeSystem, tmpfs: Tmpfs, journal_tag: str
) -> None:
    fake_system.settings = fake_system.settings.with_(state_dir=tmpfs.path / "state")
    daemon = make_daemon(_rule(), journal=Journal(identifier=journal_tag))
    tmpfs.remount("ro")
    _veth_up(netns)
    done = _first_done(daemon)
    assert not done.ok and done.applied == frozenset()
    assert fake_system.records("start") == []  # nothing ran
    assert fake_system.current() == fake_system.initial_system.resolve()
    assert not fake_system.settings.state_file.exists()  # and nothing claims otherwise
    assert "\n" not in done.message
    assert done.message.startswith(str(fake_system.settings.state_dir))
    assert "read-only file system" in done.message
    failures = journal_entries(
        SYSLOG_IDENTIFIER=journal_tag, MESSAGE_ID=JournalEvent.STATE_WRITE_FAILED.message_id
    )
    assert failures and "read-only" in failures[0]["MESSAGE"]

    tmpfs.remount("rw")  # the daemon retries after its backoff and gets there
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 30)
    assert load_state(fake_system.settings).applied == {"virtualization"}
    assert fake_system.current_imports() == ["virtualization"]


@pytest.mark.root
@pytest.mark.usefixtures("journald")
@reliability("state dir full (small tmpfs) when state is written")
@pytest.mark.parametrize("phase", ["build", "activation"])
def test_state_dir_fills_up_while_the_rebuild_runs(
    fake_system: FakeSystem, tmpfs: Tmpfs, journal_tag: str, phase: str
) -> None:
    """The disk fills while the rebuild runs, so what follows cannot be recorded.

    During the build: the built system cannot be recorded, so it is not activated at all. During
    the activation: it succeeds, but its result cannot be recorded, so it is rolled back and the
    system matches the state file that stays (previous set, apply in progress for the next start).
    (Read-only cannot happen then: a file system with files open for writing, the apply's log,
    refuses to be remounted read-only.)
    """
    fake_system.settings = fake_system.settings.with_(state_dir=tmpfs.path / "state")
    journal = Journal(identifier=journal_tag)
    applier = Applier(fake_system.settings, fake_system.registry(), journal=journal)
    assert applier.apply(frozenset({"gaming"}), reason="first").ok
    previous = fake_system.current()
    if phase == "build":
        fake_system.control(sleep=0.5)
    else:
        fake_system.control(switch="sleep:0.5")
    marker = "evaluated" if phase == "build" else "switch"  # the flake is written / it activates
    seen = len(fake_system.records(marker))
    outcome: list[Any] = []
    worker = threading.Thread(
        target=lambda: outcome.append(applier.apply(frozenset({"podman"}), reason="second"))
    )
    worker.start()
    deadline = time.monotonic() + 20
    while len(fake_system.records(marker)) == seen:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    tmpfs.fill()
    worker.join(30)
    (result,) = outcome
    assert result.result is ApplyResult.FAILED
    assert fake_system.current() == previous and fake_system.current_imports() == ["gaming"]
    if phase == "build":
        assert "the built system could not be recorded before activating it" in result.message
        assert "the running system was not touched" in result.message
        assert [r["system"] for r in fake_system.records("switch")] == [str(previous)]  # first's
    else:
        assert "the rebuild succeeded but the state could not be recorded" in result.message
        assert "rolled back to" in result.message
    assert "\n" not in result.message
    assert "is full; free some space" in result.message
    state = load_state(fake_system.settings)
    assert state.applied == {"gaming"}  # the truth: nothing activated, or rolled back
    assert state.in_progress is not None  # the next start recovers it (harmless)
    ids = _ids(_journal_of_apply(result.apply_id))
    assert JournalEvent.STATE_WRITE_FAILED.message_id in ids
    assert ids[-1] == JournalEvent.APPLY_FAILED.message_id
    # Space again: the next apply recovers the record first and works.
    (tmpfs.path / "filler").unlink()
    fake_system.control()
    assert applier.apply(frozenset({"podman"}), reason="third").ok
    state = load_state(fake_system.settings)
    assert state.applied == {"podman"} and state.in_progress is None
    assert fake_system.current_imports() == ["podman"]


# --- bad files -----------------------------------------------------------------------------------

BAD = {
    "empty": b"",
    "truncated": b'{"host": "testhost", "flake": "path:/x", "modules": [{"na',
    "binary": bytes(range(256)) * 64,
}


def _bad_file(path: Path, kind: str) -> None:
    if kind == "huge":
        with path.open("wb") as f:
            f.truncate(64 * 1024 * 1024)  # sparse: cheap to make, far too big to read
    else:
        path.write_bytes(BAD[kind])


KINDS = ["empty", "truncated", "binary", "huge"]


@pytest.mark.root
@pytest.mark.usefixtures("journald")
@reliability("state file truncated, empty, binary or huge")
@pytest.mark.parametrize("kind", KINDS)
def test_daemon_with_a_bad_state_file_rebuilds_the_wanted_set(
    kind: str, make_daemon: Any, netns: str, fake_system: FakeSystem, journal_tag: str
) -> None:
    _veth_up(netns)
    fake_system.settings.state_dir.mkdir(parents=True, exist_ok=True)
    _bad_file(fake_system.settings.state_file, kind)
    daemon = make_daemon(_rule(), journal=Journal(identifier=journal_tag))
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 30)
    # The uncertain state is rebuilt at once (with what is wanted before the rule settled),
    # then the settled rule's set: at most two rebuilds, and the last one is the wanted set.
    assert 1 <= len(fake_system.records("start")) <= 2
    state = load_state(fake_system.settings)
    assert state.applied == {"virtualization"} and state.uncertain is None
    assert fake_system.current_imports() == ["virtualization"]
    (warning,) = journal_entries(
        SYSLOG_IDENTIFIER=journal_tag, MESSAGE_ID=JournalEvent.STATE_RECOVERED.message_id
    )
    assert str(fake_system.settings.state_file) in warning["MESSAGE"]
    assert "\n" not in warning["MESSAGE"]


@reliability("registry truncated, empty, binary or huge")
@pytest.mark.parametrize("kind", KINDS)
def test_bad_registry_is_one_line_for_the_cli_and_the_daemon(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "modules.json"
    _bad_file(registry, kind)
    code = cli_main(["--registry", str(registry), "--state-dir", str(tmp_path / "s"), "list"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"runtime-modules: {registry}: ")
    assert "Traceback" not in err
    rules = tmp_path / "rules.toml"
    rules.write_text(_rule())
    settings_ = Settings(registry=registry, state_dir=tmp_path / "s")
    daemon = Daemon(settings_, rules=[rules], journal=Journal(stderr=io.StringIO()))
    try:
        with pytest.raises(RegistryError) as exc:
            daemon.start()
        assert "\n" not in str(exc.value) and str(registry) in str(exc.value)
    finally:
        daemon.close()


@pytest.mark.root
@pytest.mark.usefixtures("journald")
@reliability("registry truncated, empty, binary or huge")
@pytest.mark.parametrize("kind", ["truncated", "binary", "huge"])
def test_bad_registry_on_sighup_keeps_the_loaded_rules(
    kind: str, make_daemon: Any, netns: str, fake_system: FakeSystem, journal_tag: str
) -> None:
    daemon = make_daemon(_rule(), journal=Journal(identifier=journal_tag))
    _bad_file(fake_system.settings.registry, kind)
    daemon.signal(signal.SIGHUP)
    daemon.step(1)
    (rejected,) = journal_entries(
        SYSLOG_IDENTIFIER=journal_tag, MESSAGE_ID=JournalEvent.RULES_REJECTED.message_id
    )
    assert str(fake_system.settings.registry) in rejected["MESSAGE"]
    _veth_up(netns)  # the loaded rules still work
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 30)


@pytest.mark.root
@pytest.mark.usefixtures("journald")
@reliability("rule file truncated, empty, binary or huge")
@pytest.mark.parametrize("kind", KINDS)
def test_bad_rule_file_on_sighup(
    *,
    kind: str,
    make_daemon: Any,
    netns: str,
    fake_system: FakeSystem,
    journal_tag: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon = make_daemon(_rule(), journal=Journal(identifier=journal_tag))
    rules = tmp_path / "rules.toml"
    if kind == "truncated":
        rules.write_text(_rule()[: len(_rule()) // 2])
    else:
        _bad_file(rules, kind)
    daemon.signal(signal.SIGHUP)
    daemon.step(1)
    # An empty file is an error too (an editor truncating before it writes): the rules stay.
    assert [r.name for r in daemon.rules.rules] == ["lab-link-up"]
    (rejected,) = journal_entries(
        SYSLOG_IDENTIFIER=journal_tag, MESSAGE_ID=JournalEvent.RULES_REJECTED.message_id
    )
    assert str(rules) in rejected["MESSAGE"]
    assert "keeping the 1 loaded" in rejected["MESSAGE"]
    code = cli_main(
        ["--registry", str(fake_system.settings.registry), "rules", "check", str(rules)]
    )
    out = capsys.readouterr()
    assert code == 1 and str(rules) in out.out + out.err
    assert "Traceback" not in out.out + out.err
    _veth_up(netns)
    assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 30)


# --- journald absent: a real command in a mount namespace without the journal socket ------------


@pytest.mark.root
@reliability("journald absent")
def test_without_journald_a_real_enable_says_everything_on_stderr(fake_system: FakeSystem) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    script = (
        "mount -t tmpfs none /run/systemd/journal && "
        f"exec {sys.executable} -m runtime_modules enable gaming"
    )
    Path("/run/systemd/journal").mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        check=False,
        env={**os.environ, **fake_system.env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    started = [ln for ln in lines if ln.startswith("runtime-modules: applying: enable gaming")]
    assert len(started) == 1 and "APPLY_ID=" in started[0]
    assert any(ln.startswith("runtime-modules: enabled gaming") for ln in lines)
    assert "Traceback" not in done.stderr
    assert load_state(fake_system.settings).applied == {"gaming"}
    assert fake_system.current_imports() == ["gaming"]


# --- a udev overrun at the daemon, with real udevd and real veths -------------------------------


@pytest.mark.root
@pytest.mark.usefixtures("journald", "udevd")
@reliability("udev monitor errors and overrun")
def test_udev_overrun_at_the_daemon_ends_on_the_right_set(
    make_daemon: Any, fake_system: FakeSystem, journal_tag: str
) -> None:
    prefix = f"rmo{uuid.uuid4().hex[:5]}"
    rules = f"""
[[rule]]
name = "overrun-nics"
modules = ["virtualization"]
settle = "0.05s"
linger = "0.1s"
[rule.when.device]
subsystem = "net"
sysname = "{prefix}*"
"""
    daemon = make_daemon(rules, journal=Journal(identifier=journal_tag), udev_receive_buffer=1)
    names = [f"{prefix}{i}" for i in range(6)]
    try:
        for name in names:  # not read meanwhile: the smallest buffer overflows
            subprocess.run(["ip", "link", "add", name, "type", "veth"], check=True)
        subprocess.run(["udevadm", "settle", "--timeout=10"], check=True)
        assert daemon.run_until(lambda: daemon.applied == {"virtualization"}, 30)
        assert daemon.stats["resyncs"] >= 1
        mine = {d.sysname for d in daemon.world.devices.values() if d.sysname.startswith(prefix)}
        assert set(names) <= mine
        assert journal_entries(
            SYSLOG_IDENTIFIER=journal_tag, MESSAGE_ID=JournalEvent.WORLD_RESYNCED.message_id
        )
    finally:
        for name in names:
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
    assert daemon.run_until(lambda: daemon.applied == frozenset(), 30)
    assert len(fake_system.records("start")) == 2  # on once, off once: no churn


# --- fuzzing: hostile values through everything, down to the generated flake --------------------

HOSTILE = st.one_of(
    st.text(
        alphabet=st.sampled_from(list("a\"'\\${}\n\r\t ;`*?[]=:/.\x00\x7f\u00e9\u202e")),
        max_size=40,
    ),
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "backslashreplace")),
    st.sampled_from(['${builtins.abort "x"}', '"; rm -rf / #', "''${x}''", "a\nb", "\\"]),
    st.integers(1, 4).map(lambda n: "x" * (16 * 1024 * n)),  # up to 64 KiB
)
FUZZ_RULES = """
[[rule]]
name = "gpu"
modules = ["gaming"]
settle = "0s"
linger = "0s"
[rule.when.device]
subsystem = "pci"
properties = { PCI_ID = "10DE:*" }

[[rule]]
name = "anything"
modules = ["podman"]
settle = "0s"
linger = "0s"
[rule.when.device]
properties = { ID_MODEL = "*$*" }

[[rule]]
name = "odd-link"
modules = ["virtualization"]
settle = "0s"
linger = "0s"
[rule.when.link]
ifname = "*[\\"'$]*"
"""


@pytest.fixture(scope="module")
def fuzz_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Applier, bytes]]:
    """A dry-run applier on a registry of our three modules, and the flake it writes."""
    root = tmp_path_factory.mktemp("fuzz")
    registry = Registry(
        host="testhost",
        flake=f"path:{root}/base",
        modules=[{"name": n} for n in ("gaming", "podman", "virtualization")],  # type: ignore[list-item]
    )
    link = root / "current-system"
    link.symlink_to(root)
    settings_ = Settings(
        registry=root / "modules.json", state_dir=root / "state", current_system=link
    )
    # Never the machine's journal: `runtime-modules history` would list these applies.
    journal = Journal(socket_path=Path("/nonexistent"), stderr=io.StringIO())
    applier = Applier(settings_, registry, journal=journal, dry_run=True)
    applier.apply(frozenset(), reason="reference", force=True)
    yield applier, (settings_.flake_dir / FLAKE_NIX).read_bytes()


@reliability("udev property values and interface names (quotes, ${…}, newlines, non-UTF-8, 64 KiB)")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.tuples(HOSTILE, HOSTILE, HOSTILE), min_size=1, max_size=4),
    ifnames=st.lists(HOSTILE, min_size=1, max_size=3),
)
def test_hostile_device_values_and_link_names_change_no_nix_source(
    fuzz_bed: tuple[Applier, bytes], values: list[tuple[str, str, str]], ifnames: list[str]
) -> None:
    applier, flake = fuzz_bed
    rules = parse_rules(FUZZ_RULES, "fuzz.toml")
    pipeline = Pipeline(rules, Reconciler(quiet=0.0), World())
    actions = pipeline.coldplug(frozenset(), 0.0)
    changes: list[Any] = []
    for i, (pci_id, model, sysname) in enumerate(values):
        path = f"/devices/pci0000:00/0000:00:{i:02x}.0"
        props = {"PCI_ID": "10DE:" + pci_id, "ID_MODEL": model, "X": sysname}
        changes.append(
            DeviceUpsert(
                Device(devpath=path, subsystem="pci", properties=props, sysname=sysname or "x")
            )
        )
    for i, name in enumerate(ifnames):
        changes.append(LinkUpsert(Link(index=i + 1, ifname=name, operstate=OperState.UP)))
    actions += pipeline.feed(changes, 1.0) or []
    actions += pipeline.reconciler.tick(1.0)
    journal_out = io.StringIO()
    journal = Journal(socket_path=Path("/nonexistent"), stderr=journal_out)
    for action in actions:
        text = describe(action, 1.0, matches=pipeline.matches(getattr(action, "rule", "")))
        journal.send(JournalEvent.RULE_ACTIVATED, text, rule=getattr(action, "rule", None))
    assert all(line.startswith("runtime-modules: ") for line in journal_out.getvalue().splitlines())
    assert "gaming" in pipeline.reconciler.snapshot(1.0).wanted
    starts = [a for a in actions if isinstance(a, StartApply)]
    assert len(starts) == 1
    outcome = applier.apply(starts[0].target, reason=" ".join(" ".join(v) for v in values)[:200])
    assert outcome.ok
    flake_dir = applier.settings.flake_dir
    assert (flake_dir / FLAKE_NIX).read_bytes() == flake
    enabled = json.loads((flake_dir / "enabled.json").read_text())
    assert (
        set(enabled["modules"]) == set(starts[0].target) <= {"gaming", "podman", "virtualization"}
    )


@reliability("udev property values and interface names (quotes, ${…}, newlines, non-UTF-8, 64 KiB)")
@pytest.mark.root
def test_hostile_interface_names_through_real_netlink(netns: str) -> None:
    from runtime_modules._netlink_source import NetlinkSource, enumerate_links

    names = [b'q"1', b"d${x}", b"\xff\xfe", b"b\\s", b"t'`;", b"e\xc3\xa9"]
    source = NetlinkSource(netns)
    try:
        for name in names:
            subprocess.run(["ip", "-n", netns, "link", "add", name, "type", "veth"], check=True)
            subprocess.run(["ip", "-n", netns, "link", "set", name, "up"], check=True)
        time.sleep(0.1)
        changes = source.read()
    finally:
        source.close()
    links = enumerate_links(netns)
    shown = {link.ifname for link in links}
    for name in names:
        assert name.decode("utf-8", "backslashreplace") in shown
    rules = parse_rules(FUZZ_RULES, "fuzz.toml")
    pipeline = Pipeline(rules, Reconciler(quiet=0.0), World.of(links=links))
    pipeline.coldplug(frozenset(), 0.0)
    pipeline.feed(changes, 0.5)
    assert "odd-link" in pipeline.holding


@reliability("rule files and device values (atheris, coverage-guided)")
def test_atheris_on_rule_files_and_device_values(tmp_path: Path) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not installed (pip install atheris; it ships a libFuzzer wheel)")
    harness = REPO / "tests" / "reliability" / "atheris_harness.py"
    done = subprocess.run(
        [
            sys.executable,
            str(harness),
            "-atheris_runs=20000",
            "-max_len=4096",
            "-len_control=0",
            f"-artifact_prefix={tmp_path}/",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 20000 in" in done.stderr


def test_rule_errors_never_escape_as_other_exceptions_on_hostile_globs() -> None:
    """Hostile strings as every glob of a rule: rules or a located RuleError."""
    for value in ["${x}", '"', "\\", "[", "a\nb", "\udcff", "x" * 65536]:
        text = json.dumps(
            {"rule": [{"name": "r", "modules": ["m"], "when": {"link": {"ifname": value}}}]}
        )
        try:
            parse_rules(text, "hostile.json")
        except RuleError as exc:
            assert all(p.file == "hostile.json" for p in exc.problems)
