"""One training segment end to end: record, lease, watchdog, checkpoints, and the way out.

``open_segment(url, options)`` is the one way in, a context manager yielding an
``OpenSegment`` (its ``context`` for the training code, its ``outcome`` to be set before
the block ends); ``colabjob.session(url, ...)`` (a plain PyTorch loop),
``run_segment(url, spec, ...)`` (the built-in job kinds, used by the supervisor) and
``colabjob.hf.resumable`` (an HF Trainer) are built on it. Opening: open the store, create or
load ``job.json``, refuse a job that was moved elsewhere (``JobMovedError``) or is finished,
acquire the lease (a live holder raises ``LeaseHeldError`` before anything changes), move
the record to RUNNING with a new ``Segment``, start the lease heartbeat and the watchdog
(budget, signals, preemption notice, stop requests, an optional extra policy), start the
experiment trackers (``runner.trackers``) and build the ``SegmentContext`` with a
``CheckpointStore`` fenced by the lease epoch and timed on the runner's clock. On the way out
the segment is closed with its stop reason and the job state: COMPLETED when the job
finished, SUSPENDED after a budget/signal/preemption/stop-request stop (CANCELLED after
``colabjob stop --cancel``), FAILED with the error on an exception. A runner that lost its
lease leaves the record to the new holder. The lease is released and ``store.flush()`` (the
Drive push) runs last. Under ``--nproc N`` or torchrun the segment first joins the process
group; only rank 0 does all of the above, the other ranks get a context without record,
lease or trackers (``colabjob.jobs.distributed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from colabjob.errors import (
    AlreadyExistsError,
    JobStateError,
    LeaseLostError,
    StaleEpochError,
)
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.distributed import in_process_group, init_distributed, shutdown_distributed
from colabjob.jobs.progress import FanOut, LogLines, close_progress
from colabjob.jobs.session import Session
from colabjob.runner.budget import DEFAULT_MARGIN
from colabjob.runner.clock import SYSTEM_CLOCK, Clock
from colabjob.runner.lease import DEFAULT_TTL, Heartbeat, Holder, Lease
from colabjob.runner.options import SegmentOptions, with_spec_defaults
from colabjob.runner.platforms import describe_platform
from colabjob.runner.record import JobRecord, Segment, create_record, read_record, update_record
from colabjob.runner.states import JobEvent, JobState, StopReason
from colabjob.runner.trackers import WANDB_ID_KEY, new_wandb_id, require_trackers, trackers_for
from colabjob.runner.transfer import check_not_moved
from colabjob.runner.watchdog import Watchdog, watchdog_for
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import Store, open_store

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.progress import ProgressSink

__all__ = ["OpenSegment", "SegmentOptions", "open_segment", "run_segment", "session"]

log = logging.getLogger(__name__)


def _print(message: str) -> None:
    print(f"colabjob: {message}", flush=True)


class _SegmentRun:
    """The runner-side resources of one segment, opened and closed in a fixed order."""

    def __init__(
        self,
        store: Store,
        opts: SegmentOptions,
        *,
        config: Mapping[str, Any],
        config_hash: str | None = None,
    ) -> None:
        self.store, self.opts, self.clock = store, opts, opts.clock
        self.config, self.config_hash = dict(config), config_hash
        self.lease: Lease | None = None
        self.heartbeat: Heartbeat | None = None
        self.watchdog: Watchdog | None = None
        self.trackers: list[ProgressSink] = []
        self.status: dict[str, Any] = {}
        self.own_group = False  # open() joined the process group (--nproc): finish() leaves
        # events go to the log, else to the display
        self.say = opts.log or (opts.progress.event if opts.progress is not None else None)

    # -- opening --------------------------------------------------------------------------
    def open(self) -> SegmentContext:
        self.own_group = not in_process_group()
        if not init_distributed().is_main:  # the group of --nproc / torchrun, if any
            return self._open_follower()
        require_trackers(tensorboard=self._tensorboard, wandb=bool(self.opts.wandb))
        record = self._load_or_create_record()
        check_not_moved(self.store, record)
        if record.state in (JobState.COMPLETED, JobState.CANCELLED):
            raise JobStateError(
                f"job {record.job_id} at {self.store.url} is {record.state.value} "
                f"(last step {record.last_step})",
                hint="start a new job under another URL to train again",
            )
        opts = self.opts
        platform = describe_platform(
            platform=opts.platform,
            budget=opts.budget,
            session_started_at=opts.session_started_at,
            clock=self.clock,
        )
        holder = Holder.here(platform=platform.name, session_id=opts.session_id)
        lease = Lease(self.store, holder=holder, ttl=opts.lease_ttl, clock=self.clock)
        lease.acquire(force=opts.force)
        self.lease = lease
        staging = None if opts.staging_dir is None else Path(opts.staging_dir)
        try:
            record = update_record(self.store, self._begin, clock=self.clock)
            every = opts.every_minutes
            self.watchdog = watchdog_for(
                platform,
                store=self.store,
                epoch=lease.epoch,
                clock=self.clock,
                margin=DEFAULT_MARGIN if opts.margin is None else opts.margin,
                checkpoint_every=None if every is None else every * 60.0,
                step_guess=opts.step_guess,
                save_guess=opts.save_guess,
                stop_poll_seconds=opts.stop_poll_seconds,
                extra=opts.stop_policy,
            ).start()
            watchdog = self.watchdog
            self.heartbeat = lease.start_heartbeat(
                status=lambda: {**watchdog.status(), **self.status},
                on_lost=watchdog.lease_lost,
            )
            self.trackers = trackers_for(
                self.store,
                tensorboard=self._tensorboard,
                wandb=bool(opts.wandb),
                wandb_id=record.extras.get(WANDB_ID_KEY),
                wandb_project=opts.wandb_project,
                job_name=record.job_id,
                config=record.config,
                local_dir=staging,
                monotonic=self.clock.monotonic,
                say=self.say,
            )
        except BaseException as e:
            self.finish(None, e)
            raise
        self._log(f"{platform.describe(self.clock.time())}; lease epoch {lease.epoch}")
        return SegmentContext(
            store=self.store,
            checkpoints=CheckpointStore(
                self.store,
                keep=2 if opts.keep is None else opts.keep,
                fence=lease.current_epoch,
                clock=self.clock.time,
                timer=self.clock.monotonic,  # save costs on the clock that times the steps
                staging_dir=staging,
            ),
            policy=watchdog,
            epoch=lease.epoch,
            config_hash=self.config_hash if self.config_hash is not None else record.config_hash,
            staging_dir=staging,
            allow_geometry_change=opts.allow_geometry_change,
            every_steps=opts.every_steps,
            max_steps=opts.max_steps,
            log_every_steps=opts.log_every_steps or 10,
            on_status=self.status.update,
            log=self.say,
            monotonic=self.clock.monotonic,
            progress=self._progress(),
        )

    @property
    def _tensorboard(self) -> bool | Literal["auto"]:
        return "auto" if self.opts.tensorboard is None else self.opts.tensorboard

    def _progress(self) -> ProgressSink | None:
        """The display (or, with trackers and no display, log lines) plus the trackers."""
        sinks: list[ProgressSink] = []
        if self.opts.progress is not None:
            sinks.append(self.opts.progress)
        elif self.trackers and self.opts.log is not None and self.opts.log_metrics:
            sinks.append(LogLines(self.opts.log))  # metric lines as without trackers
        sinks += self.trackers
        if len(sinks) <= 1:
            return sinks[0] if sinks else None
        return FanOut(*sinks)

    def _open_follower(self) -> SegmentContext:
        """Ranks other than 0 hold no record, lease or trackers and never commit (their
        store's fence refuses it); they watch signals only: rank 0's budget, notices and
        stop requests reach them through the Session's agreement at every step."""
        opts = self.opts
        self.watchdog = Watchdog(clock=self.clock).start()
        staging = None if opts.staging_dir is None else Path(opts.staging_dir)
        return SegmentContext(
            store=self.store,
            checkpoints=CheckpointStore(
                self.store, fence=lambda: 2**62, clock=self.clock.time, staging_dir=staging
            ),
            policy=self.watchdog,
            config_hash=self.config_hash or "",
            staging_dir=staging,
            allow_geometry_change=opts.allow_geometry_change,
            every_steps=opts.every_steps,
            max_steps=opts.max_steps,
            log_every_steps=opts.log_every_steps or 10,
            monotonic=self.clock.monotonic,
        )

    def _load_or_create_record(self) -> JobRecord:
        got = read_record(self.store)
        if got is not None:
            return got[0]
        job_id = self.store.url.rstrip("/").rsplit("/", 1)[-1] or "job"
        try:
            return create_record(self.store, job_id=job_id, config=self.config, clock=self.clock)
        except AlreadyExistsError:  # another runner created it meanwhile
            got = read_record(self.store)
            assert got is not None
            return got[0]

    def _begin(self, record: JobRecord) -> JobRecord:
        assert self.lease is not None and self.lease.info is not None
        if record.state is JobState.CREATED:
            record = record.apply(JobEvent.START)
        else:
            if record.state is JobState.RUNNING:  # its runner vanished; we took the lease over
                record = record.apply(JobEvent.EXPIRE)
            record = record.apply(JobEvent.RESUME)
        holder = self.lease.holder
        segment = Segment(
            session_id=holder.session_id,
            platform=holder.platform,
            host=holder.host,
            started_at=self.clock.time(),
            first_step=record.last_step or 0,
            epoch=self.lease.epoch,
        )
        if self.opts.wandb and not record.extras.get(WANDB_ID_KEY):
            record = record.with_extras(**{WANDB_ID_KEY: new_wandb_id()})  # one run per job
        return record.begin_segment(segment).with_epoch(self.lease.epoch)

    # -- closing --------------------------------------------------------------------------
    def finish(self, outcome: SegmentOutcome | None, error: BaseException | None = None) -> None:
        """Close the segment in the record, release the lease, flush the store."""
        lease = self.lease
        try:
            lost = isinstance(error, (StaleEpochError, LeaseLostError)) or (
                self.heartbeat is not None and self.heartbeat.lost is not None
            )
            cancel = self.watchdog is not None and self.watchdog.cancel_requested
            self._shutdown()
            if lease is not None and not lost:
                update_record(
                    self.store,
                    lambda r: self._end(r, outcome, error, cancel=cancel),
                    clock=self.clock,
                )
            elif lost:
                self._log("this runner lost the job's lease; the record is left to the new holder")
        finally:
            try:
                if lease is not None:
                    lease.release()
            finally:
                self.store.flush()
                if self.own_group:
                    shutdown_distributed()

    def _shutdown(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.watchdog is not None:
            self.watchdog.close()
        trackers, self.trackers = self.trackers, []
        for sink in trackers:  # the last TensorBoard copy goes up before the Drive flush
            try:
                close_progress(sink)
            except Exception as e:
                self._log(f"closing {type(sink).__name__} failed: {e}")

    def _end(
        self,
        record: JobRecord,
        outcome: SegmentOutcome | None,
        error: BaseException | None,
        *,
        cancel: bool,
    ) -> JobRecord:
        assert self.lease is not None
        seg = record.current_segment
        if record.epoch > self.lease.epoch or seg is None or seg.epoch != self.lease.epoch:
            return record  # a newer runner owns the job now
        if outcome is None:
            reason = StopReason.SIGNAL if isinstance(error, KeyboardInterrupt) else StopReason.CRASH
            message = f"{type(error).__name__}: {error}" if error is not None else None
            first, last = seg.first_step, None
        else:
            reason, message = StopReason(outcome.stop_reason), outcome.error
            first, last = outcome.first_step, outcome.last_step
        record = record.end_segment(
            ended_at=self.clock.time(), last_step=last, stop_reason=reason, error=message
        )
        closed = dataclasses.replace(record.history[-1], first_step=first)
        record = dataclasses.replace(record, history=(*record.history[:-1], closed))
        if reason is StopReason.COMPLETED:
            event = JobEvent.COMPLETE
        elif reason is StopReason.CRASH:
            event = JobEvent.FAIL
        elif cancel and reason is StopReason.STOP_REQUEST:
            event = JobEvent.CANCEL
        else:
            event = JobEvent.SUSPEND
        return record.apply(event)

    def _log(self, message: str) -> None:
        log.info("%s", message)
        if self.say is not None:
            self.say(message)


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
    run = _SegmentRun(
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
    budget: str | float | None = None,
    platform: str | None = None,
    session_started_at: str | float | None = None,
    margin: str | float | None = None,
    step_guess: str | float | None = None,
    save_guess: str | float | None = None,
    every_steps: int | None = None,
    every_minutes: float | None = 30.0,
    keep: int = 2,
    max_steps: int | None = None,
    allow_geometry_change: bool = False,
    staging_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    config: Mapping[str, Any] | None = None,
    log_every_steps: int = 10,
    log: Callable[[str], None] | None = _print,
    progress: ProgressSink | None = None,
    tensorboard: bool | Literal["auto"] = "auto",
    wandb: bool = False,
    wandb_project: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
    lease_ttl: float = DEFAULT_TTL,
    stop_poll_seconds: float = 30.0,
) -> Iterator[Session]:
    """Run one segment of the job at ``url`` around a plain PyTorch loop; yields a Session.

    ``budget`` (``"11h30m"``, ``"colab-pro"``), ``platform`` and ``session_started_at``
    override detection; the loop is told to stop ``margin`` (default 3 min) before the
    predicted end, with the final checkpoint committed. ``step_guess``/``save_guess``
    (seconds or ``"2m"``) replace the stop rule's guesses until a step / a checkpoint is
    measured (by default: none for the first step, the checkpoint's size at guessed
    throughputs for the save). Checkpoints every ``every_steps`` optimizer steps and/or
    every ``every_minutes`` (default 30; None turns it off), which bounds the work a VM
    vanishing without warning can cost; ``keep`` newest are kept.
    ``max_steps`` ends the job. ``force`` takes over a lease whose holder stopped
    heartbeating (after confirming it expired). ``config`` is recorded in a new job's
    ``job.json``.
    ``log=None`` silences the progress lines; ``progress`` (a
    ``colabjob.jobs.progress.ProgressSink``) receives the metrics instead of ``log``.
    ``tensorboard`` writes event files into the job's ``tensorboard/`` (``"auto"``: when
    the package is installed); ``wandb=True`` logs to one W&B run per job, resumed every
    session. A second live session raises ``LeaseHeldError``; the job's record ends
    SUSPENDED, COMPLETED or FAILED (see module).
    """
    opts = SegmentOptions(
        budget=budget,
        platform=platform,
        session_started_at=session_started_at,
        margin=margin,
        step_guess=step_guess,
        save_guess=save_guess,
        every_steps=every_steps,
        every_minutes=every_minutes,
        keep=keep,
        max_steps=max_steps,
        staging_dir=staging_dir,
        log_every_steps=log_every_steps,
        allow_geometry_change=allow_geometry_change,
        force=force,
        lease_ttl=lease_ttl,
        stop_poll_seconds=stop_poll_seconds,
        tensorboard=tensorboard,
        wandb=wandb,
        wandb_project=wandb_project,
        clock=clock,
        log=log,
        progress=progress,
    )
    with open_segment(url, opts, config=config) as seg:
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

    The context is built exactly as ``session()`` builds it; ``options`` fields left None
    take the spec's checkpoint, budget, training and logging settings. Exceptions propagate
    after the record is closed as FAILED (the supervisor decides whether to retry).
    """
    from colabjob.config import config_hash

    opts = with_spec_defaults(options or SegmentOptions(), spec)
    with open_segment(
        store_url, opts, config=spec.to_dict(), config_hash=config_hash(spec)
    ) as seg:
        from colabjob.jobs import kinds

        seg.outcome = kinds.run_kind(spec, seg.context)
    return seg.outcome
