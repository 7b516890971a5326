"""One training segment end to end: record, lease, watchdog, checkpoints, and the way out.

``colabjob.session(url, ...)`` (for a plain PyTorch loop) and ``run_segment(url, spec, ...)``
(for the built-in job kinds, used by the supervisor) open a segment the same way: open the
store, create or load ``job.json``, refuse a finished job, acquire the lease (a live holder
raises ``LeaseHeldError`` before anything changes), move the record to RUNNING with a new
``Segment``, start the lease heartbeat and the watchdog (budget, signals, preemption notice,
stop requests), and build the ``SegmentContext`` with a ``CheckpointStore`` fenced by the
lease epoch. On the way out they close the segment with its stop reason and the job state:
COMPLETED when the job finished, SUSPENDED after a budget/signal/preemption/stop-request stop
(CANCELLED after ``colabjob stop --cancel``), FAILED with the error on an exception. A runner
that lost its lease leaves the record to the new holder. The lease is released and
``store.flush()`` (the Drive push) runs last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.errors import (
    AlreadyExistsError,
    JobStateError,
    LeaseLostError,
    StaleEpochError,
)
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.session import Session
from colabjob.runner.budget import DEFAULT_MARGIN
from colabjob.runner.clock import SYSTEM_CLOCK, Clock
from colabjob.runner.lease import DEFAULT_TTL, Heartbeat, Holder, Lease
from colabjob.runner.platforms import describe_platform
from colabjob.runner.record import JobRecord, Segment, create_record, read_record, update_record
from colabjob.runner.states import JobEvent, JobState, StopReason
from colabjob.runner.watchdog import Watchdog, watchdog_for
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.store import Store, open_store

if TYPE_CHECKING:
    from colabjob.config import JobSpec

__all__ = ["SegmentOptions", "run_segment", "session"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SegmentOptions:
    """How to run a segment. For ``run_segment`` a ``None`` field takes the job spec's value
    (``checkpoint``, ``budget`` and ``training`` sections); ``session()`` passes its own."""

    budget: str | float | None = None
    platform: str | None = None
    session_started_at: str | float | None = None
    margin: str | float | None = None
    every_steps: int | None = None
    every_minutes: float | None = None
    keep: int | None = None
    max_steps: int | None = None
    staging_dir: str | os.PathLike[str] | None = None
    log_every_steps: int | None = None
    allow_geometry_change: bool = False
    force: bool = False
    lease_ttl: float = DEFAULT_TTL
    stop_poll_seconds: float = 30.0
    clock: Clock = field(default=SYSTEM_CLOCK, compare=False)
    log: Callable[[str], None] | None = field(default=None, compare=False)
    session_id: str | None = None


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
        self.status: dict[str, Any] = {}

    # -- opening --------------------------------------------------------------------------
    def open(self) -> SegmentContext:
        record = self._load_or_create_record()
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
                stop_poll_seconds=opts.stop_poll_seconds,
            ).start()
            watchdog = self.watchdog
            self.heartbeat = lease.start_heartbeat(
                status=lambda: {**watchdog.status(), **self.status},
                on_lost=watchdog.lease_lost,
            )
        except BaseException:
            self._shutdown()
            lease.release()
            raise
        self._log(f"{platform.describe(self.clock.time())}; lease epoch {lease.epoch}")
        staging = None if opts.staging_dir is None else Path(opts.staging_dir)
        return SegmentContext(
            store=self.store,
            checkpoints=CheckpointStore(
                self.store,
                keep=2 if opts.keep is None else opts.keep,
                fence=lease.current_epoch,
                clock=self.clock.time,
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
            log=opts.log,
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

    def _shutdown(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.watchdog is not None:
            self.watchdog.close()

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
        if self.opts.log is not None:
            self.opts.log(message)


def _open(url: str | os.PathLike[str] | Store) -> Store:
    return url if isinstance(url, Store) else open_store(url)


@contextlib.contextmanager
def session(
    url: str | os.PathLike[str] | Store,
    *,
    budget: str | float | None = None,
    platform: str | None = None,
    session_started_at: str | float | None = None,
    margin: str | float | None = None,
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
    clock: Clock = SYSTEM_CLOCK,
    lease_ttl: float = DEFAULT_TTL,
    stop_poll_seconds: float = 30.0,
) -> Iterator[Session]:
    """Run one segment of the job at ``url`` around a plain PyTorch loop; yields a Session.

    ``budget`` (``"11h30m"``, ``"colab-pro"``), ``platform`` and ``session_started_at``
    override detection; the loop is told to stop ``margin`` (default 3 min) before the
    predicted end, with the final checkpoint committed. Checkpoints every ``every_steps``
    optimizer steps and/or every ``every_minutes`` (default 30; None turns it off), which
    bounds the work a VM vanishing without warning can cost; ``keep`` newest are kept.
    ``max_steps`` ends the job. ``force`` takes over a lease whose holder stopped
    heartbeating (after confirming it expired). ``config`` is recorded in a new job's
    ``job.json``.
    ``log=None`` silences the progress lines. A second live session raises
    ``LeaseHeldError``; the job's record ends SUSPENDED, COMPLETED or FAILED (see module).
    """
    opts = SegmentOptions(
        budget=budget,
        platform=platform,
        session_started_at=session_started_at,
        margin=margin,
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
        clock=clock,
        log=log,
    )
    run = _SegmentRun(_open(url), opts, config=config or {})
    s = Session(run.open())
    try:
        yield s
        outcome = s.close()
    except BaseException as e:
        run.finish(s.close(error=e), e)
        raise
    run.finish(outcome)


def run_segment(
    store_url: str | os.PathLike[str] | Store,
    spec: JobSpec,
    *,
    options: SegmentOptions | None = None,
) -> SegmentOutcome:
    """Run one segment of a built-in job kind (``colabjob.jobs.kinds.run_kind``).

    The context is built exactly as ``session()`` builds it; ``options`` fields left None
    take the spec's checkpoint, budget and training settings. Exceptions propagate after the
    record is closed as FAILED (the supervisor decides whether to retry).
    """
    from colabjob.config import config_hash

    opts = _with_spec_defaults(options or SegmentOptions(), spec)
    run = _SegmentRun(_open(store_url), opts, config=spec.to_dict(), config_hash=config_hash(spec))
    ctx = run.open()
    try:
        from colabjob.jobs import kinds

        outcome: SegmentOutcome = kinds.run_kind(spec, ctx)
    except BaseException as e:
        run.finish(None, e)
        raise
    run.finish(outcome)
    return outcome


def _with_spec_defaults(opts: SegmentOptions, spec: JobSpec) -> SegmentOptions:
    ck, bd, tr = spec.checkpoint, spec.budget, spec.training

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
    )
