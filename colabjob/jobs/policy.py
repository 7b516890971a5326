"""The plug point between a training loop and whoever decides when it stops.

The jobs layer (``Session``, the HF callback) calls a ``StopPolicy`` at every step boundary;
the runner layer implements it (``colabjob.runner.budget`` / ``watchdog``) without the jobs
layer importing the runner. ``NeverStop`` is the default when nothing limits the session.
After a preemption notice an implementation may expose ``emergency = True``: read it with
``getattr(policy, "emergency", False)`` and write the smallest checkpoint that still resumes
exactly. An implementation may also take ``expect_checkpoint(nbytes)``: the training loop
tells it (through ``expect_checkpoint`` below) how big its checkpoints will be before one is
measured, so the budget can guess the final save from the size. No torch here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

#: What ``should_stop`` may return (values of ``colabjob.runner.states.StopReason``).
STOP_REASONS = frozenset({"budget", "signal", "preemption", "stop_request", "completed"})


@runtime_checkable
class StopPolicy(Protocol):
    """Decides, at step boundaries, whether to stop and whether a checkpoint is due."""

    def observe_step(self, seconds: float) -> None:
        """One step, boundary to boundary, took ``seconds``."""
        ...

    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        """A committed checkpoint of ``nbytes`` took this long to write and to upload/flush."""
        ...

    def should_stop(self) -> str | None:
        """None to keep going; else one of ``STOP_REASONS``. Stays set once returned."""
        ...

    def checkpoint_due(self) -> bool:
        """True when a time-interval checkpoint should be written now."""
        ...


class NeverStop:
    """A policy that never stops and never asks for a checkpoint."""

    emergency = False

    def observe_step(self, seconds: float) -> None:
        pass

    def observe_checkpoint(
        self, *, write_seconds: float, upload_seconds: float, nbytes: int
    ) -> None:
        pass

    def should_stop(self) -> str | None:
        return None

    def checkpoint_due(self) -> bool:
        return False

    def expect_checkpoint(self, nbytes: int) -> None:
        pass


def expect_checkpoint(policy: StopPolicy, nbytes: int) -> None:
    """Tell ``policy`` the expected checkpoint size, if it takes one (an optional method)."""
    expect = getattr(policy, "expect_checkpoint", None)
    if callable(expect):
        expect(int(nbytes))
