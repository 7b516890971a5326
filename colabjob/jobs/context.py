"""What a training segment receives from the runner, and what it hands back.

``SegmentContext`` is everything a segment needs that is not the model: the job's store, its
``CheckpointStore`` (fenced by the lease epoch), the ``StopPolicy`` that decides when to stop
(the runner's watchdog: budget, signals, preemption, stop requests), the lease epoch written
into manifests, the checkpoint schedule and where to send status and log lines. The runner
(``colabjob.runner.segment``) builds it; the ``Session`` API and the built-in job kinds consume
it. ``SegmentOutcome`` is the result: why the segment stopped, which optimizer steps it ran
and the newest checkpoint it committed. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.errors import ConfigError
from colabjob.jobs.policy import NeverStop, StopPolicy, StopReason

if TYPE_CHECKING:
    from colabjob.jobs.progress import ProgressSink
    from colabjob.storage.checkpoints import CheckpointStore
    from colabjob.storage.selection import ResumeChoice
    from colabjob.storage.store import Store

__all__ = ["SegmentContext", "SegmentOutcome"]


@dataclass(frozen=True, kw_only=True)
class SegmentContext:
    """Everything a training segment needs from the runner.

    ``every_steps`` checkpoints every N optimizer steps; a time interval comes from
    ``policy.checkpoint_due()``. ``max_steps`` ends the job (outcome ``completed``).
    ``log_every_steps`` sets how often the metrics history gets an entry (the mean over
    that many steps) and a log line. ``clock`` (``colabjob.clock``) measures step and snapshot
    times for the policy (the runner passes its clock, so a fake clock drives the budget in
    tests).
    ``progress``, when given, receives the metrics of every log interval (with the session's
    deadline and next checkpoint) instead of ``log`` getting them as lines; ``log`` still
    gets the events. ``resume`` picks the checkpoint to resume from (default: the newest
    valid one; see ``colabjob.storage.selection``); ``committed_step`` is the newest step
    the job's record says was committed: with no valid checkpoint left and this > 0, the
    segment refuses to start over (``NoCheckpointError``) unless ``resume.scratch``.
    """

    store: Store
    checkpoints: CheckpointStore
    policy: StopPolicy = NeverStop()  # noqa: RUF009 - stateless, safe to share
    epoch: int = 0
    config_hash: str = ""
    staging_dir: Path | None = None
    allow_geometry_change: bool = False
    every_steps: int | None = None
    max_steps: int | None = None
    log_every_steps: int = 10
    on_status: Callable[[dict[str, Any]], None] | None = None
    log: Callable[[str], None] | None = None
    clock: Clock = SYSTEM_CLOCK
    progress: ProgressSink | None = None
    resume: ResumeChoice | None = None
    committed_step: int = 0
    async_checkpoint: str = "auto"  # "auto" | "true" | "false": see colabjob.jobs.state.host_memory
    fsdp: bool = False  # the job asks for a sharded model (training.fsdp): track() checks it

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ConfigError(f"every_steps must be >= 1 or None, got {self.every_steps}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 or None, got {self.max_steps}")
        if self.log_every_steps < 1:
            raise ConfigError(f"log_every_steps must be >= 1, got {self.log_every_steps}")
        if self.epoch < 0:
            raise ConfigError(f"lease epoch must be >= 0, got {self.epoch}")
        if not isinstance(self.policy, StopPolicy):
            raise ConfigError(
                f"policy {self.policy!r} is not a StopPolicy",
                hint="subclass colabjob.jobs.policy.StopPolicy and override what it decides",
            )

    @property
    def monotonic(self) -> Callable[[], float]:
        """The clock's monotonic time, which step and snapshot durations are measured on."""
        return self.clock.monotonic


@dataclass(frozen=True, kw_only=True)
class SegmentOutcome:
    """How a segment ended.

    ``stop_reason`` is a ``StopReason`` (its string value is accepted); ``completed`` means
    the job itself is done (``max_steps`` reached or the data ran out), not merely this
    segment. ``first_step`` is
    the optimizer step the segment resumed at, ``last_step`` the one it stopped at;
    ``checkpoint_step`` the newest step committed to storage by the end (None if none).
    """

    stop_reason: StopReason
    first_step: int
    last_step: int
    completed: bool
    checkpoint_step: int | None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.stop_reason not in StopReason._value2member_map_:
            known = ", ".join(r.value for r in StopReason)
            raise ValueError(f"unknown stop reason {self.stop_reason!r}; one of {known}")
        object.__setattr__(self, "stop_reason", StopReason(self.stop_reason))
        if self.completed and self.stop_reason is not StopReason.COMPLETED:
            raise ValueError(
                f"a completed segment has stop_reason 'completed', not {self.stop_reason!r}"
            )
        if not 0 <= self.first_step <= self.last_step:
            raise ValueError(f"steps out of order: first {self.first_step}, last {self.last_step}")
