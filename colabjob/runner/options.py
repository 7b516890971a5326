"""``SegmentOptions``: how one segment runs, as the caller (CLI, ``colabjob.session()``, the
HF integration, the demo) asks for it, and the one place each option's default is written:
``colabjob.session()`` and ``colabjob.hf.resumable()`` take their keyword defaults from
``DEFAULTS`` and build the options from their arguments (``from_arguments``), and the
defaults of what a job spec also sets (checkpoint cadence, retention, logging, ...) are the
spec's (``colabjob.config.schema``, ``colabjob.config.run_sections``).
``with_spec_defaults`` gives a job spec's ``checkpoint``, ``budget``, ``training`` and
``logging`` sections every field a caller left at its default. Read by ``colabjob.runner.segment``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from colabjob.clock import SYSTEM_CLOCK, Clock
from colabjob.config.run_sections import CheckpointSpec, LoggingSpec
from colabjob.config.schema import TrainingSpec
from colabjob.runner.lease.claim import DEFAULT_TTL
from colabjob.runner.watchdog import STOP_POLL_SECONDS

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.policy import StopPolicy
    from colabjob.jobs.progress import ProgressSink
    from colabjob.storage.selection import ResumeChoice

__all__ = ["DEFAULTS", "SegmentOptions", "print_event", "with_spec_defaults"]


def print_event(message: str) -> None:
    """The default ``log``: one ``colabjob: ...`` line on stdout."""
    print(f"colabjob: {message}", flush=True)


def _spec(section: type[Any], name: str) -> Any:
    """The job spec's default for ``section.name`` (an option both a spec and a caller set)."""
    return next(f.default for f in dataclasses.fields(section) if f.name == name)


@dataclass(frozen=True, kw_only=True)
class SegmentOptions:
    """How to run a segment. For ``run_segment`` a field left at its default takes the job
    spec's value (``checkpoint``, ``budget``, ``training`` and ``logging`` sections); the
    defaults of those fields are the spec's own. ``budget``/``platform``/
    ``session_started_at`` None: what the platform says; ``margin`` None:
    ``colabjob.config.DEFAULT_MARGIN``; ``every_minutes`` None: no time-based checkpoints.

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
    only when the copy fits in host memory ("auto", the default;
    ``colabjob.jobs.state.host_memory``). ``notify``: apprise URLs told when the segment
    pauses, the job completes or fails, ... (``colabjob.runner.notify_events``), with
    those of ``COLABJOB_NOTIFY``.
    """

    budget: str | float | None = None
    platform: str | None = None
    session_started_at: str | float | None = None
    margin: str | float | None = None
    step_guess: str | float | None = None
    save_guess: str | float | None = None
    every_steps: int | None = None
    every_minutes: float | None = _spec(CheckpointSpec, "every_minutes")
    keep: int = _spec(CheckpointSpec, "keep")
    max_steps: int | None = None
    staging_dir: str | os.PathLike[str] | None = None
    log_every_steps: int = _spec(TrainingSpec, "log_every_steps")
    allow_geometry_change: bool = False
    force: bool = False
    lease_ttl: float = DEFAULT_TTL
    stop_poll_seconds: float = STOP_POLL_SECONDS
    tensorboard: bool | Literal["auto"] = _spec(LoggingSpec, "tensorboard")
    wandb: bool = _spec(LoggingSpec, "wandb")
    wandb_project: str | None = None
    clock: Clock = field(default=SYSTEM_CLOCK, compare=False)
    log: Callable[[str], None] | None = field(default=print_event, compare=False)
    progress: ProgressSink | None = field(default=None, compare=False)
    log_metrics: bool = True
    stop_policy: StopPolicy | None = field(default=None, compare=False)
    async_checkpoint: bool | Literal["auto"] = _spec(CheckpointSpec, "async_")
    session_id: str | None = None
    resume: ResumeChoice | None = None  # --from-step / --checkpoint / --from-scratch
    notify: Collection[str] = ()  # apprise URLs, besides COLABJOB_NOTIFY (runner.notify)
    # under a supervisor, which decides about retries and notifies a final failure itself
    supervised: bool = False


    @classmethod
    def from_arguments(
        cls, arguments: Mapping[str, Any], *, besides: Collection[str] = (), **fixed: Any
    ) -> SegmentOptions:
        """The options a function was called with: its ``arguments`` (``locals()`` on entry)
        less its own non-option parameters ``besides``, plus ``fixed`` ones it does not take."""
        given = {k: v for k, v in arguments.items() if k not in besides}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
        if unknown:  # a parameter added to session()/resumable() but not here
            raise TypeError(f"not SegmentOptions fields: {', '.join(unknown)}")
        return cls(**given, **fixed)


#: Every option at its default: ``session()`` and ``resumable()`` read their keyword
#: defaults from here (``tests/runner/test_options.py`` checks that they do).
DEFAULTS = SegmentOptions()


def with_spec_defaults(opts: SegmentOptions, spec: JobSpec) -> SegmentOptions:
    """``opts`` with every field the caller left at its default taken from the spec (a CLI
    flag, set, overrides the spec; the spec overrides a library default)."""
    ck, bd, tr, lg = spec.checkpoint, spec.budget, spec.training, spec.logging
    from_spec: dict[str, Any] = {
        "budget": bd.limit,
        "platform": None if bd.platform == "auto" else bd.platform,
        "session_started_at": bd.session_started_at,
        "margin": bd.margin,
        "every_steps": ck.every_steps,
        "every_minutes": ck.every_minutes,
        "keep": ck.keep,
        "max_steps": tr.max_steps,
        "staging_dir": ck.staging_dir,
        "log_every_steps": tr.log_every_steps,
        "tensorboard": lg.tensorboard,
        "wandb": lg.wandb,
        "wandb_project": lg.wandb_project,
        "async_checkpoint": ck.async_,
        "notify": tuple(spec.notify),
    }
    unset = {k: v for k, v in from_spec.items() if getattr(opts, k) == getattr(DEFAULTS, k)}
    return dataclasses.replace(opts, **unset)
