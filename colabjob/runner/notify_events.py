"""Which events of a job are notified, their words, and that each goes out only once.

``JobNotices`` watches one segment for the runner (``runner.segment_run``): the segment
paused (why, step/total, the sessions still to go at this segment's pace, and the exact
command to resume), the job completed (the final loss, where the artifact is), the job
failed (the error line), no checkpoint committed for twice the time-based checkpoint
interval, the lease lost to another runner, and a resume that fell back to an older
checkpoint than the newest one committed. Each event has a key (``paused:step-40``,
``completed``, ``no-commit:step-20``, ...; never a URL) claimed in the job's
``control/notified.json`` by compare-and-swap before it is queued, so a rerun of the same
event after a SIGKILL and a resume is not sent again. Sending is ``runner.notify``'s
background ``Notifier``: nothing here blocks a training step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from colabjob.clock import SYSTEM_CLOCK
from colabjob.errors import ColabJobError, PreconditionFailedError
from colabjob.runner.notify import Notifier

if TYPE_CHECKING:
    from colabjob.clock import Clock
    from colabjob.runner.record import JobRecord
    from colabjob.storage.store import Store

__all__ = ["NOTIFIED_KEY", "JobNotices", "claim", "notices_for", "notify_failure", "resume_command"]

log = logging.getLogger(__name__)

NOTIFIED_KEY = "control/notified.json"
_TRIES = 8


def claim(store: Store, key: str) -> bool:
    """Record ``key`` as sent in the job; False when it already was (by anyone)."""
    for _ in range(_TRIES):
        got = store.read_versioned(NOTIFIED_KEY)
        keys: list[str] = []
        if got is not None:
            try:
                keys = [str(k) for k in json.loads(got[0]).get("sent", [])]
            except (ValueError, AttributeError):
                keys = []  # damaged: start a fresh list rather than stay silent forever
        if key in keys:
            return False
        data = (json.dumps({"sent": [*keys, key]}, indent=1) + "\n").encode()
        try:
            if got is None:
                store.create(NOTIFIED_KEY, data)
            else:
                store.replace(NOTIFIED_KEY, data, got[1])
            return True
        except PreconditionFailedError:
            continue  # another writer claimed something meanwhile: read again
    return False


def resume_command(record: JobRecord, url: str) -> str:
    """How this job is resumed: ``colabjob resume URL`` for a job spec, else its script."""
    if isinstance(record.config.get("job"), Mapping):
        return f"colabjob resume {url}"
    return f"run the training script again with the same job URL ({url})"


class JobNotices:
    """The notified events of one segment of the job at ``store`` (rank 0 only)."""

    def __init__(
        self,
        store: Store,
        notifier: Notifier,
        *,
        record: JobRecord,
        max_steps: int | None,
        checkpoint_every: float | None,
        clock: Clock,
    ) -> None:
        self.store, self.notifier, self.clock = store, notifier, clock
        self.job_id = record.job_id
        self.committed_at_open = record.committed_step
        self.max_steps, self.checkpoint_every = max_steps, checkpoint_every
        self.checkpoint_step: int | None = None
        self.last_commit = clock.monotonic()
        self.first_seen = False

    # -- events while training (status pushes, heartbeat thread) --------------------------
    def on_status(self, status: Mapping[str, Any]) -> None:
        """A status push from the training loop: notes commits, spots a fallback."""
        step = status.get("checkpoint_step")
        if not isinstance(step, int) or step == self.checkpoint_step:
            return
        if not self.first_seen and 0 < step < self.committed_at_open:
            self.event(
                f"fallback:step-{self.committed_at_open}-to-{step}",
                "fell back to an older checkpoint",
                f"the newest checkpoint (step {self.committed_at_open}) did not verify or "
                f"load and was quarantined; training resumed from step {step}",
            )
        self.first_seen = True
        self.checkpoint_step = step
        self.last_commit = self.clock.monotonic()

    def check_stall(self) -> None:
        """No commit for twice the checkpoint interval (called by the heartbeat)."""
        every = self.checkpoint_every
        if every is None or self.clock.monotonic() - self.last_commit <= 2 * every:
            return
        step = self.checkpoint_step or self.committed_at_open
        self.event(
            f"no-commit:step-{step}",
            "no checkpoint committed",
            f"no checkpoint for {2 * every / 60:.0f} min (twice the interval) while running; "
            f"the newest is step {step}. Check the storage and the process.",
        )

    def lease_lost(self, message: str) -> None:
        self.event(
            f"lease-lost:step-{self.checkpoint_step or self.committed_at_open}",
            "lease lost",
            f"another runner took the job over ({message}); this one stops",
        )

    # -- the segment's end --------------------------------------------------------------
    def segment_closed(self, *, final_failure: bool = True) -> None:
        """The news of the record just closed (read back; a storage error skips it)."""
        from colabjob.runner.record import read_record

        try:
            got = read_record(self.store)
        except (ColabJobError, OSError) as e:
            log.warning("no notification of the segment's end: %s", e)
            return
        if got is not None:
            self.segment_end(got[0], self.store.url, final_failure=final_failure)

    def segment_end(self, record: JobRecord, url: str, *, final_failure: bool = True) -> None:
        """The closed record's news: paused, completed or failed (after retries)."""
        from colabjob.runner.states import JobState

        seg = record.history[-1] if record.history else None
        if seg is None:
            return
        step = seg.last_step if seg.last_step is not None else seg.first_step
        if record.state is JobState.COMPLETED:
            self.event("completed", "completed", self._completed_text(step, url))
        elif record.state is JobState.SUSPENDED:
            self.event(f"paused:step-{step}", "paused", self._paused_text(record, url, step))
        elif record.state is JobState.FAILED and final_failure:
            self.failed(record, url, seg.error or "unknown error")

    def failed(self, record: JobRecord, url: str, error: str) -> None:
        line = error.strip().splitlines()[0] if error.strip() else "unknown error"
        self.event(
            f"failed:segment-{len(record.history)}",
            "failed",
            f"{line}. Fix the cause, then: {resume_command(record, url)}",
        )

    def _paused_text(self, record: JobRecord, url: str, step: int) -> str:
        seg = record.history[-1]
        why = seg.stop_reason.value if seg.stop_reason is not None else "stopped"
        total = self.max_steps
        at = f"step {step}/{total}" if total else f"step {step}"
        done = step - seg.first_step
        eta = ""
        if total and done > 0 and total > step:
            eta = f"; about {math.ceil((total - step) / done)} more session(s) at this pace"
        return f"paused at {at} ({why}){eta}. To resume: {resume_command(record, url)}"

    def _completed_text(self, step: int, url: str) -> str:
        loss = _final_loss(self.store)
        loss_text = f", final loss {loss:.4g}" if loss is not None else ""
        try:
            final = bool(self.store.list("final/"))
        except ColabJobError:
            final = False
        where = f"{url.rstrip('/')}/final" if final else f"the newest checkpoint under {url}"
        return f"completed at step {step}{loss_text}; the artifact is at {where}"

    # -- sending ----------------------------------------------------------------------------
    def event(self, key: str, what: str, body: str) -> None:
        """Claim ``key`` and queue the message; a storage error skips it (never raises)."""
        try:
            if not claim(self.store, key):
                return
        except (ColabJobError, OSError) as e:
            log.warning("could not record notification %s: %s", key, e)
            return
        self.notifier.send(f"colabjob: {self.job_id} {what}", body)

    def close(self) -> None:
        self.notifier.close()


def _final_loss(store: Store) -> float | None:
    try:
        from colabjob.runner.history import load_history

        _, losses = load_history(store).series("loss")
    except (ColabJobError, OSError, ValueError):
        return None
    return losses[-1] if losses else None


def notices_for(
    store: Store,
    urls: tuple[str, ...],
    *,
    record: JobRecord,
    max_steps: int | None,
    checkpoint_every: float | None,
    clock: Clock,
    say: Callable[[str], None] | None,
) -> JobNotices | None:
    """A segment's ``JobNotices``, or None when no URL is configured (then ``say`` tells
    a job that had some how to keep them)."""
    if not urls:
        had = record.extras.get("notify")
        if had and say is not None:
            say(
                f"no notifications this session (this job had {', '.join(map(str, had))}): "
                "pass --notify or set COLABJOB_NOTIFY to keep them"
            )
        return None
    return JobNotices(
        store,
        Notifier(urls, say=say),
        record=record,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        clock=clock,
    )


def notify_failure(url: str, error: str, urls: tuple[str, ...]) -> None:
    """Tell ``urls`` that the job at ``url`` failed for good (the supervisor's retries are
    spent, or the error was final); waits a few seconds at most."""
    from colabjob.runner.record import read_record
    from colabjob.storage.store import open_store

    if not urls:
        return
    try:
        store = open_store(url)
        got = read_record(store)
    except (ColabJobError, OSError) as e:
        log.warning("no failure notification: %s", e)
        return
    if got is None:
        return
    notices = JobNotices(
        store,
        Notifier(urls),
        record=got[0],
        max_steps=None,
        checkpoint_every=None,
        clock=SYSTEM_CLOCK,
    )
    notices.failed(got[0], store.url, error)
    notices.close()
