"""Overrides: the user's pins over the rules, and the pause switch, kept in two small JSON files.

A pin forces one module on or off, optionally until a wall-clock moment. Two layers:

- the runtime file (``settings.overrides_file``, under /run): survives a daemon restart, ends at
  reboot. ``enable``/``disable`` write here.
- the persistent file (``settings.persistent_overrides_file``, under /var/lib): written by
  ``--persist``, survives reboots.

They are merged on load, the runtime layer winning per module: a runtime pin shadows a persistent
one until it expires or is removed, and the persistent one shows again. ``auto`` removes a
module's pin from both layers (hand back to the rules means everywhere, also after the next boot).

``paused`` lives in the runtime file only: a pause is a "hands off for now", and a forgotten one
must not keep a machine's automation off across reboots.

Times: the files hold wall-clock moments (ISO 8601 with offset), because that is what "until
18:00" means and what survives a restart; the reconciler runs on a monotonic clock, so the daemon
converts at the boundary (``monotonic_deadline``). Inside, wall-clock moments are floats (Unix
time, seconds).

A file that is unreadable, empty, truncated, binary or huge is never fatal: a warning names it,
it is moved aside (``overrides.json.bad-<time>``), and its pins are treated as absent.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time as clock
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from ._errors import ConfigError, PermissionDeniedError, StateError
from ._reconciler import Override, OverridesChanged, OverrideState, Paused
from ._registry import MODULE_NAME
from ._settings import Settings, parse_seconds
from ._state import write_atomically

__all__ = [
    "OverrideSource",
    "OverrideState",
    "OverrideStore",
    "Overrides",
    "StoredOverride",
    "check_until",
    "monotonic_deadline",
    "parse_for",
    "parse_until",
    "until_from_flags",
]

log = logging.getLogger("runtime_modules.overrides")

# One pin is ~300 bytes and registries list tens of modules; 1 MiB is far past any file we write,
# so a bigger one is garbage and is not read whole into the memory of a root daemon.
MAX_FILE_BYTES = 1024 * 1024
FILE_VERSION: Literal[1] = 1
KEEP_BAD_COPIES = 5  # bad files kept aside per layer; older ones are deleted
# How long a change waits for the overrides lock: its holders write one small file, so a lock
# held this long is stuck (and the daemon's loop must not wait longer).
LOCK_PATIENCE = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OverrideSource:
    """Who set a pin: the peer's credentials (trusted) and the command they ran (informational)."""

    uid: int
    user: str
    command: str = ""

    def __str__(self) -> str:
        who = f"{self.user} (uid {self.uid})"
        return f"{who}: {self.command}" if self.command else who


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredOverride:
    module: str
    state: OverrideState
    until: float | None  # wall-clock Unix time; None = until `auto`
    source: OverrideSource
    created: float  # wall-clock Unix time
    persistent: bool = False  # which layer it came from

    def expired(self, now: float) -> bool:
        return self.until is not None and self.until <= now


_EMPTY: Mapping[str, StoredOverride] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Overrides:
    """The merged view: the pins in force and whether automation is paused."""

    pins: Mapping[str, StoredOverride] = field(default_factory=lambda: _EMPTY)
    paused: bool = False
    # While paused: the rules' part of the wanted set that the pause keeps (None: whatever the
    # rules wanted when it began; empty after `reset`). See the reconciler's ``Paused``.
    paused_modules: frozenset[str] | None = None
    # Persistent pins hidden by a runtime pin of the same module; one shows again when the
    # runtime pin ends.
    shadowed: Mapping[str, StoredOverride] = field(default_factory=lambda: _EMPTY)

    def next_expiry(self) -> float | None:
        """The earliest ``until`` among the pins (wall clock), for one timer instead of polling."""
        return min((p.until for p in self.pins.values() if p.until is not None), default=None)

    def next_reveal(self) -> float | None:
        """The earliest end of a runtime pin that hides a persistent one (wall clock)."""
        return min(
            (p.until for m, p in self.pins.items() if p.until is not None and m in self.shadowed),
            default=None,
        )

    def reconciler_inputs(
        self, *, wall_now: float, mono_now: float
    ) -> tuple[OverridesChanged, Paused]:
        """The reconciler's inputs for this view, ``until`` moved onto its clock.

        A runtime pin that hides a persistent one goes without its ``until``: when it ends, the
        module goes to the persistent pin, not back to the rules, so the caller (the daemon)
        removes it at ``next_reveal()`` and feeds the new view instead.
        """
        overrides = {
            name: Override(
                module=name,
                state=pin.state,
                until=None
                if pin.until is None or name in self.shadowed
                else monotonic_deadline(pin.until, wall_now=wall_now, mono_now=mono_now),
                source=str(pin.source) + (" (persistent)" if pin.persistent else ""),
            )
            for name, pin in self.pins.items()
        }
        paused = Paused(paused=self.paused, modules=self.paused_modules if self.paused else None)
        return OverridesChanged(overrides=overrides), paused


def monotonic_deadline(until: float, *, wall_now: float, mono_now: float) -> float:
    """``until`` (wall-clock) on the monotonic clock whose current reading is ``mono_now``.

    Recompute after the wall clock jumps (NTP, manual change) or a suspend: the two clocks only
    agree at the moment of conversion.
    """
    return mono_now + (until - wall_now)


# --- the file boundary (pydantic) ----------------------------------------------------------

_ModuleName = Annotated[str, StringConstraints(pattern=MODULE_NAME.pattern)]


class _SourceModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    uid: int = Field(ge=0, le=2**32 - 1)
    user: str = Field(max_length=256)
    command: str = Field(default="", max_length=4096)


class _PinModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    state: OverrideState
    until: AwareDatetime | None = None
    source: _SourceModel
    created: AwareDatetime


class _FileModel(BaseModel):
    # Unknown fields are ignored so that a newer version's additions do not make the file "bad".
    model_config = ConfigDict(extra="ignore", frozen=True)

    version: Literal[1]
    paused: bool = False
    paused_modules: list[_ModuleName] | None = None
    overrides: dict[_ModuleName, _PinModel] = Field(default_factory=dict)


def _moment(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _to_model(layer: _Layer, now: float) -> _FileModel:
    pins = [p for p in layer.pins.values() if not p.expired(now)]  # expired ones go now
    return _FileModel(
        version=FILE_VERSION,
        paused=layer.paused,
        paused_modules=None
        if not layer.paused or layer.paused_modules is None
        else sorted(layer.paused_modules),
        overrides={
            p.module: _PinModel(
                state=p.state,
                until=None if p.until is None else _moment(p.until),
                source=_SourceModel(uid=p.source.uid, user=p.source.user, command=p.source.command),
                created=_moment(p.created),
            )
            for p in sorted(pins, key=lambda p: p.module)
        },
    )


def _from_model(model: _FileModel, *, persistent: bool) -> dict[str, StoredOverride]:
    return {
        name: StoredOverride(
            module=name,
            state=pin.state,
            until=None if pin.until is None else pin.until.timestamp(),
            source=OverrideSource(
                uid=pin.source.uid, user=pin.source.user, command=pin.source.command
            ),
            created=pin.created.timestamp(),
            persistent=persistent,
        )
        for name, pin in model.overrides.items()
    }


@dataclass(slots=True)
class _Layer:
    pins: dict[str, StoredOverride]
    paused: bool = False
    paused_modules: frozenset[str] | None = None


# --- the store -----------------------------------------------------------------------------


class OverrideStore:
    """Reads and changes the two override files; every change is one atomic rewrite per file.

    Changes hold an exclusive lock (``<runtime file>.lock``) so that two writers (the daemon and a
    CLI applying directly) never lose each other's pins. Reads take no lock: files are replaced
    atomically, so a reader sees the old or the new file, never half of one.
    """

    def __init__(
        self,
        runtime_file: Path,
        persistent_file: Path,
        *,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.runtime_file = runtime_file
        self.persistent_file = persistent_file
        self._warn = warn if warn is not None else log.warning

    @classmethod
    def from_settings(
        cls, settings: Settings, *, warn: Callable[[str], None] | None = None
    ) -> OverrideStore:
        return cls(settings.overrides_file, settings.persistent_overrides_file, warn=warn)

    # -- reading

    def load(self, now: float, *, known: Collection[str] | None = None) -> Overrides:
        """The pins in force at ``now`` (wall clock), merged; expired ones left out.

        With ``known`` (the registry's module names), pins of other modules are left out with a
        warning but stay in the files, in case the module comes back.
        """
        runtime = self._read(self.runtime_file, persistent=False)
        persistent = self._read(self.persistent_file, persistent=True)
        merged: dict[str, StoredOverride] = {}
        for layer in (persistent, runtime):  # runtime second: it wins
            merged.update({m: p for m, p in layer.pins.items() if not p.expired(now)})
        if known is not None:
            for name in sorted(set(merged) - set(known)):
                self._warn(
                    f"override for {name!r} ignored: the registry has no such module "
                    f"(remove it with `runtime-modules auto {name}`)"
                )
                del merged[name]
        shadowed = {
            m: p
            for m, p in persistent.pins.items()
            if m in merged and not merged[m].persistent and not p.expired(now)
        }
        return Overrides(
            pins=MappingProxyType(merged),
            paused=runtime.paused,
            paused_modules=runtime.paused_modules if runtime.paused else None,
            shadowed=MappingProxyType(shadowed),
        )

    # -- changing

    def pin(
        self,
        modules: Iterable[str],
        state: OverrideState,
        *,
        until: float | None,
        source: OverrideSource,
        persist: bool,
        now: float,
    ) -> Overrides:
        """Force ``modules`` on or off, until ``until`` (wall clock) or until ``auto``.

        A runtime pin shadows a persistent one; a persistent pin replaces the runtime one (else
        the older runtime pin would go on hiding the one just asked for).
        """
        if until is not None and until <= now:
            raise ValueError("until must be after now")
        names = list(modules)
        with self._locked():
            runtime = self._read(self.runtime_file, persistent=False)
            target = runtime
            persistent: _Layer | None = None
            if persist:
                persistent = target = self._read(self.persistent_file, persistent=True)
                for name in names:
                    runtime.pins.pop(name, None)
            for name in names:
                target.pins[name] = StoredOverride(
                    module=name,
                    state=state,
                    until=until,
                    source=source,
                    created=now,
                    persistent=persist,
                )
            if persistent is not None:
                self._write(self.persistent_file, persistent, now)
            self._write(self.runtime_file, runtime, now)
        return self.load(now)

    def unpin(self, modules: Iterable[str], *, now: float) -> Overrides:
        """Hand ``modules`` back to the rules: remove their pins from both layers."""
        names = set(modules)
        with self._locked():
            for path, persistent in ((self.runtime_file, False), (self.persistent_file, True)):
                layer = self._read(path, persistent=persistent)
                if names & layer.pins.keys():
                    for name in names:
                        layer.pins.pop(name, None)
                    self._write(path, layer, now)
        return self.load(now)

    def expire(self, now: float) -> tuple[list[str], Overrides]:
        """Remove pins whose ``until`` has passed; returns their modules and the new view."""
        gone: set[str] = set()
        with self._locked():
            for path, persistent in ((self.runtime_file, False), (self.persistent_file, True)):
                layer = self._read(path, persistent=persistent)
                old = {m for m, p in layer.pins.items() if p.expired(now)}
                if old:
                    gone |= old
                    self._write(path, layer, now)
        return sorted(gone), self.load(now)

    def clear(self, *, now: float, persistent: bool = False) -> Overrides:
        """Remove every runtime pin, and the persistent ones too when ``persistent``."""
        with self._locked():
            runtime = self._read(self.runtime_file, persistent=False)
            runtime.pins.clear()
            self._write_if_needed(self.runtime_file, runtime, now)
            if persistent:
                self._write_if_needed(self.persistent_file, _Layer(pins={}), now)
        return self.load(now)

    def set_paused(
        self, paused: bool, *, now: float, modules: Iterable[str] | None = None
    ) -> Overrides:
        """Pause (keeping ``modules`` as the rules' part, see ``Overrides``) or resume."""
        with self._locked():
            runtime = self._read(self.runtime_file, persistent=False)
            runtime.paused = paused
            runtime.paused_modules = frozenset(modules) if paused and modules is not None else None
            self._write(self.runtime_file, runtime, now)
        return self.load(now)

    def reset(self, *, now: float) -> Overrides:
        """Back to the base system: no pin in either layer, and paused keeping nothing.

        This is what the reconciler's ``ResetRequested`` means; ``resume`` hands the modules
        back to the rules.
        """
        with self._locked():
            self._write_if_needed(self.persistent_file, _Layer(pins={}), now)
            self._write(
                self.runtime_file, _Layer(pins={}, paused=True, paused_modules=frozenset()), now
            )
        return self.load(now)

    # -- files

    def _read(self, path: Path, *, persistent: bool) -> _Layer:
        try:
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return _Layer(pins={})
        except OSError as exc:
            # Unreadable (permissions, I/O error): not ours to move aside, only to report.
            self._warn(f"{path}: cannot read overrides ({exc.strerror}); treating it as empty")
            return _Layer(pins={})
        problem: str | None = None
        if not data.strip():
            problem = "the file is empty"
        elif len(data) > MAX_FILE_BYTES:
            problem = f"the file is over {MAX_FILE_BYTES // 1024} KiB, not one we wrote"
        else:
            try:
                model = _FileModel.model_validate_json(data)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "(top level)"
                problem = f"{where}: {first['msg']}"
        if problem is not None:
            self._set_aside(path, problem)
            return _Layer(pins={})
        # The pause switch is runtime-only; a persistent file's flag is ignored.
        paused = model.paused and not persistent
        return _Layer(
            pins=_from_model(model, persistent=persistent),
            paused=paused,
            paused_modules=None
            if not paused or model.paused_modules is None
            else frozenset(model.paused_modules),
        )

    def _set_aside(self, path: Path, problem: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = path.with_name(f"{path.name}.bad-{stamp}")
        try:
            os.replace(path, aside)
        except OSError as exc:
            self._warn(
                f"{path}: {problem}; ignoring its overrides (and cannot move it aside: "
                f"{exc.strerror}); set them again with `runtime-modules enable/disable`"
            )
            return
        self._warn(
            f"{path}: {problem}; ignoring its overrides, the bad file is kept as {aside.name}; "
            "set them again with `runtime-modules enable/disable`"
        )
        bad = sorted(path.parent.glob(f"{path.name}.bad-*"))
        for old in bad[:-KEEP_BAD_COPIES]:
            with contextlib.suppress(OSError):
                old.unlink()

    def _write_if_needed(self, path: Path, layer: _Layer, now: float) -> None:
        if layer.pins or layer.paused or path.exists():
            self._write(path, layer, now)

    def _write(self, path: Path, layer: _Layer, now: float) -> None:
        text = _to_model(layer, now).model_dump_json(indent=2) + "\n"
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            write_atomically(path, text.encode())  # 0644: status readers may read it
        except PermissionError:
            raise PermissionDeniedError(
                f"{path}: changing overrides needs root; run the command with sudo"
            ) from None
        except (FileExistsError, NotADirectoryError):
            raise self._not_a_directory(path) from None
        except OSError as exc:
            raise StateError(
                f"{path}: cannot write overrides: {exc.strerror}; the previous file is unchanged "
                "(free space or make the directory writable, then retry)"
            ) from None

    def _not_a_directory(self, path: Path) -> ConfigError:
        """A file where the directory of ``path`` (or one above it) should be."""
        variable = (
            "RUNTIME_MODULES_PERSIST_DIR (default /var/lib/runtime-modules)"
            if path == self.persistent_file
            else "--state-dir or RUNTIME_MODULES_STATE_DIR (default /run/runtime-modules)"
        )
        return ConfigError(
            f"{path}: cannot write overrides: {path.parent} or a folder above it is a file, not "
            f"a directory; give a directory with {variable}, or move the file"
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.runtime_file.with_name(self.runtime_file.name + ".lock")
        try:
            lock.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError:
            raise PermissionDeniedError(
                f"{lock}: changing overrides needs root; run the command with sudo"
            ) from None
        except (FileExistsError, NotADirectoryError):
            raise self._not_a_directory(lock) from None
        except OSError as exc:
            raise StateError(f"{lock}: cannot lock the overrides: {exc.strerror}") from None
        try:
            # Not a blocking LOCK_EX: the daemon's loop takes this lock, and a stuck holder must
            # cost a clear error, not the loop. Holders keep it for one small file write.
            deadline = clock.monotonic() + LOCK_PATIENCE
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if clock.monotonic() >= deadline:
                        raise StateError(
                            f"{lock}: the overrides are locked by another process for over "
                            f"{LOCK_PATIENCE:g}s; try again, or see who holds it with "
                            f"`fuser {lock}`"
                        ) from None
                    clock.sleep(0.01)
            yield
        finally:
            os.close(fd)  # closing releases the flock


# --- --for and --until ---------------------------------------------------------------------
# Pure: the current time is an argument. Every bad input raises ConfigError saying which format
# is expected; nothing else escapes (the tests fuzz both).

_TIME_OF_DAY = re.compile(r"\s*([01]?[0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?\s*", re.ASCII)
_UNTIL_HELP = (
    "expected a time of day like 18:00 (today, or tomorrow when it has passed) "
    "or an ISO date and time like 2026-05-01T18:00 or 2026-05-01T18:00+02:00"
)


def parse_for(text: str) -> float:
    """Seconds in a ``--for`` value: "2h", "90m", "1h30m" (the rules' duration format, a
    number needing its unit); ``parse_seconds`` reads it, as every duration of the settings.

    Raises:
        ConfigError: not such a duration, zero, or over the rules' maximum (a week).
    """
    return parse_seconds(
        text,
        "--for",
        number_is_seconds=False,
        examples="2h, 90m, 1h30m or 45s",
        longer="; for longer, use --until, or pin without a time limit (and `runtime-modules "
        "auto MODULE` to hand it back)",
    )


# The furthest a timed pin may end: a year (a leap one) covers every real use, and keeps every
# moment printable (datetime stops at the year 9999; the wire's offsets could push past it).
MAX_PIN_SECONDS = 366 * 24 * 3600.0


def check_until(until: float, now: float, what: str) -> None:
    """Refuse a pin end more than ``MAX_PIN_SECONDS`` after ``now`` (a ConfigError)."""
    if until - now > MAX_PIN_SECONDS:
        raise ConfigError(
            f"{what}: more than a year from now; pin without a time limit instead (and "
            "`runtime-modules auto MODULE` to hand it back)"
        )


def parse_until(text: str, now: datetime) -> datetime:
    """The moment an ``--until`` value names, as an aware datetime after ``now`` (aware).

    "HH:MM" or "HH:MM:SS" is today in the local time zone, or tomorrow when that has passed.
    An ISO date and time without an offset is local time.

    Raises:
        ConfigError: not such a time, or the ISO moment is not in the future, or is more than
            a year ahead (``MAX_PIN_SECONDS``).
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    try:
        if m := _TIME_OF_DAY.fullmatch(text):
            local_now = now.astimezone()
            tod = time(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
            # A naive datetime's astimezone() reads it as local time, DST included.
            moment = datetime.combine(local_now.date(), tod).astimezone()
            if moment <= now:
                moment = datetime.combine(local_now.date() + timedelta(days=1), tod).astimezone()
            return moment
        parsed = datetime.fromisoformat(text.strip())
        moment = parsed.astimezone() if parsed.tzinfo is None else parsed
        moment.timestamp()  # dates at the ends of the calendar fail here, not later
    except (ValueError, OverflowError, OSError):
        raise ConfigError(f"--until {text!r}: {_UNTIL_HELP}") from None
    if moment <= now:
        raise ConfigError(f"--until {text!r}: that moment has passed; give a time in the future")
    check_until(moment.timestamp(), now.timestamp(), f"--until {text!r}")
    return moment


def until_from_flags(for_: str | None, until: str | None, *, now: float) -> float | None:
    """The wall-clock end of a pin from ``--for`` or ``--until`` (at most one), or None."""
    if for_ is not None and until is not None:
        raise ConfigError("give --for or --until, not both")
    if for_ is not None:
        return now + parse_for(for_)
    if until is not None:
        return parse_until(until, datetime.fromtimestamp(now, UTC)).timestamp()
    return None
