"""The job state machine: the states and the events that move a job.

One table (``TRANSITIONS``) says which event moves which state where; ``transition()`` is a
pure lookup in it that raises ``InvalidTransitionError`` for anything else::

    CREATED ─start─▶ RUNNING ─suspend/expire─▶ SUSPENDED ─resume─▶ RUNNING ─complete─▶ COMPLETED
                       │  └─fail─▶ FAILED ─resume (after a fix)─▶ RUNNING
                       └─cancel─▶ CANCELLED   (also from CREATED, SUSPENDED and FAILED)

COMPLETED and CANCELLED are terminal, but for ``extend``: a completed job rerun with a larger
``max_steps`` goes back to SUSPENDED and is resumed from its final checkpoint. ``expire`` is
what a RUNNING job whose lease ran out (the VM vanished) undergoes before it is resumed.
``LeaseStatus`` lives here too so the job record can derive a job's effective state without
importing the lease machinery. Why a segment stopped is ``colabjob.jobs.policy.StopReason``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from colabjob.errors import InvalidTransitionError

__all__ = [
    "TERMINAL_STATES",
    "TRANSITIONS",
    "JobEvent",
    "JobState",
    "LeaseStatus",
    "allowed_events",
    "is_terminal",
    "transition",
]


class JobState(str, enum.Enum):
    """Where a job is in its life. The value is what ``job.json`` stores."""

    CREATED = "created"
    RUNNING = "running"
    SUSPENDED = "suspended"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class JobEvent(str, enum.Enum):
    """What can happen to a job."""

    START = "start"  # first segment begins
    SUSPEND = "suspend"  # a segment ended with a committed checkpoint; more work remains
    EXPIRE = "expire"  # the runner vanished: its lease expired without a clean stop
    RESUME = "resume"  # a new segment begins from the newest checkpoint
    COMPLETE = "complete"  # training finished and the final checkpoint is committed
    FAIL = "fail"  # retries exhausted, or a user error (bad config, import error)
    CANCEL = "cancel"  # `colabjob stop --cancel`
    EXTEND = "extend"  # a completed job's script raised max_steps past its final step

    def __str__(self) -> str:
        return self.value


class LeaseStatus(str, enum.Enum):
    """What a reader knows about a job's lease (see ``colabjob.runner.lease.claim``)."""

    ABSENT = "absent"  # no lease was ever written (or it was deleted)
    LIVE = "live"  # heartbeat recent, or changing while we watched
    STALE = "stale"  # heartbeat older than the TTL by the holder's wall clock; not yet confirmed
    EXPIRED = "expired"  # confirmed: unchanged for more than the TTL on our own monotonic clock
    RELEASED = "released"  # the holder stopped cleanly and gave it up

    def __str__(self) -> str:
        return self.value


S, E = JobState, JobEvent

TRANSITIONS: Mapping[tuple[JobState, JobEvent], JobState] = MappingProxyType(
    {
        (S.CREATED, E.START): S.RUNNING,
        (S.CREATED, E.CANCEL): S.CANCELLED,
        (S.RUNNING, E.SUSPEND): S.SUSPENDED,
        (S.RUNNING, E.EXPIRE): S.SUSPENDED,
        (S.RUNNING, E.COMPLETE): S.COMPLETED,
        (S.RUNNING, E.FAIL): S.FAILED,
        (S.RUNNING, E.CANCEL): S.CANCELLED,
        (S.SUSPENDED, E.RESUME): S.RUNNING,
        (S.SUSPENDED, E.CANCEL): S.CANCELLED,
        (S.FAILED, E.RESUME): S.RUNNING,
        (S.FAILED, E.CANCEL): S.CANCELLED,
        (S.COMPLETED, E.EXTEND): S.SUSPENDED,  # then resumed like a paused job
    }
)

TERMINAL_STATES: frozenset[JobState] = frozenset({S.COMPLETED, S.CANCELLED})

del S, E


def transition(state: JobState, event: JobEvent) -> JobState:
    """The state ``event`` moves ``state`` to; ``InvalidTransitionError`` if it may not."""
    try:
        return TRANSITIONS[(JobState(state), JobEvent(event))]
    except (KeyError, ValueError):
        if state not in JobState._value2member_map_:
            hint = f"known states: {', '.join(s.value for s in JobState)}"
        else:
            allowed = ", ".join(e.value for e in allowed_events(JobState(state)))
            hint = f"allowed from {_label(state)}: {allowed or 'nothing (terminal)'}"
        raise InvalidTransitionError(
            f"cannot {_label(event)} a job that is {_label(state)}", hint=hint
        ) from None


def _label(value: object) -> str:
    return value.value if isinstance(value, enum.Enum) else repr(value)


def allowed_events(state: JobState) -> list[JobEvent]:
    """Events ``state`` accepts, in table order."""
    return [event for (src, event) in TRANSITIONS if src == state]


def is_terminal(state: JobState) -> bool:
    """True for COMPLETED and CANCELLED: nothing but ``extend`` (a larger ``max_steps`` for a
    completed job) moves a job out of them."""
    return state in TERMINAL_STATES
