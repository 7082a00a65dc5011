"""Benchmark 5: coldplug and evaluation on a real machine's dump and on a large synthetic one.

    python bench/bench_coldplug.py [--repeat 5]

Coldplug is what the daemon does once at start: take the world (here read from a dump instead of
enumerated), evaluate every rule on it (``IncrementalEvaluator.reset``) and hand the truth to the
reconciler (``Pipeline.coldplug``). Timed on the DGX Station's udev database (~1,800 devices,
../shared/fixtures) with the example rules and with 200 synthetic rules, and on 5,000 synthetic
devices with 200 rules (bench/bench_evaluate.py's world). Side by side: what a process per event
pays each time for the same, ``runtime-modules simulate --udev-db DGX --rules rules/`` from start
to exit; and the live enumeration of this machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DGX, PYTHON, REPO, Section, met
from bench_evaluate import make_rules, make_world

from runtime_modules._dumps import read_udev_db
from runtime_modules._pipeline import Pipeline
from runtime_modules._reconciler import Reconciler
from runtime_modules._rules import RuleSet, load_rules
from runtime_modules._world import World


def _coldplug(rules: RuleSet, load: object, repeat: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        world = load()  # type: ignore[operator]
        Pipeline(rules, Reconciler(), world).coldplug(frozenset(), 0.0)
        times.append(time.perf_counter() - t0)
        size = len(world.devices)
    return statistics.median(times), size


def run(repeat: int = 5) -> Section:
    examples = load_rules([REPO / "rules"])
    synthetic = make_rules(200)
    dgx = lambda: World.of(read_udev_db(DGX))  # noqa: E731
    big = make_world(5000, 100)
    big_copy = big.copy
    t_dgx_ex, n_dgx = _coldplug(examples, dgx, repeat)
    t_dgx_200, _ = _coldplug(synthetic, dgx, repeat)
    t_big, n_big = _coldplug(synthetic, big_copy, repeat)
    t_parse = statistics.median(_time(lambda: read_udev_db(DGX)) for _ in range(repeat))
    spawn = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(
            [
                PYTHON,
                "-m",
                "runtime_modules",
                "simulate",
                "--udev-db",
                str(DGX),
                "--rules",
                str(REPO / "rules"),
            ],
            check=True,
            capture_output=True,
        )
        spawn.append(time.perf_counter() - t0)
    t_spawn = statistics.median(spawn)
    live, n_live = _live(repeat)
    section = Section(
        "5. Coldplug and evaluation",
        "≤ 300 ms on the real 1,800-device dump; ≤ 1 s for 5,000 devices and 200 rules",
    )
    section.rows += [
        (
            f"DGX Station dump ({n_dgx:,} devices), {len(examples.rules)} example rules",
            f"{t_dgx_ex * 1000:.0f} ms",
            f"{t_spawn * 1000:.0f} ms per event (`simulate` process)",
            "≤ 300 ms",
            met(t_dgx_ex <= 0.3),
        ),
        (
            f"DGX Station dump ({n_dgx:,} devices), 200 rules",
            f"{t_dgx_200 * 1000:.0f} ms",
            "",
            "≤ 300 ms",
            met(t_dgx_200 <= 0.3),
        ),
        ("… of which reading the dump", f"{t_parse * 1000:.0f} ms", "", "", ""),
        (
            f"synthetic: {n_big:,} devices, 100 links, 200 rules",
            f"{t_big * 1000:.0f} ms",
            "",
            "≤ 1 s",
            met(t_big <= 1.0),
        ),
        (
            f"this machine, live enumeration (pyudev, {n_live} devices) + example rules",
            f"{live * 1000:.0f} ms",
            "",
            "",
            "",
        ),
    ]
    section.notes += [
        f"- Median of {repeat} runs each. Coldplug = world from the dump (parsing included), "
        "every rule evaluated, the reconciler fed (`Pipeline.coldplug`).",
        "- The daemon pays this once, at start; afterwards each event costs an incremental "
        "update (bench/bench_evaluate.py: a few µs per change). A process per event pays it, "
        "and an interpreter start, on every event: the baseline column.",
    ]
    section.data = {"dgx_ms": t_dgx_ex * 1000, "big_ms": t_big * 1000}
    return section


def _time(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def _live(repeat: int) -> tuple[float, int]:
    import pyudev

    from runtime_modules._udev_source import enumerate_devices

    rules = load_rules([REPO / "rules"])
    times, n = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        world = World.of(enumerate_devices(pyudev.Context(), rules.needs()))
        Pipeline(rules, Reconciler(), world).coldplug(frozenset(), 0.0)
        times.append(time.perf_counter() - t0)
        n = len(world.devices)
    return statistics.median(times), n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    print(run(p.parse_args(argv).repeat).markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
