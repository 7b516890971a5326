"""The one step-boundary decision: stop, checkpoint, or go on (no torch here).

Both training paths (``Session._boundary`` and the HF ``ColabJobCallback.on_step_end``) ask
it at every optimizer-step boundary, so they cannot disagree. Each rank brings a ``Vote``
(the stop policy's reason, whether a checkpoint is wished for, whether a commit is in flight,
whether a preemption notice came); with several processes the votes are folded into one by
an all-reduce(MAX) of ``Vote.codes()`` (``combine`` is the same fold, for one process and
the tests), and ``decide`` turns the agreed vote into a ``Decision``. The rules:

- at ``max_steps`` (or at the end of the last epoch) the job is ``COMPLETED``, whatever else
  asked for a stop at the same step: the work is done, the final checkpoint is the
  completion, and no later segment is needed;
- otherwise any rank's stop reason stops every rank; the highest in ``STOP_CODES`` wins;
- a stop always takes a (final, synchronous) checkpoint;
- a periodic checkpoint (``every_steps``, the policy's ``checkpoint_due`` as for
  ``every_minutes``, or a retry after a failed commit) waits while a commit is in flight
  (``deferred``: wished for again at the next boundary).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from colabjob.jobs.policy import StopPolicy, StopReason

__all__ = [
    "STOP_CODES",
    "Agreement",
    "Decision",
    "Vote",
    "combine",
    "decide",
    "decide_agreed",
    "save_wanted",
]

#: Stop reasons as agreed over ranks: the highest code wins (``completed`` over any other,
#: a preemption over a signal, ...); 0 is "keep going".
STOP_CODES: dict[StopReason, int] = {
    StopReason.BUDGET: 1,
    StopReason.STOP_REQUEST: 2,
    StopReason.SIGNAL: 3,
    StopReason.PREEMPTION: 4,
    StopReason.COMPLETED: 5,
}
_REASONS = {code: reason for reason, code in STOP_CODES.items()}


@dataclass(frozen=True, kw_only=True)
class Vote:
    """What one rank brings to a step boundary."""

    reason: StopReason | None = None  # the stop policy's answer
    save: bool = False  # a periodic checkpoint is wished for (see ``save_wanted``)
    busy: bool = False  # a background commit is still in flight
    emergency: bool = False  # a preemption notice: the smallest exact checkpoint

    def codes(self) -> list[int]:
        """Four ints whose element-wise maximum over ranks is the agreed vote."""
        reason = STOP_CODES[self.reason] if self.reason is not None else 0
        return [reason, int(self.save), int(self.busy), int(self.emergency)]

    @classmethod
    def ask(
        cls, policy: StopPolicy, *, step: int, every_steps: int | None, retry: bool, busy: bool
    ) -> Vote:
        """This rank's vote at ``step``: the policy's stop reason and emergency, a checkpoint
        wished for (``save_wanted``; ``retry``: one failed or had to wait), ``busy``: a
        background commit is in flight."""
        save = save_wanted(
            step=step, every_steps=every_steps, checkpoint_due=policy.checkpoint_due(), retry=retry
        )
        reason, emergency = policy.should_stop(), bool(policy.emergency)
        if reason is None:  # nearly every step: a shared instance (it is frozen), no new object
            return _KEEP_GOING_VOTES[bool(save), bool(busy), emergency]
        return cls(reason=reason, save=save, busy=busy, emergency=emergency)

    @classmethod
    def from_codes(cls, codes: Sequence[int]) -> Vote:
        reason, save, busy, emergency = (int(c) for c in codes)
        return cls(
            reason=_REASONS.get(reason), save=bool(save), busy=bool(busy), emergency=bool(emergency)
        )


def combine(votes: Iterable[Vote]) -> Vote:
    """Several ranks' votes as one: what ``Coordinator.agree``'s all-reduce(MAX) computes."""
    codes = [v.codes() for v in votes]
    if not codes:
        return Vote()
    return Vote.from_codes([max(column) for column in zip(*codes, strict=True)])


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What every rank does at this step boundary."""

    stop: bool  # stop after a final checkpoint
    save: bool  # take a checkpoint now (the final one when ``stop``)
    reason: StopReason | None  # why it stops (None: it goes on)
    deferred: bool = False  # a periodic checkpoint waits for the commit in flight
    emergency: bool = False  # the final checkpoint leaves out the optional objects
    busy: bool = False  # a background commit is in flight (on rank 0, as agreed)

    def __post_init__(self) -> None:
        if self.stop != (self.reason is not None):
            raise ValueError(f"a stop needs a reason and a reason a stop: {self}")


def save_wanted(
    *, step: int, every_steps: int | None, checkpoint_due: bool, retry: bool = False
) -> bool:
    """Whether this rank wishes for a periodic checkpoint at ``step``: every ``every_steps``
    steps, when the policy says one is due (``every_minutes``, before the deadline), or to
    retry one that failed or had to wait."""
    return retry or checkpoint_due or (every_steps is not None and step % every_steps == 0)


def decide(vote: Vote, *, step: int, max_steps: int | None, complete: bool = False) -> Decision:
    """The decision at optimizer step ``step`` from the (agreed) ``vote``; ``complete``: the
    loop's data ran out (the last epoch ended). See the module docstring for the rules."""
    reason = vote.reason
    if complete or (max_steps is not None and step >= max_steps):
        reason = StopReason.COMPLETED  # the work is done, whatever else asked for a stop
    if reason is not None:
        emergency = vote.emergency or vote.reason is StopReason.PREEMPTION
        return Decision(stop=True, save=True, reason=reason, emergency=emergency, busy=vote.busy)
    return _GOING_ON[bool(vote.save), bool(vote.busy), bool(vote.emergency)]


_FLAGS = [(save, busy, emergency) for save in (False, True) for busy in (False, True)
          for emergency in (False, True)]  # fmt: skip
# The boundary runs every optimizer step; these frozen answers for "keep going" are shared so
# that a step builds no new objects (the loop's overhead is measured by benchmarks/overhead.py).
_KEEP_GOING_VOTES = {f: Vote(save=f[0], busy=f[1], emergency=f[2]) for f in _FLAGS}
_GOING_ON = {
    (save, busy, emergency): Decision(
        stop=False,
        save=save and not busy,
        reason=None,
        deferred=save and busy,
        emergency=emergency,
        busy=busy,
    )
    for save, busy, emergency in _FLAGS
}


class Agreement(Protocol):
    """The all-reduce of a vote over every rank (``colabjob.jobs.distributed.Coordinator``)."""

    def agree(self, vote: Vote) -> Vote: ...


def decide_agreed(
    sync: Agreement | None,
    vote: Vote,
    *,
    step: int,
    max_steps: int | None,
    complete: bool = False,
) -> Decision:
    """``decide`` on the vote every rank agreed on (this one's alone without ``sync``); with
    several processes every rank must call it at the same step."""
    if sync is not None:
        vote = sync.agree(vote)
    return decide(vote, step=step, max_steps=max_steps, complete=complete)
