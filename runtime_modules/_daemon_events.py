"""What the daemon tells its listeners (the control socket, benchmarks, tests).

Listeners subscribed with ``Daemon.subscribe`` get every ``Notice`` in the loop's thread, in the
order things happened: an action of the reconciler with a readable line, an output line of the
running apply, the end of an apply, a batch of normalized events from one source.
``DecisionTimes`` goes to the ``on_decision`` hook of a latency benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._applier import ApplyOutcome
from ._reconciler_events import Action
from ._world import WorldChange

__all__ = ["ActionTaken", "ApplyDone", "ApplyOutput", "DecisionTimes", "Notice", "WorldChanged"]


@dataclass(frozen=True, slots=True)
class ActionTaken:
    """The reconciler decided ``action`` at ``now`` (daemon clock); ``text`` says it plainly."""

    action: Action
    now: float
    text: str


@dataclass(frozen=True, slots=True)
class ApplyOutput:
    apply_id: int
    line: str


@dataclass(frozen=True, slots=True)
class ApplyDone:
    apply_id: int
    ok: bool
    applied: frozenset[str]
    message: str
    outcome: ApplyOutcome | None  # None when the applier raised before running anything


@dataclass(frozen=True, slots=True)
class WorldChanged:
    """A batch of normalized events from one source (for ``runtime-modules events``)."""

    source: str  # "udev" or "netlink"
    changes: tuple[WorldChange, ...]


Notice = ActionTaken | ApplyOutput | ApplyDone | WorldChanged


@dataclass(frozen=True, slots=True)
class DecisionTimes:
    """One batch whose changes moved some rule's truth (CLOCK_MONOTONIC seconds).

    ``received`` is when the loop woke for the source, ``decided`` when the reconciler
    answered; a latency benchmark compares them with its own injection times.
    """

    source: str
    received: float
    decided: float
    changes: int
    actions: tuple[Action, ...]
