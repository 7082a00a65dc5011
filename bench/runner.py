"""Run every benchmark of issue 7 and write docs/benchmarks.md (``bench/run`` calls this).

    python bench/runner.py [--quick] [--out docs/benchmarks.md]

Each benchmark module also runs alone (``python bench/bench_latency.py`` …) and prints its part.
``--quick`` uses small samples, for trying the machinery (the document then says so).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_apply
import bench_coldplug
import bench_economy
import bench_idle
import bench_latency
from _common import REPO, Section, machine

FULL = {"events": 10_000, "spawns": 200, "veth": 2_000, "hooks": 100, "storm": 10_000,
        "idle": 60.0, "repeat": 5, "applies": 50, "cli": 20}  # fmt: skip
QUICK = {"events": 500, "spawns": 10, "veth": 100, "hooks": 5, "storm": 2_000,
         "idle": 5.0, "repeat": 2, "applies": 10, "cli": 3}  # fmt: skip


def render(sections: list[Section], info: dict[str, str], command: str, seconds: float) -> str:
    lines = [
        "# Benchmarks",
        "",
        "<!-- Written by bench/run (bench/runner.py); do not edit by hand. -->",
        "",
        "Measured side by side in one run: the daemon against what it replaces, a fresh process "
        "per event (a udev `RUN+=` hook, autorandr's pattern) or per change (the reference "
        "CLI). Timings are never asserted by tests; the figures are for this page.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {info['cpu']} |",
        f"| cores | {info['cores']} (shared with other work while this ran) |",
        f"| kernel | {info['kernel']} |",
        f"| Python | {info['python']} |",
        f"| date | {info['date']} |",
        f"| command | `{command}` ({seconds / 60:.1f} min) |",
        "",
    ]
    for s in sections:
        lines += [s.markdown(), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small samples (a trial, not figures)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    a = p.parse_args(argv)
    n = QUICK if a.quick else FULL
    t0 = time.monotonic()
    sections: list[Section] = []
    steps = [
        (
            "latency and storm",
            lambda: bench_latency.run(n["events"], n["spawns"], n["veth"], n["hooks"], n["storm"]),
        ),
        ("rebuild economy", lambda: [bench_economy.run()]),
        ("idle cost", lambda: [bench_idle.run(n["idle"])]),
        ("coldplug", lambda: [bench_coldplug.run(n["repeat"])]),
        ("apply overhead", lambda: [bench_apply.run(n["applies"], n["cli"])]),
    ]
    for name, step in steps:
        started = time.monotonic()
        print(f"bench: {name}…", file=sys.stderr, flush=True)
        sections += step()
        print(f"bench: {name} done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    sections.sort(key=lambda s: s.title)
    command = "sudo bench/run" + (" --quick" if a.quick else "")
    a.out.write_text(render(sections, machine(), command, time.monotonic() - t0))
    print(f"bench: wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
