"""The HF Trainer integration's bookkeeping and its callback.

``HFRun`` is what one ``train()`` call (one segment) keeps: the context, the ``Committer``,
the fetched checkpoint it resumes from, where the data stands in the epoch (for the exact
hand-over of a resumed epoch to the Trainer), the stop reason. ``ColabJobCallback`` turns
the step-boundary decision the Session takes too (``colabjob.jobs.decision``: completed at
``max_steps`` whatever else asked for a stop) into ``control.should_training_stop`` /
``should_save`` at every optimizer step, measures step time for the budget, pushes status
and (for the built-in kinds) forwards HF's log rows to ``ctx.progress`` (or as lines to
``ctx.log``), and tells the policy the expected checkpoint size (``expect_checkpoint``) for
its save guess. With several processes (``HFRun.sync``, a ``Coordinator``) rank 0 picks the
checkpoint every rank resumes from, and at every optimizer step one ``Coordinator.agree``
all-reduce makes every rank take the same stop and save decision. The mixin that uses both
is ``colabjob.jobs.hf.trainer``.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from colabjob.errors import (
    CheckpointError,
    CorruptCheckpointError,
    NoCheckpointError,
    ResumeError,
    UnsafeCheckpointError,
)
from colabjob.jobs.checkpointing.committer import Committer
from colabjob.jobs.checkpointing.saver import agree_on_load, fetch_agreed, refuse_silent_restart
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.data import ResumableLoader
from colabjob.jobs.decision import Decision, Vote, decide_agreed
from colabjob.jobs.distributed import Coordinator, DistributedResumableSampler
from colabjob.jobs.policy import StopReason
from colabjob.jobs.progress import STATUS_KEYS, format_metric_line
from colabjob.jobs.state.check import check_loadable
from colabjob.jobs.state.codec import read_json
from colabjob.jobs.state.format import STATE_FILE
from colabjob.jobs.state.sizing import checkpoint_nbytes
from colabjob.storage.selection import set_aside_unloadable

if TYPE_CHECKING:
    from colabjob.storage.checkpoints import CheckpointInfo

__all__ = ["ColabJobCallback", "HFRun", "batch_len", "metric_rows", "remaining_batches"]

TRAINER_STATE_FILE = "trainer_state.json"  # the name HF's TrainerState.load_from_json reads
STATUS_EVERY = 5.0  # seconds between pushes to ctx.on_status
_SUMMARY_KEYS = frozenset({"train_runtime", "train_loss", "total_flos"})  # the end-of-run row


class HFRun:
    """The integration's per-``train()`` bookkeeping (one segment)."""

    def __init__(self, ctx: SegmentContext, meta: dict[str, Any] | None = None) -> None:
        self.ctx = ctx
        self.committer = Committer(ctx)
        self.extra_meta = dict(meta or {})
        self.reset()

    def reset(self) -> None:
        """Forget the previous ``train()`` call (the newest committed step stays known) and
        find the process group this one runs in (every rank calls this at the same time)."""
        self.sync = Coordinator.current()  # None: a single process
        self.rank = 0 if self.sync is None else self.sync.rank
        self.world_size = 1 if self.sync is None else self.sync.world_size
        self.committer.sync = self.sync
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.resume_dir: Path | None = None
        self.resume_info: CheckpointInfo | None = None  # the checkpoint resume_dir holds
        self.hf_meta: dict[str, Any] = {}
        self.pending_restore = False
        self.loader: ResumableLoader | None = None
        self.first_step = 0
        self.epoch_index = 0  # the epoch the loader is in (HF's epoch loop index)
        self.epoch_batches = 0  # batches in a full epoch (0: unknown, iterable data)
        self.batches_in_epoch = 0
        self.samples = 0
        self.stop_reason: StopReason | None = None
        self.save_due = False  # a periodic checkpoint waits for the commit in flight
        self.agreed_busy = False  # several processes: rank 0's commit was uploading
        self.empty_epoch = False
        self.t_last = 0.0
        self.next_status = 0.0
        self.sized = False  # the exact checkpoint size went to the policy
        self.outcome: SegmentOutcome | None = None

    def begin(self) -> None:
        """Fetch the checkpoint this segment resumes from (or none) before the Trainer reads
        anything of it. One that verifies but does not load (``check_loadable``: every file
        read and decoded, nothing changed) is quarantined (by rank 0, one warning) and the
        previous one is tried, in this process; one chosen by hand is not replaced."""
        explicit = self.ctx.resume is not None and self.ctx.resume.explicit
        while True:
            self.cleanup()  # a fresh directory per checkpoint: no file of a refused one stays
            self.tmp = tempfile.TemporaryDirectory(prefix="colabjob-hf-", dir=self.ctx.staging_dir)
            info = fetch_agreed(self.ctx.checkpoints, self.sync, self.tmp.name, self.ctx.resume)
            self.resume_info = info
            if info is None:
                refuse_silent_restart(self.ctx)
                self.committer.say(f"no checkpoint in {self.ctx.store.url}: starting from step 0")
                return
            failure: CheckpointError | None = None
            try:
                check_loadable(self.tmp.name, rank=self.rank, json_files=(TRAINER_STATE_FILE,))
            except (CorruptCheckpointError, UnsafeCheckpointError) as e:
                failure = e
            failure = agree_on_load(self.sync, failure)
            if failure is None:
                break
            if self.rank == 0:
                set_aside_unloadable(self.ctx.checkpoints, info, failure)
            if explicit:
                raise NoCheckpointError(
                    f"the chosen checkpoint step {info.step} ({info.dirname}) does not load: "
                    f"{failure.args[0]}; it was quarantined",
                    hint=f"choose another one (colabjob resume {self.ctx.store.url} "
                    "--from-step N), or resume without a choice to use the newest valid one",
                ) from failure
        doc = read_json(Path(self.tmp.name) / STATE_FILE)
        hf = (doc.get("meta") or {}).get("hf") if isinstance(doc, dict) else None
        if not isinstance(hf, dict):
            raise ResumeError(
                f"checkpoint step {info.step} in {self.ctx.store.url} was not written by the "
                "HF Trainer integration",
                hint="resume it with the code that started the job (e.g. the Session API)",
            )
        if self.ctx.config_hash and info.config_hash and info.config_hash != self.ctx.config_hash:
            self.committer.say(f"warning: checkpoint step {info.step} has another config hash")
        self.resume_dir, self.hf_meta, self.pending_restore = Path(self.tmp.name), hf, True
        self.epoch_index = int(hf["epoch_index"])
        self.committer.committed_step = info.step
        self.committer.say(f"resuming from checkpoint step {info.step}")

    def decide(self, step: int, hf_max_steps: int, every_steps: int | None) -> Decision:
        """The step-boundary decision (``colabjob.jobs.decision``, agreed over ranks), as
        the Session takes it; the job is complete at the Trainer's ``max_steps`` too."""
        vote = Vote.ask(
            self.ctx.policy,
            step=step,
            every_steps=every_steps,
            retry=self.save_due or self.committer.retry_due,
            busy=self.committer.in_flight,
        )
        d = decide_agreed(self.sync, vote, step=step, max_steps=self._limit(hf_max_steps))
        self.agreed_busy = d.busy
        self.save_due = d.deferred
        return d

    def decide_start(self, step: int, hf_max_steps: int) -> StopReason | None:
        """Before the first step of this segment (every rank at once): why it stops at once
        (``COMPLETED`` when the job is done), as the Session decides it; None: train."""
        policy = self.ctx.policy
        vote = Vote(reason=policy.should_stop(), emergency=policy.emergency)
        return decide_agreed(self.sync, vote, step=step, max_steps=self._limit(hf_max_steps)).reason

    def _limit(self, hf_max_steps: int) -> int:
        """The job's last step: the Trainer's ``max_steps`` or the context's, the lower."""
        ctx_max = self.ctx.max_steps
        return hf_max_steps if ctx_max is None else min(hf_max_steps, ctx_max)

    @property
    def busy(self) -> bool:
        """A background commit is uploading (as agreed at this step, with several ranks)."""
        return self.agreed_busy if self.sync is not None else self.committer.busy

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Around a load from ``resume_dir``, a backstop: ``begin()`` already refused a
        checkpoint whose files do not load. One that still fails here (the Trainer has
        taken its trainer state by now) is quarantined (by rank 0) and the segment fails
        with a retryable error; a rerun resumes from the previous valid checkpoint."""
        try:
            yield
        except (CorruptCheckpointError, UnsafeCheckpointError) as e:
            info = self.resume_info
            if info is None:
                raise
            if self.rank == 0:
                set_aside_unloadable(self.ctx.checkpoints, info, e)
            if self.ctx.resume is not None and self.ctx.resume.explicit:
                raise
            raise CorruptCheckpointError(
                f"checkpoint step {info.step} does not load ({e.args[0]}); it was quarantined",
                hint=f"the retry resumes from the previous valid checkpoint "
                f"(colabjob resume {self.ctx.store.url})",
            ) from e

    def cleanup(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def remaining_batches(loader: ResumableLoader) -> int | None:
    """Batches left in the loader's current epoch (None for iterable data); this rank's,
    for a distributed loader (its position counts global samples)."""
    sampler = loader.state_dict().get("sampler")
    if sampler is None or loader.batch_size is None:
        return None
    left = int(sampler["size"]) - int(sampler["offset"])
    shard = loader.resumable_sampler
    if isinstance(shard, DistributedResumableSampler):
        return left // shard.global_batch * shard.grad_accum
    bs = int(loader.batch_size)
    return left // bs if loader.drop_last else math.ceil(left / bs)


def batch_len(batch: Any) -> int:
    if isinstance(batch, dict) and batch:
        first = next(iter(batch.values()))
        if isinstance(first, torch.Tensor) and first.dim():
            return int(first.shape[0])
        if isinstance(first, list):
            return len(first)
    return 0


def metric_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HF log rows as colabjob metric rows (``learning_rate`` becomes ``lr``)."""
    rows = []
    for entry in log_history:
        row = {("lr" if k == "learning_rate" else k): v for k, v in entry.items()}
        rows.append(row)
    return rows


class ColabJobCallback(TrainerCallback):
    """Budget-driven ``should_save`` / ``should_training_stop`` and the step clock."""

    def __init__(self, run: HFRun, *, forward_logs: bool = False) -> None:
        self.run = run
        self.forward_logs = forward_logs

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.run.t_last = self.run.ctx.monotonic()
        self._expect_size(kwargs)  # a guess: the optimizer has no state yet

    def _expect_size(self, kwargs: dict[str, Any]) -> None:
        model = kwargs.get("model")
        if isinstance(model, torch.nn.Module):
            self.run.ctx.policy.expect_checkpoint(checkpoint_nbytes(model, kwargs.get("optimizer")))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        run, ctx = self.run, self.run.ctx
        now = ctx.monotonic()
        ctx.policy.observe_step(now - run.t_last)
        run.t_last = now
        if not run.sized:  # after the first optimizer step its state exists: the exact size
            run.sized = True
            self._expect_size(kwargs)
        run.committer.reap(block=False)  # a failed one sets retry_due
        if run.epoch_batches:
            state.epoch = run.epoch_index + run.batches_in_epoch / run.epoch_batches
        step = state.global_step
        d = run.decide(step, int(state.max_steps), ctx.every_steps)
        if d.reason is not None:
            run.stop_reason = d.reason
            control.should_training_stop = True
        if d.save:
            control.should_save = True
        if ctx.on_status is not None and now >= run.next_status:
            run.next_status = now + STATUS_EVERY
            total = ctx.max_steps if ctx.max_steps is not None else state.max_steps
            ctx.on_status(
                {"step": step, "total": total, "epoch": state.epoch, "samples_seen": run.samples}
            )

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        ctx = self.run.ctx
        progress = ctx.progress
        if not logs or (not self.forward_logs and progress is None):
            return
        if progress is not None and not _SUMMARY_KEYS & set(logs):
            total = ctx.max_steps if ctx.max_steps is not None else state.max_steps
            progress.update(state.global_step, total or None, self._progress_metrics(logs))
            return
        if not self.forward_logs:  # HF prints its rows itself; only the trackers take them
            return
        line = f"step {state.global_step}: {format_metric_line(logs)}"
        if progress is not None:
            progress.event(line)
        elif ctx.log is not None:
            ctx.log(line)

    def _progress_metrics(self, logs: dict[str, Any]) -> dict[str, Any]:
        """HF's row (``learning_rate`` as ``lr``) with samples seen and the session's
        deadline and next checkpoint."""
        ctx = self.run.ctx
        shown: dict[str, Any] = metric_rows([logs])[0]
        shown["samples"] = self.run.samples
        status = ctx.policy.status()
        shown.update({k: v for k, v in status.items() if k in STATUS_KEYS and v is not None})
        return shown
