"""The applier's state file: which modules are applied, each module's state, the last apply.

``<state dir>/state.json`` is the truth the CLI shows and the daemon starts from. It is replaced
atomically (temp file in the same directory, fsync, rename, fsync of the directory), so a reader or
a power cut sees the old file or the new one, never half of one. A write that fails (read-only or
full file system) raises StateError and leaves the old file as it was.

A missing file is an empty state (nothing applied: the base system). A file we cannot parse is set
aside as ``state.json.corrupt`` and replaced by an empty state marked *uncertain*: which modules
run is then unknown, so the next apply rebuilds even when nothing seems to change.

An ``in_progress`` record is written before ``nixos-rebuild`` starts and cleared when the apply
has ended; finding one under the apply lock means the applier died mid-apply (see
``Applier.recover``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from pydantic import TypeAdapter, ValidationError

from ._errors import PermissionDeniedError, StateError
from ._settings import Settings

if TYPE_CHECKING:
    from ._journal import Journal

STATE_VERSION = 1
# A state we write is a few KiB even for hundreds of modules; anything this big was not written
# by us, and a resident daemon should not read it whole.
MAX_STATE_BYTES = 4 * 1024 * 1024


class ApplyResult(enum.Enum):
    """How an apply ended. Every failure but ROLLBACK_FAILED left the previous system running."""

    SUCCEEDED = "succeeded"
    UNCHANGED = "unchanged"  # the target was already applied: no rebuild
    DRY_RUN = "dry-run"  # everything but nixos-rebuild
    FAILED = "failed"  # the build or the activation failed (or the applier died); a failed
    # activation is rolled back, a failed build never touched the running system
    TIMED_OUT = "timed-out"  # the build was killed after the apply timeout; system untouched
    CANCELLED = "cancelled"  # the build was stopped on request (daemon shutdown); untouched
    ROLLBACK_FAILED = "rollback-failed"  # ... and the previous system could not be restored
    VETOED = "vetoed"  # a pre-apply hook refused; nothing ran

    @property
    def ok(self) -> bool:
        return self in (ApplyResult.SUCCEEDED, ApplyResult.UNCHANGED, ApplyResult.DRY_RUN)


class ModuleStatus(enum.Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    FAILED = "failed"  # the last change of this module failed; `message` says how


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleState:
    status: ModuleStatus
    message: str | None = None
    since: float | None = None  # wall time of the change


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyRecord:
    """One finished apply, as ``status`` shows it."""

    apply_id: str
    started: float  # wall time
    duration: float  # seconds
    result: ApplyResult
    reason: str
    before: frozenset[str]
    after: frozenset[str]  # what is applied now
    target: frozenset[str]  # what was asked for
    system_before: str | None = None
    system_after: str | None = None
    log_path: str | None = None
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class InProgress:
    """Written before nixos-rebuild starts; what recovery needs to roll back."""

    apply_id: str
    pid: int  # the applier
    pid_start: int | None  # its start time (clock ticks), so a reused pid is not mistaken
    started: float
    reason: str
    before: frozenset[str]
    target: frozenset[str]
    system_before: str | None
    log_path: str | None = None
    rebuild_pgid: int | None = None  # nixos-rebuild's process group, once it runs
    rebuild_start: int | None = None
    built: str | None = None  # the system being activated, once the build is done


@dataclass(frozen=True, slots=True, kw_only=True)
class State:
    applied: frozenset[str] = frozenset()
    modules: Mapping[str, ModuleState] = field(default_factory=lambda: MappingProxyType({}))
    last_apply: ApplyRecord | None = None
    in_progress: InProgress | None = None
    # Why the applied set may not be what runs (state recovered, rollback failed); None when the
    # state is known to be true. Set, it makes the next apply rebuild even without a change.
    uncertain: str | None = None
    version: int = STATE_VERSION

    def module_status(self, name: str) -> ModuleState:
        known = self.modules.get(name)
        if known is not None:
            return known
        status = ModuleStatus.ENABLED if name in self.applied else ModuleStatus.DISABLED
        return ModuleState(status=status)

    def with_(self, **changes: object) -> State:
        return replace(self, **changes)  # type: ignore[arg-type]


_ADAPTER = TypeAdapter(State)


def dump_state(state: State) -> bytes:
    """The state as the file holds it: sets as sorted lists, so the file diffs well."""
    data = _ADAPTER.dump_python(state.with_(modules=dict(state.modules)), mode="json")
    data["applied"] = sorted(state.applied)
    data["modules"] = {k: data["modules"][k] for k in sorted(data["modules"])}
    for key in ("last_apply", "in_progress"):
        record = getattr(state, key)
        if record is not None:
            for name in ("before", "after", "target"):
                if hasattr(record, name):
                    data[key][name] = sorted(getattr(record, name))
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def parse_state(data: bytes) -> State:
    """Validate state file bytes; raises ValueError with a one-line reason."""
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"the file is over {MAX_STATE_BYTES // (1024 * 1024)} MiB")
    if not data.strip():
        raise ValueError("the file is empty")
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError("not a runtime-modules state (nested too deeply)") from None
    if not isinstance(obj, dict) or "version" not in obj:
        raise ValueError("not a runtime-modules state (no version field)")
    try:
        state = _ADAPTER.validate_python(obj)
    except RecursionError:
        raise ValueError("not a runtime-modules state (nested too deeply)") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ValueError(f"{where}: {first['msg']}") from None
    if state.version != STATE_VERSION:
        raise ValueError(f"state version {state.version} is not {STATE_VERSION}")
    return state.with_(modules=MappingProxyType(dict(state.modules)))


def load_state(
    settings: Settings, *, journal: Journal | None = None, locked: bool = False
) -> State:
    """The state in ``settings.state_file``; never raises for a bad file (see module docstring).

    A bad file is replaced (and kept aside) only under the apply lock: ``locked`` says the caller
    holds it; otherwise it is taken for the write if free, and the file is left for the apply
    that holds it when not (a `status` must not write beside a running apply).

    Raises StateError only when the file exists but cannot be read at all (an I/O error).
    """
    path = settings.state_file
    try:
        with path.open("rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return State()
    except PermissionError:
        raise PermissionDeniedError(
            f"{path}: cannot read the state file; run the command with sudo"
        ) from None
    except OSError as exc:
        raise StateError(f"{path}: cannot read the state file: {exc.strerror}") from None
    try:
        return parse_state(data)
    except ValueError as exc:
        return _recover(settings, data, str(exc), journal, locked=locked)


def _recover(
    settings: Settings, data: bytes, problem: str, journal: Journal | None, *, locked: bool
) -> State:
    from ._journal import Journal, JournalEvent
    from ._lock import ApplyLock

    path = settings.state_file
    aside = path.with_name(path.name + ".corrupt")
    state = State(
        uncertain=(
            f"the state file was unreadable ({problem}); which modules are applied is unknown "
            "until the next apply, which rebuilds"
        )
    )
    lock = ApplyLock(settings.lock_file)
    try:
        if not locked and not lock.try_acquire():
            raise StateError("an apply holds the lock; it recovers the file")
        # Copy aside, then write over the bad file: a failed write leaves the bad file in place,
        # so the next load recovers again and the "uncertain" mark is never lost.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
        try:
            os.link(path, aside)  # the whole file, even past what was read
        except OSError:
            write_atomically(aside, data)
        save_state(settings, state)
        kept = f"kept as {aside}"
    except (OSError, StateError, PermissionDeniedError) as exc:
        # A caller without write access (a user's `status`) only reports; root will recover.
        kept = f"left in place ({exc})"
    finally:
        lock.release()
    (journal or Journal()).send(
        JournalEvent.STATE_RECOVERED,
        f"{path}: {problem}; starting from an empty state marked uncertain (the bad file is "
        f"{kept}); run `runtime-modules rebuild` to make the system match",
        state_file=path,
        problem=problem,
    )
    return state


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename, fsync dir.

    On any error the temp file is removed and ``path`` is unchanged.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def state_dir_problem(exc: OSError, path: Path) -> str:
    """What to do about an OSError on the state directory, in one phrase."""
    if exc.errno == errno.EROFS:
        return "the state directory is on a read-only file system; remount it read-write"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the file system of {path.parent} is full; free some space"
    return "check the state directory"


def save_state(settings: Settings, state: State) -> None:
    """Write the state atomically; StateError (old file intact) when it cannot be written."""
    path = settings.state_file
    data = dump_state(state)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        write_atomically(path, data)
    except PermissionError:
        raise PermissionDeniedError(
            f"{path}: changing modules needs root; run the command with sudo"
        ) from None
    except OSError as exc:
        raise StateError(
            f"{path}: cannot write the state: {exc.strerror}; {state_dir_problem(exc, path)} "
            "(the previous state file is unchanged)"
        ) from None
