"""Committing snapshots for the HF Trainer integration: background and final commits.

``Committer`` takes a ``Snapshot`` (already copied to CPU memory on the training thread, GPU
tensors into the pinned buffers of its ``staging`` pool) plus
a few small extra files and commits them through the context's ``CheckpointStore``: in the
background (``save_async``, one in flight; the training loop only paid for the snapshot) or
synchronously for the final checkpoint of a segment. It reports each commit's cost to the
stop policy (so the budget predicts the next save), keeps the newest committed step and pushes
status to the heartbeat. A failed background commit is logged and retried at the next save
(after ``MAX_FAILED_CHECKPOINTS`` in a row the run stops: the storage is failing); a fenced-out
one (another runner took the lease) is raised at once. With several processes
(a ``Coordinator``) only rank 0 commits; the other ranks ``follow`` each save, and a final
commit's result is broadcast, so no rank returns before the final checkpoint is committed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from colabjob.errors import CheckpointError, StaleEpochError
from colabjob.jobs.commit_failures import CommitFailures
from colabjob.jobs.context import SegmentContext
from colabjob.jobs.distributed import Coordinator
from colabjob.jobs.memory import SaveChooser, parse_async
from colabjob.jobs.saver import report_commit
from colabjob.jobs.sizing import checkpoint_nbytes
from colabjob.jobs.staging_buffers import StagingPool
from colabjob.jobs.state import Snapshot, write_snapshot

if TYPE_CHECKING:
    from colabjob.storage.checkpoints import CheckpointInfo, PendingCommit

log = logging.getLogger(__name__)

__all__ = ["Committer"]


class Committer:
    """Commits snapshots of one segment; see the module docstring."""

    def __init__(self, ctx: SegmentContext, sync: Coordinator | None = None) -> None:
        self.ctx = ctx
        self.sync = sync
        self.committed_step: int | None = None
        self._pending: PendingCommit[CheckpointInfo] | None = None
        self._pending_snap_s = 0.0
        self.retry_due = False
        self.failures = CommitFailures()  # consecutive failed background commits
        self.staging = StagingPool()  # pinned host buffers for background GPU snapshots
        self._chooser = SaveChooser(
            parse_async(ctx.async_checkpoint),
            say=self.say,
            on_status=ctx.on_status,
            buffers=self.staging,
        )

    def background_fits(self, model: Any, optimizer: Any) -> bool:
        """Whether a periodic save may copy the state for the background (host memory and
        ``ctx.async_checkpoint``); if not, snapshot with ``clone=False`` and ``save_async``
        commits it synchronously."""
        return self._chooser.background(checkpoint_nbytes(model, optimizer))

    @property
    def busy(self) -> bool:
        """A background commit is still uploading."""
        return self._pending is not None and not self._pending.done()

    def _kwargs(self, snap: Snapshot, meta: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "epoch": self.ctx.epoch,
            "config_hash": self.ctx.config_hash,
            "meta": {"samples_seen": snap.counters.samples_seen, **dict(meta)},
            "versions": {"torch": torch.__version__},
        }

    @staticmethod
    def _writer(snap: Snapshot, extra: Mapping[str, bytes]) -> Any:
        def write(staging: Path) -> dict[str, Path]:  # on the upload thread for async saves
            files = write_snapshot(snap, staging, consume=True)
            for name, data in extra.items():
                path = staging / name
                path.write_bytes(data)
                files[name] = path
            return files

        return write

    def save_async(
        self,
        step: int,
        snap: Snapshot,
        *,
        snap_seconds: float,
        extra: Mapping[str, bytes] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Commit in the background; waits first for the previous background commit. A
        snapshot of the live tensors (``snap.live``) is committed now, before returning."""
        self.reap()
        writer = self._writer(snap, dict(extra or {}))
        if snap.live:
            try:
                info = self.ctx.checkpoints.save(step, writer, **self._kwargs(snap, meta or {}))
            except StaleEpochError:
                raise
            except Exception as e:  # as a failed background commit (see reap)
                url = self.ctx.store.url
                self.failures.failed(e, step=step, saved_step=self.committed_step, url=url)
                self.retry_due = True
                self.say(f"checkpoint of step {step} failed ({e}); retrying at the next one")
                return
            self.failures.succeeded()
            self._committed(info, snap_seconds)
            self.retry_due = False
            return
        try:
            self._pending = self.ctx.checkpoints.save_async(
                step, writer, **self._kwargs(snap, meta or {})
            )
        except BaseException:
            if snap.release is not None:  # never written: its staging buffers are free again
                snap.release()
            raise
        self._pending_snap_s = snap_seconds
        self.retry_due = False

    def save_final(
        self,
        step: int,
        snap: Snapshot,
        *,
        snap_seconds: float,
        extra: Mapping[str, bytes] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Commit now and return the committed checkpoint (after the background one)."""
        try:
            self.reap(final=True)
            writer = self._writer(snap, dict(extra or {}))
            info = self.ctx.checkpoints.save(step, writer, **self._kwargs(snap, meta or {}))
        except BaseException as e:
            if self.sync is not None:  # the other ranks wait for this commit's result
                self.sync.broadcast(f"{type(e).__name__}: {e}")
            raise
        if self.sync is not None:
            self.sync.broadcast(None)
        self._committed(info, snap_seconds)
        return info

    def follow(self, step: int, *, final: bool) -> None:
        """A rank other than 0, at rank 0's save of ``step`` (after sending its state): it
        counts the step as committed (rank 0 commits it or fails the run); for a final save
        it first waits for rank 0's commit and raises if that failed."""
        if final and self.sync is not None:
            error = self.sync.broadcast(None)
            if error is not None:
                raise CheckpointError(f"rank 0 could not commit step {step}: {error}")
        self.committed_step = step

    def reap(self, *, final: bool = False, block: bool = True) -> None:
        """Collect the background commit (waiting unless ``block=False`` and it is still
        running). A periodic failure is logged and marks a retry; with ``final`` it raises."""
        pending = self._pending
        if pending is None or (not block and not pending.done()):
            return
        self._pending = None
        try:
            self._committed(pending.wait(), self._pending_snap_s)
        except StaleEpochError:
            raise
        except Exception as e:
            if final:
                raise
            url = self.ctx.store.url  # the storage fails: stop after a few in a row
            self.failures.failed(e, step=pending.step, saved_step=self.committed_step, url=url)
            self.retry_due = True
            self.say(f"checkpoint of step {pending.step} failed ({e}); retrying at the next one")
            return
        self.failures.succeeded()

    def _committed(self, info: CheckpointInfo, snap_s: float) -> None:
        self.committed_step = info.step
        report_commit(self.ctx, info, snap_s, self.say)
        if self.ctx.on_status is not None:
            self.ctx.on_status({"checkpoint_step": info.step})

    def say(self, message: str) -> None:
        log.info("%s", message)
        if self.ctx.log is not None:
            self.ctx.log(message)
