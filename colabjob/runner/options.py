"""``SegmentOptions``: how one segment runs, as the caller (CLI, ``colabjob.session()``, the
HF integration, the demo) asks for it; ``with_spec_defaults`` fills what a caller left
``None`` from a job spec's ``checkpoint``, ``budget``, ``training`` and ``logging``
sections. Read by ``colabjob.runner.segment``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.runner.lease import DEFAULT_TTL
from colabjob.runner.watchdog import STOP_POLL_SECONDS

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.policy import StopPolicy
    from colabjob.jobs.progress import ProgressSink
    from colabjob.storage.selection import ResumeChoice

__all__ = ["SegmentOptions", "with_spec_defaults"]


@dataclass(frozen=True, kw_only=True)
class SegmentOptions:
    """How to run a segment. For ``run_segment`` a ``None`` field takes the job spec's value
    (``checkpoint``, ``budget``, ``training`` and ``logging`` sections); ``session()`` passes
    its own.

    ``step_guess``/``save_guess`` (seconds or ``"2m"``): what the stop rule assumes before a
    step / a checkpoint is measured (``colabjob.runner.budget``). ``stop_policy``: one more
    ``StopPolicy`` whose stop counts like the budget's (e.g. a step count ending a simulated
    session). ``progress``: where the metrics of every log interval go, with the session's
    deadline and next checkpoint (the CLI's display); the events (checkpoint committed,
    stop, ...) go to ``log``, or to ``progress.event`` when there is no ``log``. Without
    ``progress`` the metrics go to ``log`` as lines unless ``log_metrics`` is False (the
    training code prints its own, like HF's printer). ``resume`` chooses the checkpoint to
    resume from (``colabjob.storage.selection``). ``tensorboard``
    (``"auto"``: when installed) and ``wandb``: the experiment trackers
    (``colabjob.runner.trackers``). ``async_checkpoint``: periodic checkpoints copy the
    state and save in the background (True), save synchronously (False), or background
    only when the copy fits in host memory ("auto", the default; ``colabjob.jobs.memory``).
    """

    budget: str | float | None = None
    platform: str | None = None
    session_started_at: str | float | None = None
    margin: str | float | None = None
    step_guess: str | float | None = None
    save_guess: str | float | None = None
    every_steps: int | None = None
    every_minutes: float | None = None
    keep: int | None = None
    max_steps: int | None = None
    staging_dir: str | os.PathLike[str] | None = None
    log_every_steps: int | None = None
    allow_geometry_change: bool = False
    force: bool = False
    lease_ttl: float = DEFAULT_TTL
    stop_poll_seconds: float = STOP_POLL_SECONDS
    tensorboard: bool | Literal["auto"] | None = None
    wandb: bool | None = None
    wandb_project: str | None = None
    clock: Clock = field(default=SYSTEM_CLOCK, compare=False)
    log: Callable[[str], None] | None = field(default=None, compare=False)
    progress: ProgressSink | None = field(default=None, compare=False)
    log_metrics: bool = True
    stop_policy: StopPolicy | None = field(default=None, compare=False)
    async_checkpoint: bool | Literal["auto"] | None = None  # None: the spec's, else "auto"
    session_id: str | None = None
    resume: ResumeChoice | None = None  # --from-step / --checkpoint / --from-scratch


def with_spec_defaults(opts: SegmentOptions, spec: JobSpec) -> SegmentOptions:
    """``opts`` with every ``None`` field that the spec sets taken from the spec."""
    ck, bd, tr, lg = spec.checkpoint, spec.budget, spec.training, spec.logging

    def pick(given: Any, default: Any) -> Any:
        return default if given is None else given

    return dataclasses.replace(
        opts,
        budget=pick(opts.budget, bd.limit),
        platform=pick(opts.platform, None if bd.platform == "auto" else bd.platform),
        session_started_at=pick(opts.session_started_at, bd.session_started_at),
        margin=pick(opts.margin, bd.margin),
        every_steps=pick(opts.every_steps, ck.every_steps),
        every_minutes=pick(opts.every_minutes, ck.every_minutes),
        keep=pick(opts.keep, ck.keep),
        max_steps=pick(opts.max_steps, tr.max_steps),
        staging_dir=pick(opts.staging_dir, ck.staging_dir),
        log_every_steps=pick(opts.log_every_steps, tr.log_every_steps),
        tensorboard=pick(opts.tensorboard, lg.tensorboard),
        wandb=pick(opts.wandb, lg.wandb),
        wandb_project=pick(opts.wandb_project, lg.wandb_project),
        async_checkpoint=pick(opts.async_checkpoint, ck.async_),
    )
