"""Why a segment stops, and the one base class of whatever decides when.

``StopReason`` is the one enum of stop reasons: what ``StopPolicy.should_stop`` returns, what
``SegmentOutcome.stop_reason`` holds and what the job record (``job.json``) stores as its
string value. ``StopPolicy`` is the plug point between a training loop and whoever decides
when it stops: the jobs layer (``Session``, the HF callback) calls it at every step boundary;
the runner layer subclasses it (``colabjob.runner.budget`` / ``watchdog``) without the jobs
layer importing the runner. The base class never stops and never asks for a checkpoint, so a
subclass overrides only what it decides, and callers use every member without probing.
``AnyOf`` (also ``a | b``) combines policies. No torch here.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["AnyOf", "NeverStop", "StopPolicy", "StopReason"]


class StopReason(str, enum.Enum):
    """Why a segment ended. All but ``CRASH`` are what a ``StopPolicy.should_stop`` returns.

    The value is what ``job.json`` stores; ``StopReason("budget")`` reads it back."""

    BUDGET = "budget"  # the session deadline is near: next step + save + margin would cross it
    SIGNAL = "signal"  # SIGTERM / SIGINT / SIGUSR1 (SLURM, the OS, Ctrl-C)
    PREEMPTION = "preemption"  # a spot-VM preemption notice: save the smallest exact checkpoint
    STOP_REQUEST = "stop_request"  # `colabjob stop JOB` (control/stop.json), or the lease was lost
    COMPLETED = "completed"  # the job ran to the end
    CRASH = "crash"  # exception, CUDA OOM, killed child, or the VM vanished

    def __str__(self) -> str:
        return self.value


class StopPolicy:
    """Decides, at step boundaries, whether to stop and whether a checkpoint is due.

    This base never stops (``NeverStop``); subclasses override what they decide."""

    @property
    def emergency(self) -> bool:
        """True after a preemption notice: write the smallest checkpoint that still resumes
        exactly, now."""
        return False

    def observe_step(self, seconds: float) -> None:
        """One step, boundary to boundary, took ``seconds``."""

    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        """A committed checkpoint of ``nbytes`` took this long to write and to upload/flush."""

    def expect_checkpoint(self, nbytes: int) -> None:
        """The coming checkpoints will hold about ``nbytes``: told by the training loop before
        one is measured, so a budget can guess the final save from the size."""

    def should_stop(self) -> StopReason | None:
        """None to keep going; else why to stop. Stays set once returned."""
        return None

    def checkpoint_due(self) -> bool:
        """True when a time-interval checkpoint should be written at this step boundary."""
        return False

    def status(self) -> dict[str, Any]:
        """Figures for status lines and the heartbeat (JSON-serialisable; may be empty)."""
        return {}

    def __or__(self, other: StopPolicy) -> AnyOf:
        return AnyOf(self, other)


class NeverStop(StopPolicy):
    """The default when nothing limits the session: never stops, never asks for a checkpoint."""


class AnyOf(StopPolicy):
    """Stops when any member stops (first reason wins); a checkpoint is due when any says so."""

    def __init__(self, *policies: StopPolicy) -> None:
        flat: list[StopPolicy] = []
        for p in policies:
            if not isinstance(p, StopPolicy):
                raise TypeError(f"{p!r} is not a StopPolicy (subclass colabjob.jobs.policy)")
            flat.extend(p.policies if isinstance(p, AnyOf) else [p])
        self.policies: tuple[StopPolicy, ...] = tuple(flat)

    @property
    def emergency(self) -> bool:
        return any(p.emergency for p in self.policies)

    def observe_step(self, seconds: float) -> None:
        for p in self.policies:
            p.observe_step(seconds)

    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        for p in self.policies:
            p.observe_checkpoint(
                write_seconds=write_seconds, upload_seconds=upload_seconds, nbytes=nbytes
            )

    def expect_checkpoint(self, nbytes: int) -> None:
        for p in self.policies:
            p.expect_checkpoint(nbytes)

    def should_stop(self) -> StopReason | None:
        for p in self.policies:
            reason = p.should_stop()
            if reason is not None:
                return reason
        return None

    def checkpoint_due(self) -> bool:
        # every member is asked (no short-circuit) so none misses a boundary
        return any([p.checkpoint_due() for p in self.policies])

    def status(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for p in self.policies:
            merged.update(p.status())
        return merged
