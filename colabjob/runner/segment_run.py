"""The runner-side resources of one segment, opened and closed in a fixed order.

``SegmentRun`` is what ``colabjob.runner.segment.open_segment`` drives. Opening: create or
load ``job.json``, refuse a job that was moved elsewhere (``JobMovedError``) or is finished,
acquire the lease (a live holder raises ``LeaseHeldError`` before anything changes), move the
record to RUNNING with a new ``Segment``, start the watchdog (budget, signals, preemption
notice, stop requests, an optional extra policy) and the lease heartbeat, start the experiment
trackers (``runner.trackers``), sweep the checkpoint prefixes an earlier session left
uncommitted, and build the ``SegmentContext`` with a ``CheckpointStore`` fenced by the
lease epoch and timed on the runner's clock. Closing (``finish``): stop the
heartbeat, the watchdog and the trackers, close the segment with its stop reason and the job
state (COMPLETED when the job finished, SUSPENDED after a budget/signal/preemption/stop-request
stop, CANCELLED after ``colabjob stop --cancel``, FAILED with the error on an exception), then
release the lease and run ``store.flush()`` (the Drive push), then give the segment's
notifications (``runner.notify_events``) a few seconds at most to go out; the lease is
released on every way out, even when the record cannot be written (full or read-only
storage). A runner that lost its lease leaves the record to the new holder; one whose
storage vanished (the job directory was deleted) writes nothing more there. Under
``--nproc N`` or torchrun, opening first joins the process group; only rank 0 does all of
the above, the other ranks get a context without record, lease or trackers
(``colabjob.jobs.distributed``), and closing leaves the group it joined. Closing is the
base class ``segment_close.SegmentClose``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabjob.errors import (
    AlreadyExistsError,
    JobStateError,
    StorageError,
)
from colabjob.jobs.context import SegmentContext
from colabjob.jobs.distributed import in_process_group, init_distributed
from colabjob.jobs.progress import FanOut, LogLines
from colabjob.jobs.state.host_memory import parse_async
from colabjob.runner.budget import DEFAULT_MARGIN, check_budget_fits
from colabjob.runner.handoff.transfer import check_not_moved
from colabjob.runner.lease.claim import Heartbeat, Lease
from colabjob.runner.lease.info import Holder
from colabjob.runner.notify import notify_urls, redact, require_notify
from colabjob.runner.notify_events import JobNotices, notices_for
from colabjob.runner.options import SegmentOptions
from colabjob.runner.platforms import describe_platform
from colabjob.runner.record import JobRecord, Segment, create_record, read_record, update_record
from colabjob.runner.segment_close import SegmentClose
from colabjob.runner.states import JobEvent, JobState
from colabjob.runner.trackers import WANDB_ID_KEY, new_wandb_id, require_trackers, trackers_for
from colabjob.runner.watchdog import Watchdog, watchdog_for
from colabjob.storage.checkpoints import CheckpointStore
from colabjob.storage.selection import check_resume_point, set_aside_all

if TYPE_CHECKING:
    from colabjob.jobs.progress import ProgressSink
    from colabjob.storage.store import Store

__all__ = ["SegmentRun"]

log = logging.getLogger(__name__)


class SegmentRun(SegmentClose):
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
        self.notices: JobNotices | None = None
        self.notify = notify_urls(opts.notify)
        self.status: dict[str, Any] = {}
        self.own_group = False  # open() joined the process group (--nproc): finish() leaves
        # events go to the log, else to the display
        self.say = opts.log or (opts.progress.event if opts.progress is not None else None)

    # -- opening --------------------------------------------------------------------------
    def open(self) -> SegmentContext:
        self.own_group = not in_process_group()
        if not init_distributed().is_main:  # the group of --nproc / torchrun, if any
            return self._open_follower()
        require_trackers(tensorboard=self.opts.tensorboard, wandb=self.opts.wandb)
        require_notify(self.notify)
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
        margin = DEFAULT_MARGIN if opts.margin is None else opts.margin
        check_budget_fits(platform.limit, margin=margin, save_guess=opts.save_guess)
        holder = Holder.here(platform=platform.name, session_id=opts.session_id)
        lease = Lease(self.store, holder=holder, ttl=opts.lease_ttl, clock=self.clock)
        checkpoints = self._checkpoints(record, lease)
        # Before the lease (whose epoch goes into job.json): a refused resume point leaves
        # the record byte for byte as it was.
        check_resume_point(checkpoints, record.committed_step, opts.resume)
        lease.acquire(force=opts.force)
        self.lease = lease
        if lease.took_over is not None:
            gone = lease.took_over
            self._log(
                f"took over the lease of a dead runner on this machine (pid {gone.pid}, "
                f"session {gone.session_id}): its process is gone, so no wait"
            )
        staging = None if opts.staging_dir is None else Path(opts.staging_dir)
        try:
            if opts.resume is not None and opts.resume.scratch:  # under the lease: it writes
                set_aside_all(checkpoints)
            self._sweep(checkpoints)
            record = update_record(self.store, self._begin, clock=self.clock)
            every = opts.every_minutes
            self.notices = notices_for(
                self.store, self.notify, record=record, max_steps=opts.max_steps,
                checkpoint_every=None if every is None else every * 60.0, clock=self.clock,
                say=self.say,
            )
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
                status=self._heartbeat_status, on_lost=self._lease_lost
            )
            self.trackers = trackers_for(
                self.store,
                tensorboard=self.opts.tensorboard,
                wandb=opts.wandb,
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
            checkpoints=checkpoints,
            policy=watchdog,
            epoch=lease.epoch,
            config_hash=self.config_hash if self.config_hash is not None else record.config_hash,
            on_status=self.status.update if self.notices is None else self._on_status,
            log=self.say,
            progress=self._progress(),
            committed_step=record.committed_step,
            **self._loop_settings(staging),
        )

    def _sweep(self, checkpoints: CheckpointStore) -> None:
        """Under the lease, before this segment writes: remove what an earlier one left
        uncommitted (a crash or a failed save; a sharded save's shards lie in its
        checkpoint prefix). Housekeeping only: a storage error is logged, not raised."""
        try:
            swept = checkpoints.sweep_staging()
        except StorageError as e:
            log.warning("could not sweep abandoned checkpoint prefixes: %s", e)
            return
        for prefix in swept:
            self._log(f"removed {prefix}: a checkpoint an earlier session never committed")

    # -- notifications (runner.notify_events) ----------------------------------------------
    def _on_status(self, status: dict[str, Any]) -> None:
        self.status.update(status)
        if self.notices is not None:
            self.notices.on_status(status)

    def _heartbeat_status(self) -> dict[str, Any]:
        assert self.watchdog is not None
        if self.notices is not None:  # the heartbeat's thread: never the training one
            self.notices.check_stall()
        return {**self.watchdog.status(), **self.status}

    def _lease_lost(self, message: str) -> None:
        assert self.watchdog is not None
        self.watchdog.lease_lost(message)
        if self.notices is not None:
            self.notices.lease_lost(message)

    def _checkpoints(self, record: JobRecord, lease: Lease) -> CheckpointStore:
        opts = self.opts
        return CheckpointStore(
            self.store,
            keep=opts.keep,
            fence=lease.current_epoch,
            clock=self.clock,  # save costs on the clock that times the steps
            staging_dir=None if opts.staging_dir is None else Path(opts.staging_dir),
            job={
                "job_id": record.job_id,
                "config": dict(record.config),
                "config_hash": record.config_hash,
            },
        )

    def _loop_settings(self, staging: Path | None) -> dict[str, Any]:
        """The context settings every rank shares."""
        opts = self.opts
        return {
            "staging_dir": staging,
            "allow_geometry_change": opts.allow_geometry_change,
            "every_steps": opts.every_steps,
            "max_steps": opts.max_steps,
            "resume": opts.resume,
            "log_every_steps": opts.log_every_steps,
            "clock": self.clock,
            "async_checkpoint": parse_async(opts.async_checkpoint),
        }

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
                self.store, fence=lambda: 2**62, clock=self.clock, staging_dir=staging
            ),
            policy=self.watchdog,
            config_hash=self.config_hash or "",
            **self._loop_settings(staging),
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
            first_step=0 if self._scratch else record.last_step or 0,
            epoch=self.lease.epoch,
            from_scratch=self._scratch,
        )
        if self.notify:  # only redacted: the URLs hold tokens
            record = record.with_extras(notify=[redact(u) for u in self.notify])
        if self.opts.wandb and not record.extras.get(WANDB_ID_KEY):
            record = record.with_extras(**{WANDB_ID_KEY: new_wandb_id()})  # one run per job
        return record.begin_segment(segment).with_epoch(self.lease.epoch)

    @property
    def _scratch(self) -> bool:
        return self.opts.resume is not None and self.opts.resume.scratch
