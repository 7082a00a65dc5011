"""A coverage-guided fuzzer (atheris) over rule files and device values, down to the flake.

    python tests/reliability/atheris_harness.py -atheris_runs=4000

Each input is cut into a rule file (TOML or JSON) and a few device property values and an
interface name. The rules must parse or fail with a located ``RuleError``; when they parse, they
are evaluated on a world holding those values and the reconciler decides; the set it would apply
(registry modules only) is written as a flake, whose ``flake.nix`` must stay byte for byte the
same. Anything else (another exception, a changed flake) is a crash that libFuzzer reports with
the input that caused it. tests/test_reliability.py runs it when atheris is installed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    # parse_rules loads the file format on first use: load it here, so it is instrumented too.
    import runtime_modules._rule_format  # noqa: F401
    from runtime_modules._errors import RuleError
    from runtime_modules._evaluate import evaluate
    from runtime_modules._flake import FLAKE_NIX, write_flake
    from runtime_modules._rules import parse_rules
    from runtime_modules._world import Device, Link, OperState, World

MODULES = frozenset({"gaming", "podman", "virtualization"})
FLAKE_DIR = Path(tempfile.mkdtemp(prefix="rm-atheris-")) / "flake"
write_flake(FLAKE_DIR, base_url="path:/nonexistent/base", host="testhost", modules=frozenset())
REFERENCE = (FLAKE_DIR / FLAKE_NIX).read_bytes()
SEED_RULE = """
[[rule]]
name = "gpu"
modules = ["gaming"]
[rule.when.device]
subsystem = "pci"
properties = { PCI_ID = "10DE:*" }
"""


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    as_json = fdp.ConsumeBool()
    text = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048))
    if fdp.ConsumeBool():
        text = SEED_RULE.encode() + text
    values = [fdp.ConsumeUnicodeNoSurrogates(64) for _ in range(3)]
    ifname = fdp.ConsumeBytes(15).decode("utf-8", "backslashreplace")
    try:
        rules = parse_rules(text, "fuzz.json" if as_json else "fuzz.toml")
    except RuleError as exc:
        assert exc.problems and all(p.file.startswith("fuzz.") for p in exc.problems)
        return
    device = Device(
        devpath="/devices/pci0000:00/0000:00:01.0",
        subsystem="pci",
        properties={"PCI_ID": values[0], "ID_MODEL": values[1]},
        sysname=values[2] or "x",
    )
    world = World.of([device], [Link(index=1, ifname=ifname, operstate=OperState.UP)])
    results = evaluate(rules, world)
    wanted = frozenset(
        m for r in rules.rules if r.enabled and results[r.name].holds for m in r.modules
    )
    write_flake(
        FLAKE_DIR, base_url="path:/nonexistent/base", host="testhost", modules=wanted & MODULES
    )
    if (FLAKE_DIR / FLAKE_NIX).read_bytes() != REFERENCE:
        raise AssertionError("the generated flake.nix changed")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
