"""How one segment closes, for ``runner.segment_run.SegmentRun`` (the base class
``SegmentClose``, whose attributes ``SegmentRun`` sets when it opens): stop the heartbeat,
the watchdog and the trackers; close the segment in ``job.json`` with its stop reason and the
job's next state (COMPLETED, SUSPENDED, CANCELLED after ``colabjob stop --cancel``, FAILED
after an error), unless this runner lost the lease (the record is the new holder's) or its
storage vanished; then, on every way out, release the lease, flush the store (the Drive
push), let the last notifications go out and leave the process group it joined.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from colabjob.errors import LeaseLostError, StaleEpochError, StorageError, StorageLostError
from colabjob.jobs.distributed import shutdown_distributed
from colabjob.jobs.policy import StopReason
from colabjob.jobs.progress import close_progress
from colabjob.runner.record import JobRecord, update_record
from colabjob.runner.states import JobEvent

if TYPE_CHECKING:
    from colabjob.clock import Clock
    from colabjob.jobs.context import SegmentOutcome
    from colabjob.jobs.progress import ProgressSink
    from colabjob.runner.lease.claim import Heartbeat, Lease
    from colabjob.runner.notify_events import JobNotices
    from colabjob.runner.options import SegmentOptions
    from colabjob.runner.watchdog import Watchdog
    from colabjob.storage.store import Store

log = logging.getLogger("colabjob.runner.segment_run")  # SegmentRun's logger, as before the split


class SegmentClose:
    """The closing half of ``SegmentRun`` (see the module)."""

    store: Store
    opts: SegmentOptions
    clock: Clock
    lease: Lease | None
    heartbeat: Heartbeat | None
    watchdog: Watchdog | None
    trackers: list[ProgressSink]
    notices: JobNotices | None
    own_group: bool
    say: Callable[[str], None] | None

    # -- closing --------------------------------------------------------------------------
    def finish(self, outcome: SegmentOutcome | None, error: BaseException | None = None) -> None:
        """Close the segment in the record, release the lease, flush the store."""
        lease = self.lease
        try:
            lost = isinstance(error, (StaleEpochError, LeaseLostError)) or (
                self.heartbeat is not None and self.heartbeat.lost is not None
            )
            cancel = self.watchdog is not None and self.watchdog.cancel_requested
            # a completed job's later stop signals are noted, not fatal (runner.signals)
            self._shutdown(completed=error is None and outcome is not None and outcome.completed)
            if lease is not None and not lost:
                self._close_record(outcome, error, cancel=cancel)
                if self.notices is not None:  # a supervisor retries a crash, then tells
                    self.notices.segment_closed(final_failure=not self.opts.supervised)
            elif self._storage_lost(error):
                self._log("the job's storage disappeared; this runner writes nothing more there")
            elif lost:
                self._log("this runner lost the job's lease; the record is left to the new holder")
                if self.notices is not None:
                    self.notices.lease_lost(str(error) if error is not None else "fenced")
        finally:
            try:
                if lease is not None:
                    self._release(lease)
            finally:
                self.store.flush()
                if self.notices is not None:  # after the Drive push: the job is safe first
                    self.notices.close()  # waits a few seconds at most for the last messages
                if self.own_group:
                    shutdown_distributed()

    def _storage_lost(self, error: BaseException | None) -> bool:
        lost = self.heartbeat.lost if self.heartbeat is not None else None
        return isinstance(error, StorageLostError) or (lost or "").startswith(
            "the job's storage disappeared"
        )

    def _close_record(
        self, outcome: SegmentOutcome | None, error: BaseException | None, *, cancel: bool
    ) -> None:
        """Close the segment in ``job.json``. After an error (full or read-only storage, say)
        a failure to write it is logged, so the lease is still released and the first error
        is the one reported."""
        try:
            update_record(
                self.store, lambda r: self._end(r, outcome, error, cancel=cancel), clock=self.clock
            )
        except StorageError as e:
            if error is None:
                raise
            self._log(f"could not close the segment in job.json: {e}")

    def _release(self, lease: Lease) -> None:
        try:
            lease.release()
        except StorageError as e:  # the storage is failing; a rerun here takes over at once
            self._log(f"could not release the job's lease: {e}")

    def _shutdown(self, *, completed: bool = False) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.watchdog is not None:
            self.watchdog.close(completed=completed)
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
            ended_at=self.clock.time(),
            last_step=last,
            stop_reason=reason,
            error=message,
            checkpoint_step=None if outcome is None else outcome.checkpoint_step,
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
