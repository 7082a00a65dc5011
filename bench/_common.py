"""What the benchmarks share: statistics, the machine, a fake machine to apply on, namespaces.

Benchmarks run as root on the real parts the tests use (umockdev, udevd, netlink in a namespace of
their own, the fake ``nixos-rebuild``); nothing here is timed itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PYTHON = sys.executable
SHARED = REPO.parent / "shared" / "fixtures"
DGX = SHARED / "udev-db" / "gpu-nvidia-4x-v100-dgx-station.udevdb.txt"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank: the value below which q % of samples fall."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50, p99, max in milliseconds of samples in seconds, and their count."""
    return {
        "n": len(values),
        "p50": percentile(values, 50) * 1000,
        "p99": percentile(values, 99) * 1000,
        "max": max(values) * 1000,
    }


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


@dataclass
class Section:
    """One benchmark's part of docs/benchmarks.md."""

    title: str
    target: str
    rows: list[tuple[str, ...]] = field(default_factory=list)
    header: tuple[str, ...] = ("measure", "runtime-modules", "baseline", "target", "met")
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", f"Target: {self.target}", ""]
        if self.rows:
            lines.append("| " + " | ".join(self.header) + " |")
            lines.append("|" + "---|" * len(self.header))
            lines += ["| " + " | ".join(row) + " |" for row in self.rows]
            lines.append("")
        lines += [*self.notes]
        return "\n".join(lines).rstrip() + "\n"


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = f"rmb{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64m") -> Iterator[Path]:
    """A tmpfs like /run on NixOS, where the state dir lives (fsync there costs nothing)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fake_system(root: Path) -> Any:
    """The tests' fake machine (tests/fixtures/applier.py): registry, base flake, fake rebuild.

    The fake's variables are set in this process too, so in-process daemons find them.
    """
    from tests.fixtures.applier import _make

    fake = _make(root)
    for key, value in fake.env.items():
        if key.startswith("RUNTIME_MODULES_FAKE_") or key == "RUNTIME_MODULES_CURRENT_SYSTEM":
            os.environ[key] = value
    return fake


def starts(record_file: Path) -> int:
    """How many times the fake nixos-rebuild started."""
    try:
        lines = record_file.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.strip() and json.loads(line)["event"] == "start")


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            data: dict[str, Any] = json.loads(line)
            return data
    raise RuntimeError(f"no JSON result in:\n{text[-3000:]}")
