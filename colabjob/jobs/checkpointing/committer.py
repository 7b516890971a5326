"""The one committer of both training paths (the Session API and the HF Trainer).

``Committer`` takes a ``Snapshot`` (already copied to CPU memory on the training thread, GPU
tensors into the pinned buffers of its ``staging`` pool) plus optional small extra files (the
HF ``trainer_state.json``) and commits them through the context's ``CheckpointStore``: in the
background (``save_async``, one in flight; the loop only paid for the snapshot) or
synchronously (``save_final``, the final checkpoint of a segment). A snapshot of the live
tensors (``snap.live``: no host memory for a copy, ``background_fits``) is committed
synchronously by ``save_async`` too. Every commit's manifest ``meta`` holds ``samples_seen``
and ``epoch`` from the snapshot's counters, the snapshot's meta and the caller's.

It reports each commit's cost to the stop policy (so the budget predicts the next save),
keeps the newest committed step and tells ``on_commit`` (the heartbeat). ``reap()`` collects a
finished background commit: a fenced-out one (``StaleEpochError``: another runner owns the
job) is raised, any other failure of a periodic checkpoint is logged, counted
(``CommitFailures``: after ``MAX_FAILED_CHECKPOINTS`` in a row the run stops) and marks
``retry_due`` for the next boundary; a final one is raised. With several processes
(a ``Coordinator``) only rank 0 commits; the other ranks ``follow`` each save, and a final
commit's result is broadcast, so no rank returns before the final checkpoint is committed.
A sharded model's DCP files are written by every rank (``track_shards``): a rank counts as
busy (``in_flight``) until its own write finished, so no rank starts the next checkpoint
before every rank's previous write is done, and ``reap`` waits for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from colabjob.errors import CheckpointError, StaleEpochError
from colabjob.jobs.checkpointing.failures import CommitFailures
from colabjob.jobs.context import SegmentContext
from colabjob.jobs.distributed import Coordinator
from colabjob.jobs.state.capture import write_snapshot
from colabjob.jobs.state.dcp_writer import HostCopy
from colabjob.jobs.state.format import Snapshot
from colabjob.jobs.state.host_memory import HostBuffers, SaveChooser, parse_async
from colabjob.jobs.state.pinned import StagingPool

if TYPE_CHECKING:
    from colabjob.jobs.state.dcp_writer import ShardWrite
    from colabjob.storage.checkpoints import CheckpointInfo, PendingCommit

log = logging.getLogger(__name__)

__all__ = ["Committer", "report_commit"]


class Committer:
    """Commits the snapshots of one segment; see the module docstring."""

    def __init__(
        self,
        ctx: SegmentContext,
        *,
        sync: Coordinator | None = None,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.sync = sync
        self.committed_step: int | None = None
        self.retry_due = False  # a periodic commit failed: the next boundary saves again
        self.failures = CommitFailures()  # consecutive failed periodic commits
        self.staging = StagingPool()  # pinned host buffers for background GPU snapshots
        self.host_copy = HostCopy()  # a sharded model's host copy for DCP's background write
        self._pending: PendingCommit[CheckpointInfo] | None = None
        self._pending_snap_s = 0.0
        self._on_commit = on_commit
        self._chooser: SaveChooser | None = None  # background or synchronous saves
        self._shards: ShardWrite | None = None  # this rank's DCP write of sharded state

    @property
    def rank(self) -> int:
        return 0 if self.sync is None else self.sync.rank

    def background_fits(self, nbytes: int) -> bool:
        """Whether a periodic save of ``nbytes`` of state may copy it for the background
        (host memory and ``ctx.async_checkpoint``); if not, snapshot the live tensors
        (``clone=False``) and ``save_async`` commits them synchronously."""
        if self._chooser is None:
            self._chooser = SaveChooser(
                parse_async(self.ctx.async_checkpoint),
                say=self.say,
                on_status=self.ctx.on_status,
                buffers=_Held(self.staging, self.host_copy),
            )
        return self._chooser.background(nbytes)

    @property
    def in_flight(self) -> bool:
        """A background commit was started and not yet reaped (it may have finished), or
        this rank's DCP write of sharded state is still running."""
        return self._pending is not None or not self._shards_done()

    @property
    def busy(self) -> bool:
        """A background commit is still uploading (or this rank's shards being written)."""
        return (self._pending is not None and not self._pending.done()) or not self._shards_done()

    def track_shards(self, shards: ShardWrite) -> None:
        """This rank's DCP write of one checkpoint, started at the step (every rank)."""
        self._reap_shards(block=True)
        self._shards = shards

    def wait_shards(self) -> None:
        """Wait for this rank's DCP write in flight, if any (before starting another)."""
        self._reap_shards(block=True)

    def _shards_done(self) -> bool:
        return self._shards is None or self._shards.done()

    def _reap_shards(self, *, block: bool) -> None:
        """Forget this rank's finished DCP write; its failure is rank 0's failed commit (DCP
        tells every rank), so here it is only logged."""
        shards = self._shards
        if shards is None or (not block and not shards.done()):
            return
        self._shards = None
        try:
            shards.result()
        except Exception as e:
            log.warning("rank %d: writing the sharded checkpoint failed: %s", self.rank, e)

    def _kwargs(self, snap: Snapshot, meta: Mapping[str, Any]) -> dict[str, Any]:
        c = snap.counters
        return {
            "epoch": self.ctx.epoch,
            "config_hash": self.ctx.config_hash,
            "meta": {"samples_seen": c.samples_seen, "epoch": c.epoch, **snap.meta, **meta},
            "versions": {"torch": torch.__version__},
            "prefix": snap.shards.prefix if snap.shards is not None else None,
        }

    @staticmethod
    def _writer(snap: Snapshot, extra: Mapping[str, bytes]) -> Callable[[Path], dict[str, Any]]:
        def write(staging: Path) -> dict[str, Any]:  # on the upload thread for async saves
            files: dict[str, Any] = dict(write_snapshot(snap, staging, consume=True))
            if snap.shards is not None:  # every rank's DCP files, once every rank wrote them
                files.update(snap.shards.wait(staging))
            for name, data in extra.items():
                path = staging / name
                path.write_bytes(data)
                files[name] = path
            return files

        return write

    def save_async(
        self,
        snap: Snapshot,
        *,
        snap_seconds: float,
        extra: Mapping[str, bytes] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> PendingCommit[CheckpointInfo] | None:
        """Commit ``snap`` in the background after the previous background commit; its
        ``PendingCommit``. None for a snapshot of the live tensors (committed now, a failure
        as a failed background commit) and on ranks other than 0 (``follow``)."""
        step = snap.counters.step
        if self.rank != 0:
            self.follow(step, final=False)
            return None
        self.reap()
        self.retry_due = False
        writer, kwargs = self._writer(snap, dict(extra or {})), self._kwargs(snap, meta or {})
        if snap.live:
            try:
                info = self.ctx.checkpoints.save(step, writer, **kwargs)
            except StaleEpochError:
                raise
            except Exception as e:  # as a failed background commit (see reap)
                self._failed(e, step)
                return None
            self.failures.succeeded()
            self._committed(info, snap_seconds)
            return None
        try:
            self._pending = self.ctx.checkpoints.save_async(step, writer, **kwargs)
        except BaseException:
            if snap.release is not None:  # never written: its staging buffers are free again
                snap.release()
            raise
        self._pending_snap_s = snap_seconds
        return self._pending

    def save_final(
        self,
        snap: Snapshot,
        *,
        snap_seconds: float,
        extra: Mapping[str, bytes] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo | None:
        """Commit ``snap`` now (after the background commit) and return the committed
        checkpoint; None on ranks other than 0, which wait for rank 0's result."""
        step = snap.counters.step
        if self.rank != 0:
            self.follow(step, final=True)
            return None
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

    def reap(self, *, final: bool = False, block: bool = True) -> bool:
        """Collect the background commit (waiting unless ``block=False`` and it is still
        running). False when a periodic commit failed (logged; ``retry_due`` is set); raises
        a fenced-out one, any when ``final``, and a ``StorageError`` after
        ``MAX_FAILED_CHECKPOINTS`` failures in a row. This rank's DCP write is waited for
        only when ``final`` (``save_async`` reaps right after starting one)."""
        self._reap_shards(block=final)
        pending = self._pending
        if pending is None or (not block and not pending.done()):
            return True
        self._pending = None
        try:
            info = pending.wait()
        except StaleEpochError:
            raise
        except Exception as e:
            if final:
                raise
            self._failed(e, pending.step)
            return False
        self.failures.succeeded()
        self._committed(info, self._pending_snap_s)
        return True

    def _failed(self, error: Exception, step: int) -> None:
        url = self.ctx.store.url  # the storage fails: stop after a few in a row
        self.failures.failed(error, step=step, saved_step=self.committed_step, url=url)
        self.retry_due = True
        self.say(f"checkpoint of step {step} failed ({error}); retrying at the next one")

    def _committed(self, info: CheckpointInfo, snap_s: float) -> None:
        self.committed_step = info.step
        report_commit(self.ctx, info, snap_s, self.say)
        if self._on_commit is not None:
            self._on_commit(info.step)
        elif self.ctx.on_status is not None:
            self.ctx.on_status({"checkpoint_step": info.step})

    def say(self, message: str) -> None:
        log.info("%s", message)
        if self.ctx.log is not None:
            self.ctx.log(message)


class _Held:
    """Every host buffer kept for background copies, as the ``SaveChooser`` sees them (room
    for the next copy; freed when saving turns synchronous)."""

    def __init__(self, *parts: HostBuffers) -> None:
        self.parts = parts

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def clear(self) -> int:
        return sum(p.clear() for p in self.parts)


def report_commit(
    ctx: SegmentContext, info: CheckpointInfo, snap_s: float, say: Callable[[str], None]
) -> None:
    """Tell the stop policy what a committed checkpoint cost (the snapshot and the write,
    then upload and commit) so the budget learns real save times, and say so in the log."""
    stats = info.stats
    if stats is None:
        return
    ctx.policy.observe_checkpoint(
        write_seconds=snap_s + stats.write_seconds,
        upload_seconds=stats.upload_seconds + stats.commit_seconds,
        nbytes=stats.nbytes,
    )
    say(
        f"checkpoint step {info.step} committed ({stats.nbytes / 1e6:.1f} MB, "
        f"{snap_s + stats.total_seconds:.1f} s)"
    )
