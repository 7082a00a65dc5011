"""The rule verbs of the command line: rules check, rules schema, simulate, explain."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_modules._cli import main
from runtime_modules._cli._rules import live_world
from runtime_modules._errors import ExitCode, RuleError
from runtime_modules._rules import load_rules
from runtime_modules._settings import DEFAULT_REGISTRY, ENV_REGISTRY, ENV_RULES
from tests.fixtures.system import REPO
from tests.fixtures.world import EXAMPLE_RULES

RULES = str(EXAMPLE_RULES)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def no_configured_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_REGISTRY, raising=False)
    monkeypatch.delenv(ENV_RULES, raising=False)


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "modules.json"
    modules = [{"name": n} for n in ("gaming", "virtualization", "lab", "office")]
    path.write_text(json.dumps({"host": "laptop", "flake": "path:/etc/nixos", "modules": modules}))
    return path


# --- rules check / schema -------------------------------------------------------------------


def test_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    if DEFAULT_REGISTRY.exists():
        pytest.skip(f"{DEFAULT_REGISTRY} exists here: module names would be checked against it")
    code, out, err = run(capsys, "rules", "check", RULES)
    assert (code, err) == (0, "")
    assert out == (
        "rules OK: 5 rules in 3 files; modules gaming, lab, virtualization; "
        "module names not checked (no registry; give --registry)\n"
    )


def test_check_default_paths_and_registry_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, registry: Path
) -> None:
    monkeypatch.setenv(ENV_RULES, RULES)
    monkeypatch.setenv(ENV_REGISTRY, str(registry))
    code, out, _ = run(capsys, "rules", "check")
    assert code == 0 and f"module names checked against {registry}" in out


def test_check_prints_every_problem_and_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, registry: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[rule]]\nname = "a"\nmodules = ["gamin"]\n[rule.when.device]\npropertis = {}\n'
        '[[rule]]\nname = "b"\nmodules = ["office"]\nsettle = "soon"\nwhen.link.ifname = "x"\n'
    )
    code, out, err = run(capsys, "--registry", str(registry), "rules", "check", RULES, str(bad))
    assert (code, out) == (1, "")
    lines = err.splitlines()
    assert lines == [
        f"{bad}: rule a: when.device.propertis: unknown key `propertis` "
        "(did you mean `properties`?)",
        # A rule's other problems do not hide its unknown modules: all is said at once.
        f"{bad}: rule a: modules[0]: unknown module `gamin` (not in the registry) "
        "(did you mean `gaming`?)",
        f"{bad}: rule b: settle: 'soon' is not a duration; "
        'write e.g. "500ms", "3s", "2m", "1m30s" or a number of seconds',
        "rules check failed: 3 problems in 1 file",
    ]
    # Valid rules are checked against the registry given after the verb too.
    fixed = tmp_path / "fixed.toml"
    fixed.write_text('[[rule]]\nname = "a"\nmodules = ["gamin"]\nwhen.link.ifname = "x"\n')
    code, _, err = run(capsys, "rules", "check", "--registry", str(registry), str(fixed))
    assert code == 1 and "unknown module `gamin` (not in the registry) (did you mean" in err


def test_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "schema")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "runtime-modules rules" and "$defs" in schema


# --- simulate -------------------------------------------------------------------------------


def test_simulate_json_is_exactly_the_documented_shape(
    capsys: pytest.CaptureFixture[str], recording_paths: dict[str, Path]
) -> None:
    code, out, _ = run(
        capsys, "simulate", "--udev-db", str(recording_paths["dgx"]), "--rules", RULES, "--json"
    )
    data = json.loads(out)
    assert code == 0 and set(data) == {"modules", "rules"}
    assert data["modules"] == {
        "gaming": {"enabled": True, "rules": ["gaming-on-nvidia-gpu"]},
        "lab": {"enabled": False, "rules": []},
        "virtualization": {"enabled": False, "rules": []},
    }
    assert list(data["rules"]) == [r.name for r in load_rules([EXAMPLE_RULES]).rules]
    for name, entry in data["rules"].items():
        assert set(entry) == {"active", "matches"}
        assert entry["active"] is (name == "gaming-on-nvidia-gpu")
    assert len(data["rules"]["gaming-on-nvidia-gpu"]["matches"]) == 4


def test_simulate_plain_with_registry_links_and_umockdev(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    registry: Path,
    recording_paths: dict[str, Path],
) -> None:
    links = tmp_path / "links.json"
    links.write_text(json.dumps([{"ifindex": 7, "ifname": "lab0", "operstate": "UP"}]))
    egpu = tmp_path / "egpu.umockdev"
    egpu.write_text("P: /devices/pci0000:00/0000:00:03.0/0000:09:00.0\nE: SUBSYSTEM=pci\n"
                    "E: PCI_ID=10de:2484\nE: PCI_CLASS=30000\n")  # fmt: skip
    code, out, _ = run(
        capsys,
        "simulate",
        "--registry",
        str(registry),
        "--udev-db",
        str(recording_paths["dell-edge"]),
        "--umockdev",
        str(egpu),
        "--links",
        str(links),
        "--rules",
        RULES,
    )
    assert code == 0
    assert out.splitlines()[:4] == [
        "gaming          enabled   by gaming-on-nvidia-gpu",
        "lab             enabled   by lab-when-lab-nic-up",
        "office          disabled",  # in the registry, named by no rule
        "virtualization  enabled   by virtualization-when-docked",
    ]
    assert (
        "rule gaming-on-nvidia-gpu: active\n  /devices/pci0000:00/0000:00:03.0/0000:09:00.0\n"
        in out
    )
    assert "rule gaming-on-amd-dgpu: inactive\n" in out and "  lab0\n" in out


def test_simulate_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, registry: Path
) -> None:
    dump = tmp_path / "broken.txt"
    dump.write_text("P: /devices/a\nnonsense\n")
    code, out, err = run(capsys, "simulate", "--udev-db", str(dump), "--rules", RULES)
    assert (code, out) == (2, "")
    assert (
        err.startswith(f"runtime-modules: {dump}:2: not a record line") and "Traceback" not in err
    )
    small = tmp_path / "registry.json"
    small.write_text(json.dumps({"host": "h", "flake": "path:/x", "modules": [{"name": "gaming"}]}))
    code, _, err = run(capsys, "simulate", "--registry", str(small), "--rules", RULES)
    assert code == 2 and "unknown module `lab`" in err  # an invalid rule file: bad input
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--udev-db", str(dump)])  # --rules is required
    assert info.value.code == 2


def test_invalid_rules_are_bad_input_but_a_failed_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, registry: Path
) -> None:
    # README: 2 for an invalid file; 1 when a check found problems (what `rules check` is for).
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "a"\nmodules = ["gaming"]\n')
    missing = str(tmp_path / "nonexistent")
    for argv in (
        ["simulate", "--rules", str(bad)],
        ["explain", "--rules", str(bad), "--links", str(bad)],
        ["explain", "--rules", missing],
    ):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, ""), argv
        assert err.startswith(f"runtime-modules: {bad if missing not in argv else missing}: ")
    assert run(capsys, "rules", "check", str(bad))[0] == 1
    assert run(capsys, "rules", "check", missing)[0] == 1
    watch = subprocess.run(
        [sys.executable, "-m", "runtime_modules", "watch", "--dry-run", "--registry",
         str(registry), "--state-dir", str(tmp_path / "state"), "--rules", str(bad)],
        capture_output=True, text=True, cwd=REPO, check=False, timeout=60,
    )  # fmt: skip
    assert watch.returncode == 2, watch.stderr
    assert f"runtime-modules: {bad}: rule a: when: required key is missing" in watch.stderr
    # The error says so itself, for every verb (and library use); only `rules check` exits 1.
    assert RuleError([]).exit_code == ExitCode.USAGE


def _no_rule_file(paths: str) -> str:
    return (
        f"runtime-modules: no rule file in {paths}: rule files end in .toml or .json (a folder "
        "is read for those, hidden ones skipped); name such files, or folders that hold them\n"
    )


def test_paths_without_any_rule_file_are_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, registry: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".#gaming.toml").write_text("rule = []\n")  # an editor's lock file
    (hidden / "README.md").write_text("rules go here\n")
    both = f"{empty}, {hidden}"
    for argv, named in (
        (["rules", "check", str(empty)], str(empty)),
        (["rules", "check", str(empty), str(hidden)], both),
        (["simulate", "--rules", str(hidden)], str(hidden)),
        (["explain", "--rules", str(empty), str(hidden), "--links", str(empty)], both),
        (["explain", "--rules", str(empty)], str(empty)),
    ):
        code, out, err = run(capsys, *argv)
        assert (code, out, err) == (ExitCode.USAGE, "", _no_rule_file(named)), argv
    # With one rule file among them, the rest is no error.
    good = tmp_path / "good.toml"
    good.write_text("rule = []\n")
    code, out, _ = run(capsys, "rules", "check", str(empty), str(good))
    assert code == ExitCode.OK and out.startswith("rules OK: 0 rules in 1 file;")
    watch = [sys.executable, "-m", "runtime_modules", "watch", "--dry-run", "--registry",
             str(registry), "--state-dir", str(tmp_path / "state"), "--rules"]  # fmt: skip
    proc = subprocess.run(
        [*watch, str(hidden)], capture_output=True, text=True, cwd=REPO, check=False, timeout=60
    )
    assert (proc.returncode, proc.stderr) == (ExitCode.USAGE, _no_rule_file(str(hidden)))
    # An empty folder is what the NixOS module installs with no rule: the daemon runs for the
    # changes by hand, and says so (here it stops at once, on a registry that is not there).
    proc = subprocess.run(
        [*watch, str(empty), "--registry", str(tmp_path / "none.json")],
        capture_output=True, text=True, cwd=REPO, check=False, timeout=60,
    )  # fmt: skip
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.startswith(
        f"runtime-modules: note: no rule file in {empty}: no rule enables a module; modules "
        f"change only by hand\nruntime-modules: {tmp_path / 'none.json'}: no module registry"
    )


def test_simulate_replays_events(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    capture = tmp_path / "capture.txt"
    capture.write_text(
        "UDEV  [100.000000] add      /devices/pci0000:00/0000:00:03.0/0000:09:00.0 (pci)\n"
        "ACTION=add\nDEVPATH=/devices/pci0000:00/0000:00:03.0/0000:09:00.0\nSUBSYSTEM=pci\n"
        "PCI_ID=10DE:2484\nPCI_CLASS=30000\n\n"
    )
    code, out, err = run(capsys, "simulate", "--events", str(capture), "--rules", RULES)
    assert code == 0 and out.startswith(f"replaying {capture}")
    assert err.startswith("simulate: no --udev-db, --umockdev or --links given")
    assert "apply #1 would start: {gaming}" in out


# --- explain --------------------------------------------------------------------------------


def test_explain_a_recording(
    capsys: pytest.CaptureFixture[str], recording_paths: dict[str, Path]
) -> None:
    code, out, _ = run(
        capsys, "explain", "gaming", "--rules", RULES, "--udev-db", str(recording_paths["hp835g10"])
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "gaming: not wanted"
    assert lines[1].startswith("  rule gaming-on-nvidia-gpu: no device with subsystem=pci")
    assert lines[1].endswith(
        "closest: /devices/pci0000:00/0000:00:08.1/0000:c4:00.0 has PCI_ID=1002:15BF"
    )
    assert len(lines) == 3  # the two gaming rules only


def test_explain_json(capsys: pytest.CaptureFixture[str], recording_paths: dict[str, Path]) -> None:
    code, out, _ = run(
        capsys,
        "explain",
        "--rules",
        RULES,
        "--udev-db",
        str(recording_paths["dell-edge"]),
        "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["modules"]["virtualization"] == {
        "wanted": True,
        "rules": ["virtualization-when-docked"],
    }
    entry = data["rules"]["virtualization-when-docked"]
    assert entry["active"] and len(entry["matches"]) == 2 and entry["why"][0].startswith("rule ")


def test_explain_unknown_module(
    capsys: pytest.CaptureFixture[str], registry: Path, recording_paths: dict[str, Path]
) -> None:
    dump = str(recording_paths["dgx"])
    code, _, err = run(capsys, "explain", "gamin", "--rules", RULES, "--udev-db", dump)
    assert (
        code == 2
        and err == "runtime-modules: no rule names module 'gamin'; did you mean 'gaming'?\n"
    )
    code, out, _ = run(
        capsys,
        "explain",
        "office",
        "--registry",
        str(registry),
        "--rules",
        RULES,
        "--udev-db",
        dump,
    )
    assert code == 0 and out == "office: not wanted: no rule names it (it changes only by hand)\n"
    code, _, err = run(
        capsys, "explain", "offic", "--registry", str(registry), "--rules", RULES, "--udev-db", dump
    )
    assert code == 2 and "did you mean 'office'?" in err


def test_explain_takes_rules_paths_like_simulate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    more = tmp_path / "more"
    more.mkdir()
    (more / "demo.toml").write_text(
        '[[rule]]\nname = "demo-veth"\nmodules = ["demo"]\n[rule.when.link]\nkind = "veth"\n'
    )
    links = tmp_path / "links.json"
    v0 = {"ifindex": 7, "ifname": "v0", "operstate": "UP", "linkinfo": {"info_kind": "veth"}}
    links.write_text(json.dumps([{**v0, "addr_info": []}]))  # as `ip -j -d addr` writes it
    recording = ["--links", str(links)]
    # The form the demo prints, as for watch and simulate: every path after one --rules.
    code, out, err = run(capsys, "explain", "--rules", RULES, str(more), *recording)
    heads = [line for line in out.splitlines() if not line.startswith(" ")]
    assert code == 0, err
    assert heads == ["demo: wanted", "gaming: not wanted", "lab: not wanted",
                     "virtualization: not wanted"]  # fmt: skip
    # MODULEs still go after --rules (as in docs/benchmarks.md), or before it.
    for argv in (
        ["explain", "--rules", RULES, str(more), "demo", *recording],
        ["explain", "demo", "--rules", RULES, str(more), *recording],
        ["explain", "--rules", str(more), "--rules", RULES, "demo", *recording],
    ):
        code, out, err = run(capsys, *argv)
        assert (code, out.splitlines()[0], err) == (0, "demo: wanted", ""), argv
        assert "gaming" not in out
    # A path mistyped without a slash reads as a module: the error says so.
    code, out, err = run(capsys, "explain", "--rules", RULES, "mroe", *recording)
    assert (code, out) == (2, "")
    assert err == (
        "runtime-modules: no rule names module 'mroe'; rules name: gaming, lab, virtualization "
        "(a bare name after --rules is a module; write ./mroe for a folder)\n"
    )
    # The reading does not depend on what is in the current directory.
    (tmp_path / "demo").mkdir()
    code, out, err = run(capsys, "explain", "--rules", RULES, str(more), "demo", *recording)
    assert (code, out.splitlines()[0], err) == (0, "demo: wanted", "")
    assert "gaming" not in out  # "demo" was the module, not ./demo
    code, out, err = run(capsys, "explain", "--rules", RULES, "./more", *recording)
    assert code == 0 and out.splitlines()[0] == "demo: wanted", err  # ./NAME: a folder here


@pytest.mark.usefixtures("udevd")
def test_explain_the_live_machine(capsys: pytest.CaptureFixture[str]) -> None:
    needs = load_rules([EXAMPLE_RULES]).needs()
    world = live_world(needs)
    assert world.devices["/devices/virtual/net/lo"].subsystem == "net"  # net is needed
    assert "lo" in {link.ifname for link in world.links.values()}
    # Only what the rules need: their subsystems, and the ancestors of such devices.
    assert needs.subsystems is not None
    for d in world.devices.values():
        assert d.subsystem in needs.subsystems or any(
            p.startswith(d.devpath + "/") for p in world.devices
        )
    code, out, _ = run(capsys, "explain", "--rules", RULES)
    heads = [line for line in out.splitlines() if not line.startswith(" ")]
    assert code == 0 and [h.split(": ")[0] for h in heads] == ["gaming", "lab", "virtualization"]
    assert all(h.split(": ")[1] in ("wanted", "not wanted") for h in heads)
    assert out.count("  rule ") == 5  # every example rule explained
    # The address rule was explained with this machine's addresses (lo has 127.0.0.1/8).
    assert world.link_by_name("lo").addresses >= {"127.0.0.1/8"}  # type: ignore[union-attr]
    assert re.search(r"rule lab-on-the-lab-network: (no link with operstate=|.*active)", out)


def test_the_installed_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runtime_modules", "rules", "check", RULES],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("rules OK: 5 rules in 3 files")


def test_the_demo_keeps_to_its_own_state_directory(tmp_path: Path) -> None:
    # scripts/demo wipes its state directory: it must never be the one the environment names (a
    # live daemon's /run/runtime-modules). Run on a copy whose setup and command are stand-ins.
    (tmp_path / "scripts").mkdir()
    demo = tmp_path / "scripts" / "demo"
    demo.write_bytes((REPO / "scripts" / "demo").read_bytes())
    demo.chmod(0o755)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    seen = tmp_path / "seen"
    for path, body in (
        (tmp_path / "scripts" / "setup", "exit 0\n"),
        (bin_dir / "runtime-modules", f'echo "$RUNTIME_MODULES_STATE_DIR $*" > {seen}\n'),
    ):
        path.write_text(f"#!/bin/sh\n{body}")
        path.chmod(0o755)
    live = tmp_path / "live"
    live.mkdir()
    (live / "overrides.json").write_text("{}")
    proc = subprocess.run(
        [str(demo)],
        env={"PATH": "/usr/bin:/bin", "RUNTIME_MODULES_STATE_DIR": str(live)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (live / "overrides.json").exists()  # left alone
    env_dir, *argv = seen.read_text().split()
    assert env_dir == "/tmp/runtime-modules-demo"  # what the daemon it runs gets
    assert argv[argv.index("--state-dir") + 1] == "/tmp/runtime-modules-demo"
    assert "(state in /tmp/runtime-modules-demo)" in proc.stdout


def test_names_are_shown_never_obeyed_by_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A file name (like a device or interface name) can carry terminal escapes; every verb's
    # plain output writes them as text.
    bad = tmp_path / "evil\x1b]0;owned\x07\u202e.toml"
    bad.write_text(
        '[[rule]]\nname = "r\\u001b[2J"\nmodules = ["m"]\n[rule.when.link]\nifnme = "x"\n'
    )
    assert main(["rules", "check", str(bad)]) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert "evil\\x1b]0;owned\\x07\\u202e.toml" in text
    assert not any(c in text for c in "\x1b\x07\u202e")


@pytest.mark.root
def test_a_links_recording_without_addresses_is_said_when_rules_test_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, netns: str
) -> None:
    from tests.fixtures.system import ip_netns

    ip_netns(netns, "link", "add", "lab0", "type", "veth", "peer", "name", "peer0")
    ip_netns(netns, "addr", "add", "10.20.0.5/16", "dev", "lab0")
    files = {}
    for what in ("link", "addr"):
        files[what] = tmp_path / f"{what}.json"
        with files[what].open("w") as f:
            subprocess.run(["ip", "-n", netns, "-j", "-d", what], stdout=f, check=True)
    code, out, err = run(capsys, "explain", "--rules", RULES, "--links", str(files["link"]))
    assert code == 0
    assert err == (
        f"runtime-modules: warning: {files['link']} holds no addresses (made with `ip -j link`?), "
        "and some rules test `ip`: they see links without any; record with `ip -j -d addr > "
        "FILE`\n"
    )
    code, out, err = run(capsys, "explain", "--rules", RULES, "--links", str(files["addr"]))
    assert (code, err) == (0, "")
    # The address was read: lab0 misses the rule by its state only.
    assert (
        "rule lab-on-the-lab-network: no link with operstate=[up, unknown] and "
        "ip=[10.20.0.0/16, fd00:20::/48]; closest: lab0 has operstate=down\n"
    ) in out, out
