"""Fake NixOS systems for the applier tests: a folder with ``bin/switch-to-configuration``.

A system's ``switch-to-configuration`` records its call (a JSON line in the record file) and, run
with ``test``, makes its folder the current system by repointing the
current-system link, as NixOS's activation does with /run/current-system. It fails when
``switch-fails`` exists next to the control file (every system: how a test makes a rollback fail)
or as its own ``switch-mode`` file says (one built system: see tests/fakes/nixos-rebuild).
Standard library only: the fake nixos-rebuild imports it too.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

_SWITCH = """#!/bin/sh
# switch-to-configuration of a fake system (tests/fakes/fakesystem.py)
mode=$(cat {system}/switch-mode 2>/dev/null)
printf '{{"event": "switch", "system": "%s", "action": "%s", "pid": %s, "time": %s}}\\n' \\
    {system} "$1" "$$" "$(date +%s.%N)" >> {record}
if [ -e {fails} ] || [ "$mode" = fail ]; then
    echo "error: the activation script of {system_text} failed (fake)"
    exit 1
fi
if [ "$mode" = sigkill ]; then
    kill -KILL $$
fi
case "$mode" in
    sleep:*) sleep "${{mode#sleep:}}" ;;
    fail-later:*)
        sleep "${{mode#fail-later:}}"
        echo "error: the activation script of {system_text} failed late (fake)"
        exit 1
        ;;
esac
if [ "$1" = test ]; then
    ln -sfn {system} {link}.new && mv -T {link}.new {link}
fi
if [ "$mode" = fail-after-switch ]; then
    echo "warning: error(s) occurred while switching to the new configuration"
    exit 4
fi
printf '{{"event": "switched", "system": "%s", "action": "%s", "time": %s}}\\n' \\
    {system} "$1" "$(date +%s.%N)" >> {record}
echo "activating the configuration... done"
"""


def record(path: str | Path, **entry: Any) -> None:
    """Append one JSON line; a single small O_APPEND write, so concurrent writers do not mix."""
    entry.setdefault("time", time.time())
    data = (json.dumps(entry) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def make_system(
    systems: Path,
    *,
    imports: Any,
    record_file: Path,
    link: Path,
    control_dir: Path,
    switch: str = "ok",
) -> Path:
    """A new system folder ``systems/system-N`` holding ``imports.json``.

    ``switch`` says how its activation ends (see tests/fakes/nixos-rebuild).
    """
    systems.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        folder = systems / f"system-{n}"
        try:
            folder.mkdir()
            break
        except FileExistsError:
            n += 1
    (folder / "bin").mkdir()
    (folder / "imports.json").write_text(json.dumps(imports))
    if switch != "ok":
        (folder / "switch-mode").write_text(switch)
    switch = folder / "bin" / "switch-to-configuration"
    switch.write_text(
        _SWITCH.format(
            system=shlex.quote(str(folder)),
            system_text=folder.name,
            record=shlex.quote(str(record_file)),
            fails=shlex.quote(str(control_dir / "switch-fails")),
            link=shlex.quote(str(link)),
        )
    )
    switch.chmod(0o755)
    return folder
