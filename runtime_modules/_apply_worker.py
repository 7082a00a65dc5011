"""The daemon's apply worker: one apply at a time in a thread, reported back to the loop.

``nixos-rebuild`` takes minutes, and meanwhile the loop must go on reading events and answering
the control socket; yet only the loop's thread may touch the reconciler. So the worker runs
``Applier.apply`` in a thread of its own and posts each output line and the outcome to a queue,
writing a byte to a pipe whose read end the loop watches (``fileno``); ``on_ready``, called by
the loop, hands them on in order. The outcome of every apply is posted, whatever happens: a bug
in the applier is reported as a failed apply rather than losing the loop's only apply slot.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable

from ._applier import Applier, ApplyOutcome
from ._daemon_events import ApplyDone, ApplyOutput
from ._errors import RuntimeModulesError
from ._reconciler_events import StartApply

__all__ = ["ApplyWorker"]

log = logging.getLogger("runtime_modules.daemon")


class ApplyWorker:
    """Runs the applies the reconciler starts, one at a time.

    Args:
        on_output: called in the loop's thread with each output line.
        on_done: called in the loop's thread when an apply ended (its thread is joined).
        applied_now: what is applied, read when the applier raised instead of answering.
    """

    def __init__(
        self,
        on_output: Callable[[ApplyOutput], None],
        on_done: Callable[[ApplyDone], None],
        applied_now: Callable[[], frozenset[str]],
    ) -> None:
        self._on_output = on_output
        self._on_done = on_done
        self._applied_now = applied_now
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._posted: collections.deque[ApplyOutput | ApplyDone] = collections.deque()
        self._flight: tuple[int, threading.Thread, threading.Event] | None = None

    def fileno(self) -> int:
        return self._r

    @property
    def apply_id(self) -> int | None:
        """The apply running now, or None."""
        return None if self._flight is None else self._flight[0]

    def start(self, applier: Applier, action: StartApply, reason: str) -> None:
        """Run ``action`` in a new thread; the reconciler never starts two at once."""
        if self._flight is not None:  # say so loudly if it ever did
            raise RuntimeError(f"apply #{action.apply_id} started while #{self._flight[0]} runs")
        cancel = threading.Event()
        apply_id = action.apply_id

        def work() -> None:
            outcome: ApplyOutcome | None = None
            try:
                outcome = applier.apply(
                    action.target,
                    reason=reason,
                    force=action.force,
                    wait=True,
                    on_output=lambda line: self._post(ApplyOutput(apply_id, line)),
                    cancel=cancel,
                )
                done = ApplyDone(apply_id, outcome.ok, outcome.after, outcome.message, outcome)
            except RuntimeModulesError as exc:
                done = ApplyDone(apply_id, False, self._applied_now(), str(exc), None)
            except Exception as exc:
                log.exception("apply #%d crashed", apply_id)
                done = ApplyDone(
                    apply_id, False, self._applied_now(), f"internal error: {exc}", None
                )
            self._post(done)

        thread = threading.Thread(target=work, name=f"apply-{apply_id}", daemon=True)
        self._flight = (apply_id, thread, cancel)
        thread.start()

    def cancel(self) -> None:
        """Ask the running apply to stop: a build is killed (nothing was activated); an
        activation already running is let finish, then rolled back if it failed."""
        if self._flight is not None:
            self._flight[2].set()

    def _post(self, item: ApplyOutput | ApplyDone) -> None:
        """From the worker thread: queue ``item`` and wake the loop."""
        self._posted.append(item)
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the loop will drain the queue
        except OSError as exc:  # closed at shutdown
            if exc.errno != errno.EBADF:
                raise

    def on_ready(self, mask: int) -> None:
        """In the loop: hand on what the worker posted."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 4096):
                pass
        while self._posted:
            item = self._posted.popleft()
            if isinstance(item, ApplyOutput):
                self._on_output(item)
                continue
            assert self._flight is not None and self._flight[0] == item.apply_id
            self._flight[1].join()
            self._flight = None
            self._on_done(item)

    def close(self) -> None:
        """Cancel and wait for an apply in flight (it rolls back), then release the pipe."""
        if self._flight is not None:
            self._flight[2].set()
            self._flight[1].join()
            self._flight = None
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._r = self._w = -1
