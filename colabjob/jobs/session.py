"""The Session API: the few lines a plain PyTorch training loop adds to resume exactly.

::

    with colabjob.session("gs://bucket/jobs/mygpt", budget="colab-free") as s:
        s.track(model=model, optimizer=opt, scheduler=sched, loader=loader, grad_accum=4)
        for batch in s.batches():               # resumes at the exact sample
            loss = model(batch) / 4
            loss.backward()
            if s.optimizer_step_due:            # this micro-batch completes a window
                opt.step(); sched.step(); opt.zero_grad()
            if s.step(loss=loss.item()):        # True: a final checkpoint is committed, stop
                break

``track()`` registers the live objects (build them all first: it restores the RNGs last) and
restores them from the newest committed checkpoint. ``step()`` is called once per
*micro-batch*; with ``grad_accum=K`` every K-th call is an optimizer-step boundary, and only
there does the session check the stop policy, write checkpoints or stop, so a checkpoint never
holds half-accumulated gradients and its data position is exact. Checkpoints are taken every
``ctx.every_steps`` optimizer steps and whenever ``ctx.policy.checkpoint_due()``; the loop is
blocked only while the state is copied to CPU memory, writing and uploading run in the
background (one commit in flight; a checkpoint that falls due meanwhile waits for it). On a
stop the final checkpoint is written synchronously and committed before ``step()`` returns
True; after a preemption notice (``policy.emergency``) it leaves out the objects passed as
``track(optional=...)``. The hot path does no I/O and no device syncs.

In a process group (``colabjob start --nproc N``, torchrun) every rank runs the same loop
over ``make_distributed_loader`` with its model wrapped in ``DistributedDataParallel``; at
each optimizer-step boundary one small all-reduce makes every rank stop or checkpoint at the
same step, and only rank 0 commits (``colabjob.jobs.distributed``). Call ``save()`` on every
rank or on none. A model sharded with FSDP2 (``fully_shard``) is tracked the same way: its
shards are written by every rank through ``torch.distributed.checkpoint`` and committed by
rank 0 (``colabjob.jobs.state.sharded``).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from colabjob.errors import CheckpointError, ConfigError
from colabjob.jobs.checkpointing.saver import Checkpointer
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.data import Geometry
from colabjob.jobs.decision import Vote, decide_agreed
from colabjob.jobs.distributed import Coordinator
from colabjob.jobs.numerics import pin_threads
from colabjob.jobs.policy import StopReason
from colabjob.jobs.session_report import SessionReport
from colabjob.jobs.state.format import Snapshot, Stateful
from colabjob.jobs.state.sizing import checkpoint_nbytes
from colabjob.jobs.step_metrics import MetricsLog
from colabjob.jobs.tracking import batch_len, build_tracked, release_loader

if TYPE_CHECKING:
    from colabjob.storage.checkpoints import CheckpointInfo, PendingCommit

__all__ = ["SegmentContext", "SegmentOutcome", "Session"]

log = logging.getLogger(__name__)


class Session(SessionReport):
    """One training segment seen from the training loop. See the module docstring."""

    def __init__(self, ctx: SegmentContext) -> None:
        pin_threads()  # oneMKL's dynamic threading off: the same sums in every session
        self.ctx = ctx
        self._policy = ctx.policy
        self._mono = ctx.monotonic
        self._every = ctx.every_steps
        self._max_steps = ctx.max_steps
        self._log_every = ctx.log_every_steps
        self._sync = Coordinator.current()  # None: a single process
        self._world = 1 if self._sync is None else self._sync.world_size
        self._saver = Checkpointer(ctx, say=self._say, on_commit=self._on_commit, sync=self._sync)
        self._committer = self._saver.committer
        self._tracked = False
        self._loader: Any = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._grad_accum = 1
        # progress as plain ints: the hot path must not build dataclasses
        self._step = self._micro = self._epoch = self._samples = self._tokens = 0
        self.first_step = 0
        self._metrics = MetricsLog()
        self._batch: Any = None
        self._batches: Generator[Any, None, None] | None = None
        self._t_last = 0.0
        self._next_status = 0.0
        self._sized = False  # expect_checkpoint() told the exact size (first boundary)
        self._save_due = False  # a periodic checkpoint waits for the commit in flight
        self._emergency = False  # agreed at the last boundary: a preemption notice
        self._complete_at_boundary = False
        self.resumed_from: CheckpointInfo | None = None
        self._stop_reason: StopReason | None = None
        self._outcome: SegmentOutcome | None = None

    # ---- registration and restore --------------------------------------------------------

    def track(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        loader: Any = None,
        grad_accum: int = 1,
        batch_size: int | None = None,
        world_size: int | None = None,
        extras: Mapping[str, Stateful] | None = None,
        optional: Mapping[str, Stateful] | None = None,
        trainable_only: bool | None = None,
    ) -> CheckpointInfo | None:
        """Register the live objects and restore them from the newest checkpoint, if any.

        ``loader`` must have ``state_dict()``/``load_state_dict()``: build it with
        ``colabjob.jobs.data.make_loader`` (or use torchdata's ``StatefulDataLoader``).
        ``batch_size`` defaults to the loader's; with ``grad_accum`` it is the batch
        geometry a resume must match (``GeometryChangedError`` unless the context allows a
        change). ``extras``/``optional``: other objects with ``state_dict()``;
        ``optional`` ones are left out of an emergency (preemption) checkpoint and keep
        their fresh state when a checkpoint lacks them. ``world_size`` defaults to the
        process group's; ``batch_size`` is per rank. A ``DistributedDataParallel`` model is
        saved unwrapped. Returns the checkpoint resumed from.
        """
        if self._tracked:
            raise ConfigError("Session.track() was already called; call it once per session")
        self._saver.tracked = build_tracked(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            loader=loader,
            grad_accum=grad_accum,
            batch_size=batch_size,
            world_size=self._world if world_size is None else world_size,
            distributed=self._sync is not None,
            extras=extras,
            optional=optional,
            trainable_only=trainable_only,
            require_sharded=self.ctx.fsdp and self._sync is not None,
        )
        self._loader, self._optimizer, self._grad_accum = loader, optimizer, grad_accum
        self._tracked = True
        info = self.restore()
        if model is not None:  # the budget's save guess, until a save is measured
            self._policy.expect_checkpoint(
                checkpoint_nbytes(model, optimizer, trainable_only=trainable_only)
            )
        self._restart_clock()  # batches() restarts it too
        return info

    def _restart_clock(self) -> None:
        self._t_last = self._mono()

    def restore(self) -> CheckpointInfo | None:
        """Load the newest committed checkpoint into the tracked objects; None if none."""
        got = self._saver.restore()
        if got is None:
            self._say(f"no checkpoint in {self.ctx.store.url}: starting from step 0")
            return None
        info, restored = got
        c = restored.counters
        self._step, self._micro, self._epoch = c.step, c.micro_step, c.epoch
        self._samples, self._tokens = c.samples_seen, c.tokens_seen
        self.first_step = c.step
        self._metrics.load(restored.meta.get("session") or {}, restored.metrics)
        self.resumed_from = info
        self._say(f"resumed from checkpoint step {info.step} ({c.samples_seen} samples seen)")
        return info

    @property
    def geometry(self) -> Geometry | None:
        return self._saver.tracked.geometry

    # ---- the loop ------------------------------------------------------------------------

    def batches(self, *, epochs: int | None = None) -> Iterator[Any]:
        """The tracked loader's batches, epoch after epoch, from the resumed position.

        Ends when the session stops, or after ``epochs`` epochs in total (counting those of
        earlier segments); the job is then complete. A gradient-accumulation window that
        straddles the last epoch's end is finished with the next epoch's first micro-batches.
        """
        if self._loader is None:
            raise ConfigError("Session.batches() needs track(loader=...)")
        self._batches = self._iterate(epochs)
        return self._batches

    def _iterate(self, epochs: int | None) -> Generator[Any, None, None]:
        if self._stopped_at_start():
            return
        self._restart_clock()
        empty_passes = 0
        while self._stop_reason is None:
            if epochs is not None and self._epoch >= epochs:
                if self._micro == 0:
                    self._finish(StopReason.COMPLETED)
                    return
                self._complete_at_boundary = True
            yielded = False
            for batch in self._loader:
                yielded = True
                self._batch = batch
                yield batch
                if self._stop_reason is not None:
                    return
            empty_passes = 0 if yielded else empty_passes + 1
            if empty_passes > 1:  # one empty pass is a resume at an epoch's very end
                raise ConfigError("the loader yielded no batch for a whole epoch")
            self._epoch += 1

    @property
    def optimizer_step_due(self) -> bool:
        """True while the current micro-batch is the last of its accumulation window: call
        ``optimizer.step()`` (and the scheduler's) before ``step()``."""
        return self._micro + 1 >= self._grad_accum

    def step(
        self,
        loss: float | torch.Tensor | None = None,
        *,
        samples: int | None = None,
        tokens: int = 0,
        **metrics: float | torch.Tensor,
    ) -> bool:
        """Count one micro-batch (after its backward and, at a window's end, the optimizer
        step); log, checkpoint and check the stop policy at optimizer-step boundaries.

        Returns True when the loop must stop: the final checkpoint is committed by then.
        ``samples`` defaults to the length of the last batch from ``batches()``; with several
        processes ``samples`` and ``tokens`` are this rank's, counted times the world size.
        """
        if self._stop_reason is not None:
            return True
        self._samples += (samples if samples is not None else self._batch_len()) * self._world
        self._tokens += tokens * self._world
        if loss is not None:
            cur = self._metrics.window.get("loss")
            if cur is not None and type(loss) is float and type(cur[0]) is float:
                cur[0] += loss  # the common case, inline
                cur[1] += 1
            else:
                self._metrics.add("loss", loss)
        if metrics:
            for key, value in metrics.items():
                self._metrics.add(key, value)
        self._micro += 1
        if self._micro < self._grad_accum:
            return False
        self._micro = 0
        self._step += 1
        return self._boundary()

    def _boundary(self) -> bool:
        now = self._mono()
        policy = self._policy
        # Every step reaches the policy (its contract: one call per step); a budget's
        # observe_step is an append, and a test policy may count steps.
        policy.observe_step(now - self._t_last)
        self._t_last = now
        if not self._sized:  # the optimizer state exists now: the exact size
            self._sized = True
            t = self._saver.tracked
            if t.model is not None:
                policy.expect_checkpoint(
                    checkpoint_nbytes(t.model, t.optimizer, trainable_only=t.trainable_only)
                )
        self._metrics.steps += 1
        if self._metrics.steps >= self._log_every:
            self._flush_metrics()
        committer = self._committer
        committer.reap(block=False)  # a failed one sets retry_due
        vote = Vote.ask(
            policy,
            step=self._step,
            every_steps=self._every,
            retry=self._save_due or committer.retry_due,
            busy=committer.in_flight,
        )
        d = decide_agreed(
            self._sync,
            vote,
            step=self._step,
            max_steps=self._max_steps,
            complete=self._complete_at_boundary,
        )
        self._emergency = d.emergency
        if d.reason is not None:
            self._finish(d.reason)
            return True
        self._save_due = d.deferred
        if d.save:
            self._save_async()
        if self.ctx.on_status is not None and now >= self._next_status:
            self._push_status(now)
        return False

    def _stopped_at_start(self) -> bool:
        """Before the first step of this segment: stop at once when the job is done or the
        policy (on any rank) says so; no checkpoint is wished for here."""
        vote = Vote(reason=self._policy.should_stop(), emergency=self._policy.emergency)
        d = decide_agreed(self._sync, vote, step=self._step, max_steps=self._max_steps)
        if d.reason is None:
            return False
        self._emergency = d.emergency
        self._finish(d.reason)
        return True

    def _batch_len(self) -> int:
        geometry = self._saver.tracked.geometry
        return batch_len(self._batch, geometry.batch_size if geometry is not None else 0)

    # ---- checkpoints -----------------------------------------------------------------------

    def _snapshot(self, *, emergency: bool, background: bool = False) -> tuple[Snapshot, float]:
        if self._micro:
            raise CheckpointError(
                f"cannot checkpoint at micro-batch {self._micro} of {self._grad_accum}",
                hint="checkpoint right after an optimizer step (step() does this for you)",
            )
        return self._saver.snapshot(
            counters=self.counters,
            metrics=self._metrics.history,
            meta={"session": self._metrics.state()},
            emergency=emergency,
            background=background,
        )

    def _save_async(self) -> PendingCommit[CheckpointInfo] | None:
        snap, snap_s = self._snapshot(emergency=False, background=True)
        pending = self._committer.save_async(snap, snap_seconds=snap_s)
        self._save_due = False
        self._t_last = self._mono()  # the pause is a checkpoint cost, not step time
        return pending

    def save(self, *, final: bool = False) -> CheckpointInfo | PendingCommit[CheckpointInfo] | None:
        """Checkpoint now (at an optimizer-step boundary). ``final``: synchronously, returning
        the committed checkpoint; else in the background, returning its ``PendingCommit``.
        With several processes every rank calls it; ranks other than 0 get None."""
        if final:
            snap, snap_s = self._snapshot(emergency=False)
            return self._committer.save_final(snap, snap_seconds=snap_s)
        return self._save_async()

    # ---- stopping --------------------------------------------------------------------------

    def _finish(self, reason: StopReason) -> None:
        """Stop at this optimizer-step boundary with a committed final checkpoint."""
        emergency = (
            reason is StopReason.PREEMPTION or self._emergency or self._policy.emergency
        )
        self._committer.reap(final=True)
        need = self._step > 0 and self.committed_step != self._step
        if self._sync is not None:
            need = self._sync.main_says(need)  # rank 0 commits; the others gather for it
        if need:
            snap, snap_s = self._snapshot(emergency=emergency)
            self._committer.save_final(snap, snap_seconds=snap_s)
        self._stop_reason = reason
        self._say(f"stopping at step {self._step}: {reason}")

    def close(self, error: BaseException | None = None) -> SegmentOutcome:
        """End the segment: wait for the background commit; if the loop ended without a stop
        (and no ``error``), the job is complete and a final checkpoint is committed."""
        if self._outcome is not None:
            return self._outcome
        try:
            return self._close(error)
        finally:
            self._release_loader()

    def _close(self, error: BaseException | None) -> SegmentOutcome:
        reason, message = self._stop_reason, None
        if error is not None:
            reason = StopReason.SIGNAL if isinstance(error, KeyboardInterrupt) else StopReason.CRASH
            message = f"{type(error).__name__}: {error}"
            try:  # a consistent snapshot already uploading is still worth committing
                self._committer.reap(final=True)
            except Exception as e:
                log.warning("background checkpoint failed while handling an error: %s", e)
        elif reason is None:
            if self._micro:
                self._say(
                    f"the loop ended mid-accumulation ({self._micro} of {self._grad_accum} "
                    f"micro-batches): the newest checkpoint is step {self.committed_step}"
                )
                self._committer.reap(final=True)
                self._stop_reason = StopReason.COMPLETED
            else:
                self._finish(StopReason.COMPLETED)
            reason = StopReason.COMPLETED
        self._outcome = SegmentOutcome(
            stop_reason=reason,
            first_step=self.first_step,
            last_step=max(self.first_step, self._step),
            completed=reason is StopReason.COMPLETED,
            checkpoint_step=self.committed_step,
            error=message,
        )
        return self._outcome

    def _release_loader(self) -> None:
        batches, self._batches = self._batches, None
        release_loader(self._loader, batches)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close(error=exc)
