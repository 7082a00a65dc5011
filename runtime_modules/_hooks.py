"""Apply hooks: executables run before and after an apply, like autorandr's hooks.

Every executable file in ``<hooks dir>/pre-apply.d/`` (or ``post-apply.d/``) runs in name order
(the order of ``run-parts``), one at a time, with

* environment ``RUNTIME_MODULES_BEFORE`` / ``RUNTIME_MODULES_AFTER`` (space-separated sorted module
  names), ``RUNTIME_MODULES_REASON``, ``RUNTIME_MODULES_PHASE``, ``RUNTIME_MODULES_APPLY_ID``, and
  ``RUNTIME_MODULES_RESULT`` after the apply, on top of the applier's own environment;
* the full JSON payload on stdin;
* a timeout, after which its whole process group is killed.

A pre-apply hook that exits non-zero, times out or cannot be started *vetoes* the apply (autorandr's
``block``): the remaining pre-apply hooks do not run and nothing is rebuilt. Post-apply hooks
cannot veto; their failures are logged and the others still run.

Files whose names start with "." or end with "~" (editor backups) are skipped. Any other entry that
cannot run is skipped with a warning in the journal: a file that is not executable (most likely a
forgotten ``chmod +x``), a folder (on NixOS: a package given where its executable was meant), a
link to nothing, anything that is not a regular file.
"""

from __future__ import annotations

import enum
import json
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._journal import Journal, JournalEvent
from ._process import describe_end, kill_group

# What of a hook's output is kept for the journal and the veto message: its last lines matter.
OUTPUT_TAIL_BYTES = 16 * 1024


class HookPhase(enum.Enum):
    PRE_APPLY = "pre-apply"
    POST_APPLY = "post-apply"

    @property
    def dirname(self) -> str:
        return f"{self.value}.d"


@dataclass(frozen=True, slots=True)
class HookResult:
    name: str
    path: Path
    returncode: int | None  # None when it timed out or could not start
    timed_out: bool
    duration: float
    output: str  # the tail of stdout and stderr together
    error: str | None = None  # why it could not start
    timeout: float = 0.0  # the time it was given, in seconds

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One phrase for messages: what the hook did and its last line of output."""
        what = describe_end(
            f"hook {self.name}",
            returncode=self.returncode,
            timed_out=self.timed_out,
            error=self.error,
            timeout=self.timeout,
        )
        if self.timed_out:
            what += (
                " (the hook timeout: RUNTIME_MODULES_HOOK_TIMEOUT, on NixOS "
                "services.runtimeModules.hooks.timeout)"
            )
        last = next((ln.strip() for ln in reversed(self.output.splitlines()) if ln.strip()), "")
        return what + (f": {last[:200]}" if last else "")


def find_hooks(hooks_dir: Path, phase: HookPhase, journal: Journal | None = None) -> list[Path]:
    """The executables of a phase, in name order (by bytes, like run-parts in the C locale)."""
    folder = hooks_dir / phase.dirname
    try:
        entries = sorted(folder.iterdir(), key=lambda p: os.fsencode(p.name))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:  # PermissionError, EIO: say so, and apply without these hooks
        if journal is not None:
            journal.send(
                JournalEvent.HOOK_FAILED,
                f"{folder}: cannot list the hooks ({exc.strerror}), none of them ran; "
                "make the folder readable by root",
                phase=phase.value,
            )
        return []
    found = []
    for path in entries:
        if path.name.startswith(".") or path.name.endswith("~"):
            continue
        problem = _not_runnable(path)
        if problem is not None:
            if journal is not None and problem:
                journal.send(JournalEvent.HOOK_FAILED, problem, hook=path.name, phase=phase.value)
            continue
        found.append(path)
    return found


def _not_runnable(path: Path) -> str | None:
    """Why ``path`` cannot run as a hook (a warning), "" to skip it quietly, None when it can."""
    try:
        st = path.stat()  # follows symlinks: NixOS links hooks into the store
    except FileNotFoundError:
        if not path.is_symlink():
            return ""  # removed since the folder was listed
        return (
            f"{path}: a link to {os.path.realpath(path)}, which does not exist, skipped; point "
            "it at the hook's executable or remove it (on NixOS: a package whose main program "
            'is not bin/<its name>: give the hook as "${pkg}/bin/<program>")'
        )
    except OSError as exc:  # ELOOP, EACCES on a folder on the way
        return f"{path}: cannot be read ({exc.strerror}), skipped; fix or remove it"
    if stat.S_ISDIR(st.st_mode):
        return (
            f"{path}: a folder, not an executable, skipped; put the hook's executable (or a "
            'link to it) there instead (on NixOS: give the hook as "${pkg}/bin/<program>", '
            "not the package's folder)"
        )
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file, skipped; a hook is an executable file: remove it"
    if not os.access(path, os.X_OK):
        return f"{path}: not executable, skipped; `chmod +x` it to run it as a hook"
    return None


def run_hook(
    path: Path, payload: bytes, env: Mapping[str, str], timeout: float, cwd: Path
) -> HookResult:
    """Run one hook to its end or its timeout; its group is killed either way when it lingers."""
    start = time.monotonic()
    # Files, not pipes: a hook that ignores stdin cannot block us, and a background child that
    # keeps stdout open cannot keep us waiting past the hook's own exit.
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out:
        stdin.write(payload)
        stdin.seek(0)
        try:
            proc = subprocess.Popen(
                [str(path)],
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            return HookResult(
                path.name,
                path,
                None,
                False,
                time.monotonic() - start,
                "",
                exc.strerror or str(exc),
                timeout,
            )
        timed_out = False
        try:
            returncode: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = None
        kill_group(proc.pid)  # its children too: a hook's leftovers must not outlive it
        if timed_out:
            proc.wait()
        duration = time.monotonic() - start
        size = out.seek(0, os.SEEK_END)
        out.seek(max(0, size - OUTPUT_TAIL_BYTES))
        output = out.read().decode("utf-8", "replace")
    return HookResult(path.name, path, returncode, timed_out, duration, output, None, timeout)


def hook_environment(phase: HookPhase, env: Mapping[str, str]) -> dict[str, str]:
    """The applier's environment plus the documented RUNTIME_MODULES_* variables."""
    full = dict(os.environ)
    full.update(env)
    full["RUNTIME_MODULES_PHASE"] = phase.value
    return full


def run_hooks(  # noqa: PLR0917 - the positional order is the documented contract
    phase: HookPhase,
    directory: Path,
    payload: Mapping[str, Any],
    env: Mapping[str, str],
    timeout: float,
    journal: Journal,
) -> list[HookResult]:
    """Run the hooks of ``phase`` found under ``directory`` (the hooks dir holding ``*.d/``).

    Returns one result per hook that ran. In the pre-apply phase it stops at the first hook that
    did not succeed: that result, last in the list, is the veto.
    """
    hooks = find_hooks(directory, phase, journal)
    if not hooks:
        return []
    data = (json.dumps(dict(payload), ensure_ascii=False) + "\n").encode()
    full_env = hook_environment(phase, env)
    apply_id = payload.get("apply_id")
    results = []
    for path in hooks:
        result = run_hook(path, data, full_env, timeout, directory)
        results.append(result)
        journal.send(
            JournalEvent.HOOK_FINISHED if result.ok else JournalEvent.HOOK_FAILED,
            f"{phase.value} {result.describe()}",
            hook=path.name,
            phase=phase.value,
            apply_id=apply_id,
            exit_status=result.returncode,
            duration_ms=round(result.duration * 1000),
            hook_output=result.output[-4096:] or None,
        )
        if not result.ok and phase is HookPhase.PRE_APPLY:
            break
    return results
