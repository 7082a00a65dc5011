"""Running one child command of an apply: the build, an activation, a rollback.

Each runs in its own process group, its output streamed line by line to the caller, the apply's
capped log file and the journal. A killable one is killed, with all its group, at its timeout or
on cancel (SIGTERM, then SIGKILL after TERM_GRACE); one that is not (an activation) is waited for.
The applier sees one method: ``Runner.run``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ._journal import Journal, JournalEvent, Priority
from ._process import describe_end, kill_group, seconds_text

__all__ = ["JOURNAL_OUTPUT_LINES", "LOG_HEAD_BYTES", "LOG_TAIL_BYTES", "OutputLog", "Run", "Runner"]

# The log of one apply keeps its first MiB live (what was built) and its last 4 MiB (where it
# failed); the state dir is a tmpfs in RAM (/run), so a chatty build must not fill it.
LOG_HEAD_BYTES = 1024 * 1024
LOG_TAIL_BYTES = 4 * 1024 * 1024
# journald's default rate limit lets a service log 10,000 entries per 30 s (journald.conf(5),
# RateLimitBurst); beyond that an apply's output would be dropped anyway, so we stop there and say
# where the full log is.
JOURNAL_OUTPUT_LINES = 10_000
MAX_LINE_BYTES = 64 * 1024  # a longer "line" is cut into pieces
TERM_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a killed command's process group
EXIT_DRAIN = 1.0  # after the command exits, how long leftovers may keep its output pipe open
LAST_LINES = 20  # output lines kept to explain a failure


@dataclass(slots=True)
class Run:
    """How one child command ended."""

    returncode: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    overran: bool = False  # ran past its bound but was not killed (an activation)
    error: str | None = None  # it could not be started
    last_lines: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=LAST_LINES)
    )

    @property
    def ok(self) -> bool:
        return (
            self.returncode == 0 and self.error is None and not (self.timed_out or self.cancelled)
        )

    def describe(self, name: str, timeout: float) -> str:
        what = describe_end(
            name,
            returncode=self.returncode,
            timed_out=self.timed_out,
            cancelled=self.cancelled,
            error=self.error,
            timeout=timeout,
        )
        last = next((ln.strip() for ln in reversed(self.last_lines) if ln.strip()), "")
        return what + (f' (last output: "{last[:200]}")' if last else "")


class OutputLog:
    """The per-apply log file: the first LOG_HEAD_BYTES as they come, then only the last
    LOG_TAIL_BYTES, written when the apply ends. Write errors (a full disk) end logging, not the
    apply."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.error: str | None = None
        self._file: IO[bytes] | None = None
        self._written = 0
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_bytes = 0
        self._omitted_bytes = 0
        self._omitted_lines = 0
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                self._file = path.open("ab")
            except OSError as exc:
                self.error = exc.strerror or str(exc)

    def write(self, line: str) -> None:
        if self._file is None:
            return
        data = line.encode("utf-8", "replace") + b"\n"
        if self._written + len(data) <= LOG_HEAD_BYTES and not self._tail:
            self._put(data)
            return
        self._tail.append(data)
        self._tail_bytes += len(data)
        while self._tail_bytes > LOG_TAIL_BYTES:
            dropped = self._tail.popleft()
            self._tail_bytes -= len(dropped)
            self._omitted_bytes += len(dropped)
            self._omitted_lines += 1

    def _put(self, data: bytes) -> None:
        if self._file is None:
            return
        try:
            self._file.write(data)
            self._file.flush()
            self._written += len(data)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def flush_tail(self) -> None:
        """Write what the tail holds (at the end of each command's output)."""
        if self._omitted_lines:
            self._put(
                f"[… {self._omitted_lines} lines ({self._omitted_bytes} bytes) omitted: "
                f"the log keeps the first {LOG_HEAD_BYTES // 2**20} MiB and the last "
                f"{LOG_TAIL_BYTES // 2**20} MiB …]\n".encode()
            )
        while self._tail:
            self._put(self._tail.popleft())
        self._tail_bytes = self._omitted_bytes = self._omitted_lines = 0

    def close(self) -> None:
        self.flush_tail()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def where(self) -> str:
        if self.path is None:
            return "no log file"
        if self.error is not None:
            return f"log {self.path} (incomplete: {self.error})"
        return f"full log: {self.path}"


@dataclass(slots=True)
class Runner:
    """Runs the commands of one apply, all writing to one log and one caller."""

    journal: Journal
    apply_id: str
    log: OutputLog
    on_output: Callable[[str], None] | None = None
    # The apply lock goes with each command: an orphaned one keeps other applies out.
    pass_fds: tuple[int, ...] = ()

    def run(
        self,
        argv: list[str],
        timeout: float,
        *,
        cancel: threading.Event | None = None,
        on_spawn: Callable[[int], None] | None = None,
        cwd: Path | None = None,
        killable: bool = True,
    ) -> Run:
        """Run ``argv`` in its own process group, streaming its output; kill its group after.

        Not ``killable`` (an activation): neither ``timeout`` nor ``cancel`` stops it; past
        ``timeout`` it is only said to be slow, and what is left of its group after it exits is
        killed.
        """
        run = Run()
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # The lock goes with the rebuild: an orphaned rebuild keeps other applies out.
                pass_fds=self.pass_fds,
            )
        except OSError as exc:
            run.error = f"{argv[0]}: {exc.strerror or exc}"
            self.log.write(f"# {run.error}")
            return run
        if on_spawn is not None:
            on_spawn(proc.pid)
        emitter = _Emitter(self.journal, self.apply_id, self.on_output, self.log, run)
        try:
            self._follow(
                proc, run, emitter, timeout, cancel if killable else None, killable=killable
            )
        except BaseException:
            # A bug or an interrupt here must not leave the rebuild running unwatched (an
            # activation is left to finish: killing it half-way is worse).
            if killable:
                kill_group(proc.pid, wait=TERM_GRACE, term_first=True, leader=proc)
            raise
        run.returncode = proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        emitter.done()
        return run

    def _follow(
        self,
        proc: subprocess.Popen[bytes],
        run: Run,
        emitter: _Emitter,
        timeout: float,
        cancel: threading.Event | None,
        *,
        killable: bool = True,
    ) -> None:
        """Stream ``proc``'s output until it ends, times out or is cancelled; then end its group."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        deadline = time.monotonic() + timeout
        exited_at: float | None = None
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                if cancel is not None and cancel.is_set():
                    run.cancelled = True
                    break
                if now >= deadline:
                    if killable:
                        run.timed_out = True
                        break
                    run.overran, deadline = True, float("inf")
                    emitter.slow(timeout)
                if exited_at is not None and now - exited_at > EXIT_DRAIN:
                    break  # leftovers of the group hold the pipe; they are killed below
                if sel.select(min(0.2, max(0.0, deadline - now))):
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        chunk = None
                    if chunk == b"":
                        break
                    if chunk:
                        buf = emitter.feed(buf + chunk)
                if exited_at is None and proc.poll() is not None:
                    exited_at = time.monotonic()
        if buf:
            emitter.line(buf)
        if run.timed_out or run.cancelled:
            kill_group(proc.pid, wait=TERM_GRACE, term_first=True, leader=proc)
        elif not killable:
            proc.wait()
        else:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                run.timed_out = True
                kill_group(proc.pid, wait=TERM_GRACE, term_first=True, leader=proc)
        kill_group(proc.pid, wait=0)  # whatever of its group is still left


class _Emitter:
    """Sends each output line to the caller, the log and the journal."""

    def __init__(
        self,
        journal: Journal,
        apply_id: str,
        on_output: Callable[[str], None] | None,
        log: OutputLog,
        run: Run,
    ) -> None:
        self.log = log
        self.run = run
        self.journal = journal
        self.apply_id = apply_id
        self.on_output = on_output
        # The caller shows the output itself; journald's absence must not print it twice.
        self.to_journal = self.journal.enabled_for(Priority.INFO) and (
            self.on_output is None or self.journal.connected
        )
        self.journal_lines = 0

    def feed(self, data: bytes) -> bytes:
        """Emit the complete lines in ``data``; return the incomplete rest."""
        *lines, rest = data.split(b"\n")
        for raw in lines:
            self.line(raw)
        while len(rest) > MAX_LINE_BYTES:
            self.line(rest[:MAX_LINE_BYTES])
            rest = rest[MAX_LINE_BYTES:]
        return rest

    def line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.run.last_lines.append(text)
        self.log.write(text)
        if self.on_output is not None:
            try:
                self.on_output(text)
            except Exception:  # a closed terminal must not stop the apply
                self.on_output = None
        if self.to_journal:
            self.journal_lines += 1
            if self.journal_lines <= JOURNAL_OUTPUT_LINES:
                self.journal.send(JournalEvent.APPLY_OUTPUT, text or " ", apply_id=self.apply_id)

    def slow(self, bound: float) -> None:
        self.journal.send(
            JournalEvent.APPLY_OUTPUT,
            f"the activation runs for more than {seconds_text(bound)}; it is not stopped "
            "(killing it half-way would leave the system half-switched), still waiting",
            apply_id=self.apply_id,
            priority=Priority.WARNING,
        )

    def done(self) -> None:
        if self.to_journal and self.journal_lines > JOURNAL_OUTPUT_LINES:
            self.journal.send(
                JournalEvent.APPLY_OUTPUT,
                f"[{self.journal_lines - JOURNAL_OUTPUT_LINES} more lines of output are not in "
                f"the journal; {self.log.where()}]",
                apply_id=self.apply_id,
            )
