"""One training segment end to end: the ways in, and the outcome on the way out.

``open_segment(url, options)`` is the one way in, a context manager yielding an
``OpenSegment`` (its ``context`` for the training code, its ``outcome`` to be set before
the block ends); ``colabjob.session(url, ...)`` (a plain PyTorch loop),
``run_segment(url, spec, ...)`` (the built-in job kinds, used by the supervisor) and
``colabjob.hf.resumable`` (an HF Trainer) are built on it. It opens the store and hands the
rest to ``colabjob.runner.segment_run.SegmentRun``: the record, the lease, the watchdog, the
trackers and the ``SegmentContext`` on the way in, and on the way out the segment closed with
its stop reason and the job state, the lease released and the store flushed (that module's
docstring says in which order and what each outcome records).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from colabjob.clock import Clock
from colabjob.errors import JobStateError
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.session import Session
from colabjob.runner.options import DEFAULTS, SegmentOptions, with_spec_defaults
from colabjob.runner.script_errors import reported_for_script
from colabjob.runner.segment_run import SegmentRun
from colabjob.storage.store import Store, open_store

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.progress import ProgressSink

__all__ = ["OpenSegment", "SegmentOptions", "open_segment", "run_segment", "session"]


def _open(url: str | os.PathLike[str] | Store) -> Store:
    return url if isinstance(url, Store) else open_store(url)


class OpenSegment:
    """A segment opened by ``open_segment``: the ``context`` to train in, and the
    ``outcome`` the training code sets (``SegmentOutcome``) before the block ends."""

    def __init__(self, context: SegmentContext) -> None:
        self.context = context
        self.outcome: SegmentOutcome | None = None


@contextlib.contextmanager
def open_segment(
    url: str | os.PathLike[str] | Store,
    options: SegmentOptions | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    config_hash: str | None = None,
) -> Iterator[OpenSegment]:
    """Open one segment of the job at ``url`` (see the module docstring); yields an
    ``OpenSegment``. Set its ``outcome`` before the block ends: the segment is closed with
    it. An exception closes it with the outcome set so far (or as a crash) and propagates;
    a block that ends without an outcome is recorded as a crash and raises ``JobStateError``.

    ``config`` is recorded in a new job's ``job.json``; ``config_hash`` (default: the
    record's) goes into every checkpoint manifest.
    """
    run = SegmentRun(
        _open(url), options or SegmentOptions(), config=config or {}, config_hash=config_hash
    )
    seg = OpenSegment(run.open())
    try:
        yield seg
    except BaseException as e:
        run.finish(seg.outcome, e)
        raise
    if seg.outcome is None:
        error = JobStateError(
            "the segment ended without an outcome",
            hint="set OpenSegment.outcome before leaving open_segment()",
        )
        run.finish(None, error)
        raise error
    run.finish(seg.outcome)


@contextlib.contextmanager
def session(
    url: str | os.PathLike[str] | Store,
    *,
    budget: str | float | None = DEFAULTS.budget,
    platform: str | None = DEFAULTS.platform,
    session_started_at: str | float | None = DEFAULTS.session_started_at,
    margin: str | float | None = DEFAULTS.margin,
    step_guess: str | float | None = DEFAULTS.step_guess,
    save_guess: str | float | None = DEFAULTS.save_guess,
    every_steps: int | None = DEFAULTS.every_steps,
    every_minutes: float | None = DEFAULTS.every_minutes,
    keep: int = DEFAULTS.keep,
    max_steps: int | None = DEFAULTS.max_steps,
    allow_geometry_change: bool = DEFAULTS.allow_geometry_change,
    staging_dir: str | os.PathLike[str] | None = DEFAULTS.staging_dir,
    force: bool = DEFAULTS.force,
    config: Mapping[str, Any] | None = None,
    log_every_steps: int = DEFAULTS.log_every_steps,
    log: Callable[[str], None] | None = DEFAULTS.log,
    progress: ProgressSink | None = DEFAULTS.progress,
    tensorboard: bool | Literal["auto"] = DEFAULTS.tensorboard,
    wandb: bool = DEFAULTS.wandb,
    wandb_project: str | None = DEFAULTS.wandb_project,
    clock: Clock = DEFAULTS.clock,
    lease_ttl: float = DEFAULTS.lease_ttl,
    stop_poll_seconds: float = DEFAULTS.stop_poll_seconds,
    async_checkpoint: bool | Literal["auto"] = DEFAULTS.async_checkpoint,
    notify: Collection[str] = DEFAULTS.notify,
) -> Iterator[Session]:
    """Run one segment of the job at ``url`` around a plain PyTorch loop; yields a Session.

    ``budget`` (``"11h30m"``, ``"colab-pro"``), ``platform`` and ``session_started_at``
    override detection; the loop is told to stop ``margin`` (default 5 min) before the
    predicted end, with the final checkpoint committed. ``step_guess``/``save_guess``
    (seconds or ``"2m"``) replace the stop rule's guesses until a step / a checkpoint is
    measured (by default: none for the first step, the checkpoint's size at guessed
    throughputs for the save). Checkpoints every ``every_steps`` optimizer steps and/or
    every ``every_minutes`` (default 30; None turns it off), which bounds the work a VM
    vanishing without warning can cost; ``keep`` newest are kept. ``async_checkpoint``:
    periodic checkpoints copy the state to host memory and save in the background (True),
    or save synchronously, tensor by tensor (False); ``"auto"`` (default) goes synchronous
    when a copy would not fit in the free host memory (see README, Memory).
    ``max_steps`` ends the job. ``force`` takes over a lease whose holder stopped
    heartbeating (after confirming it expired). ``config`` is recorded in a new job's
    ``job.json``.
    ``log=None`` silences the progress lines; ``progress`` (a
    ``colabjob.jobs.progress.ProgressSink``) receives the metrics instead of ``log``.
    ``tensorboard`` writes event files into the job's ``tensorboard/`` (``"auto"``: when
    the package is installed); ``wandb=True`` logs to one W&B run per job, resumed every
    session. ``notify``: apprise URLs (with those of ``COLABJOB_NOTIFY``; needs
    ``colabjob[notify]``) told when the segment pauses, the job completes or fails, the
    lease is lost, ... (README, Unattended runs); they are never written to the job.
    The job's record ends SUSPENDED, COMPLETED or FAILED (see module). A usage
    error (a second live session's ``LeaseHeldError``, a changed batch geometry) is printed
    as one line and exits 2 in a script, like the CLI; in a notebook it is raised. Its
    hint names keyword arguments (``force=True``, ``allow_geometry_change=True``).
    """
    opts = SegmentOptions.from_arguments(locals(), besides=("url", "config"))
    with reported_for_script(), open_segment(url, opts, config=config) as seg:
        s = Session(seg.context)
        try:
            yield s
        except BaseException as e:
            seg.outcome = s.close(error=e)
            raise
        seg.outcome = s.close()


def run_segment(
    store_url: str | os.PathLike[str] | Store,
    spec: JobSpec,
    *,
    options: SegmentOptions | None = None,
) -> SegmentOutcome:
    """Run one segment of a built-in job kind (``colabjob.jobs.kinds.run_kind``).

    The context is built exactly as ``session()`` builds it; ``options`` fields left at
    their defaults take the spec's checkpoint, budget, training and logging settings.
    Exceptions propagate after the record is closed as FAILED (the supervisor decides
    whether to retry).
    """
    from colabjob.config import config_hash

    opts = with_spec_defaults(options or SegmentOptions(), spec)
    with open_segment(
        store_url, opts, config=spec.to_dict(), config_hash=config_hash(spec)
    ) as seg:
        from colabjob.jobs import kinds

        seg.outcome = kinds.run_kind(spec, seg.context)
    return seg.outcome
