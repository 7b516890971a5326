"""HF Trainer integration: an existing ``transformers.Trainer`` made session-resumable.

``make_resumable(trainer, ctx)`` (or ``ColabJobTrainer(..., segment=ctx)``) mixes
``ResumableTrainerMixin`` into the trainer's own class, so subclasses (``SFTTrainer``, a
user's) keep their behaviour. With it, ``trainer.train()``:

- resumes from the newest checkpoint *committed* to the job's storage (``ctx.checkpoints``),
  never from HF's ``checkpoint-N`` folders, and never writes one: ``_save_checkpoint`` commits
  a snapshot (model or only its trainable tensors, optimizer, scheduler, grad scaler, every
  RNG, the data position and the ``TrainerState``) through the manifest-last protocol;
- reads the data through ``colabjob.jobs.data.make_loader`` (a ``StatefulDataLoader`` with a
  seeded per-epoch permutation), so a resume seeks to the saved sample in O(1). The Trainer's
  own batch skipping is off (``ignore_data_skip``); the resumed epoch is handed to the
  Trainer as the batches that remain, so gradient-accumulation windows line up exactly;
- asks the stop policy at every optimizer step (``should_training_stop`` with a final
  synchronous commit), saves when ``ctx.every_steps`` or ``policy.checkpoint_due()`` says so
  (in the background: the step only pays for the copy to CPU memory), and restores the RNGs
  as the very last thing before the first resumed step.

On CPU an interrupted run ends bit-identical to an uninterrupted one. ``trainer.colabjob_outcome``
is the ``SegmentOutcome`` after ``train()``.

Several processes (``colabjob start --nproc N``, or torchrun; DDP through accelerate as
usual) reuse the Session's distributed pieces: the train loader is
``make_distributed_loader`` (each rank its share of one global order, never re-sharded),
every optimizer step agrees on stop and save over all ranks, a checkpoint gathers every
rank's RNGs and loader position to rank 0, which alone commits (the others wait for a final
commit's result), and a resume loads the checkpoint rank 0 chose on every rank, each with
its own RNGs. The same world size resumes bit-identically on CPU.

A model sharded with FSDP2 as transformers loads it (``distributed_config=``; the kinds'
``training.fsdp``, ``colabjob.jobs.hf.fsdp``) is saved as the Session saves one: every rank
writes its shards of the model and optimizer with DCP (``saver.start_shards``), rank 0
commits them with the rest, and a resume loads them on every rank, resharded, with the
optimizer (or cuts a whole checkpoint into shards). LoRA adapters on a sharded base are
plain tensors, alike on every rank: they are saved whole from rank 0 as without FSDP.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from transformers import Trainer

from colabjob.errors import ConfigError, ResumeError
from colabjob.jobs.checkpointing.saver import loads_apart
from colabjob.jobs.context import SegmentContext, SegmentOutcome
from colabjob.jobs.data import ResumableLoader
from colabjob.jobs.data.loader import quiet_workers
from colabjob.jobs.distributed import in_process_group
from colabjob.jobs.hf.callback import ColabJobCallback, HFRun, batch_len
from colabjob.jobs.hf.checkpoints import TrainerCheckpoints
from colabjob.jobs.hf.compat import check_trainer_compat
from colabjob.jobs.hf.data import align_epoch, train_loader
from colabjob.jobs.hf.finish import JobLossMixin, job_train_loss
from colabjob.jobs.hf.fsdp import own_storage
from colabjob.jobs.numerics import pin_threads
from colabjob.jobs.policy import StopReason
from colabjob.jobs.state.codec import read_json
from colabjob.jobs.state.format import STATE_FILE
from colabjob.jobs.state.restore import restore
from colabjob.jobs.state.sharded import is_sharded
from colabjob.jobs.state.tracked import Tracked

__all__ = ["ColabJobTrainer", "ResumableTrainerMixin", "job_train_loss", "make_resumable"]


class ResumableTrainerMixin(TrainerCheckpoints, JobLossMixin):
    """Mixed in before a ``transformers.Trainer`` class; see the module docstring."""

    _colabjob: HFRun

    def _colabjob_attach(
        self: Any,
        ctx: SegmentContext,
        meta: dict[str, Any] | None = None,
        *,
        forward_logs: bool = False,
    ) -> None:
        """Bind to ``ctx``. ``forward_logs``: HF's log rows go to ``ctx.log`` instead of HF's
        own printer/progress bar (the built-in kinds); else HF keeps printing them."""
        check_trainer_compat(Trainer)  # the private internals overridden here must exist
        pin_threads()  # oneMKL's dynamic threading off: the same sums in every session
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        self._colabjob = HFRun(ctx, meta)
        drop = ["ColabJobCallback", "JITCheckpointCallback"]  # our watchdog handles SIGTERM
        if forward_logs:
            drop += [PrinterCallback.__name__, ProgressCallback.__name__]
        for cb in list(self.callback_handler.callbacks):
            if type(cb).__name__ in drop:
                self.callback_handler.remove_callback(cb)
        self.add_callback(ColabJobCallback(self._colabjob, forward_logs=forward_logs))

    @property
    def colabjob_outcome(self) -> SegmentOutcome | None:
        """How the last ``train()`` call ended (None before)."""
        return self._colabjob.outcome

    # ---- the entry point -----------------------------------------------------------------

    def train(
        self: Any,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> Any:
        if isinstance(resume_from_checkpoint, str):  # True/None/False: we resume anyway
            raise ConfigError(
                "resume_from_checkpoint is not used with colabjob",
                hint="colabjob resumes from the newest checkpoint committed to the job's "
                "storage; call trainer.train() without it",
            )
        run = self._colabjob
        run.reset()  # joins the process group's coordination, if any
        self._colabjob_check_args()
        if self.optimizer is None and is_sharded(self.model):
            own_storage(self.model)  # before the optimizer takes the parameters
        try:
            run.begin()
            self._colabjob_begin_totals(fresh=run.resume_dir is None)
            saved_bs = run.hf_meta.get("train_batch_size")
            if saved_bs and self.args.auto_find_batch_size:
                self._train_batch_size = int(saved_bs)
            output = super().train(  # type: ignore[misc]
                trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
            )
            self._colabjob_finish()
        except BaseException as e:
            with contextlib.suppress(Exception):  # a snapshot already uploading still commits
                run.committer.reap(final=False)
            step = int(getattr(getattr(self, "state", None), "global_step", 0) or 0)
            run.outcome = SegmentOutcome(
                stop_reason=(
                    StopReason.SIGNAL if isinstance(e, KeyboardInterrupt) else StopReason.CRASH
                ),
                first_step=run.first_step,
                last_step=max(run.first_step, step),
                completed=False,
                checkpoint_step=run.committer.committed_step,
                error=f"{type(e).__name__}: {e}",
            )
            run.cleanup()
            raise
        run.cleanup()
        return output

    def _colabjob_check_args(self: Any) -> None:
        args = self.args
        if args.world_size > 1 and (
            self._colabjob.world_size != args.world_size
            or self.is_deepspeed_enabled
            or self.is_fsdp_enabled
        ):
            raise ConfigError(
                f"colabjob's HF integration runs several processes as data parallel (DDP, or "
                f"FSDP2 for a model loaded with transformers' distributed_config) in the "
                f"process group it joined; this run has world_size {args.world_size} (process "
                f"group: {in_process_group()}), DeepSpeed {self.is_deepspeed_enabled}, "
                f"accelerate's FSDP {self.is_fsdp_enabled}",
                hint="start the processes with `colabjob start/resume --nproc N` (or torchrun), "
                "leave DeepSpeed and the Trainer's fsdp option off; to shard, load the model "
                "with from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))",
            )
        if args.load_best_model_at_end:
            warnings.warn(
                "load_best_model_at_end needs HF checkpoint folders, which colabjob does not "
                "write; the last model is kept",
                UserWarning,
                stacklevel=3,
            )
        if args.train_sampling_strategy not in ("random", "sequential"):
            warnings.warn(
                f"train_sampling_strategy={args.train_sampling_strategy!r} is replaced by "
                "colabjob's resumable shuffled order",
                UserWarning,
                stacklevel=3,
            )
        args.ignore_data_skip = True  # the loader seeks itself; HF must not skip batches

    def _colabjob_finish(self: Any) -> None:
        run = self._colabjob
        run.committer.reap(final=True)
        step = int(self.state.global_step)
        reason = run.stop_reason or StopReason.COMPLETED
        need = step > 0 and run.committer.committed_step != step
        if run.sync is not None:
            need = run.sync.main_says(need)  # rank 0 commits; the others send their state
        if need:
            self._colabjob_save(final=True)
        run.outcome = SegmentOutcome(
            stop_reason=reason,
            first_step=run.first_step,
            last_step=max(run.first_step, step),
            completed=reason is StopReason.COMPLETED,
            checkpoint_step=run.committer.committed_step,
        )
        run.committer.say(f"stopping at step {step}: {reason}")

    # ---- data ------------------------------------------------------------------------------

    def get_train_dataloader(self: Any) -> Any:
        self._colabjob.loader = loader = train_loader(self, self._colabjob.world_size)
        return loader

    def _get_dataloader(self: Any, *args: Any, **kwargs: Any) -> Any:
        """HF's eval/test loaders: their workers leave the stop signals to us too."""
        loader = super()._get_dataloader(*args, **kwargs)  # type: ignore[misc]
        if getattr(loader, "num_workers", 0):
            loader.worker_init_fn = quiet_workers(loader.worker_init_fn)
        return loader

    def get_batch_samples(self: Any, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        run = self._colabjob
        run.batches_in_epoch += len(batches)
        run.samples += sum(batch_len(b) for b in batches) * run.world_size  # equal batches
        return batches, n_items

    # ---- resume ----------------------------------------------------------------------------

    def _init_training_state(
        self: Any,
        max_steps: int,
        num_update_steps_per_epoch: int,
        num_train_epochs: int,
        resume_from_checkpoint: str | None,
        trial: Any,
    ) -> tuple[int, int]:
        run = self._colabjob
        rdir = None if run.resume_dir is None else str(run.resume_dir)
        super()._init_training_state(  # type: ignore[misc]
            max_steps, num_update_steps_per_epoch, num_train_epochs, rdir, trial
        )
        if run.resume_dir is not None:
            # a sharded model (or checkpoint) loads with its optimizer in _colabjob_restore
            apart = loads_apart(read_json(run.resume_dir / STATE_FILE), self.model, None)
            with run.loading():
                got = restore(
                    run.resume_dir,
                    Tracked(model=None if apart else self.model),
                    restore_rngs=False,
                )
            run.samples = got.counters.samples_seen
            if got.counters.step != self.state.global_step:
                raise ResumeError(
                    f"checkpoint counters say step {got.counters.step}, its trainer state "
                    f"{self.state.global_step}"
                )
        run.first_step = int(self.state.global_step)
        return run.epoch_index, 0

    def _run_epoch(self: Any, **kwargs: Any) -> Any:
        run = self._colabjob
        loader = kwargs["train_dataloader"]
        if run.pending_restore:
            run.pending_restore = False
            self._colabjob_restore(loader)
        if run.stop_reason is None and run.first_step == self.state.global_step:
            # agreed: no rank may start a step the others skip
            run.stop_reason = run.decide_start(self.state.global_step, int(self.state.max_steps))
        if run.stop_reason is not None or self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True  # nothing to do in this segment
            return None
        if isinstance(loader, ResumableLoader) and not loader.is_iterable:
            align_epoch(run, loader, kwargs, int(self.args.gradient_accumulation_steps))
        else:  # a stream: its length is unknown, HF's epoch counter is the epoch
            run.epoch_index, run.epoch_batches, run.batches_in_epoch = int(kwargs["epoch"]), 0, 0
        if int(kwargs["epoch"]) != run.epoch_index:
            raise ResumeError(
                f"the Trainer is in epoch {kwargs['epoch']} but the data in epoch "
                f"{run.epoch_index}"
            )
        run.t_last = run.ctx.monotonic()
        before = run.batches_in_epoch
        result = super()._run_epoch(**kwargs)  # type: ignore[misc]
        if (
            run.batches_in_epoch == before
            and not run.empty_epoch
            and run.stop_reason is None
            and self.state.global_step < self.state.max_steps
        ):
            # resumed right at a stream's end: HF stops on an empty epoch; go on to the next
            run.empty_epoch = True
            self.control.should_training_stop = False
        else:
            run.empty_epoch = run.batches_in_epoch == before
        return result


_CLASSES: dict[type, type] = {}


def make_resumable(
    trainer: Trainer, ctx: SegmentContext, *, checkpoint_meta: dict[str, Any] | None = None
) -> Trainer:
    """Make ``trainer`` (any ``Trainer`` subclass instance) resume and stop through ``ctx``.

    The instance's class is swapped for one with ``ResumableTrainerMixin`` in front of it;
    returns the same object, for chaining. ``checkpoint_meta`` (JSON) goes into every
    checkpoint's manifest ``meta``.
    """
    if not isinstance(trainer, Trainer):
        raise ConfigError(f"expected a transformers.Trainer, got {type(trainer).__name__}")
    cls = type(trainer)
    if not issubclass(cls, ResumableTrainerMixin):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Resumable{cls.__name__}", (ResumableTrainerMixin, cls), {})
        trainer.__class__ = _CLASSES[cls]
    trainer._colabjob_attach(ctx, checkpoint_meta)  # type: ignore[attr-defined]
    return trainer


class ColabJobTrainer(ResumableTrainerMixin, Trainer):  # type: ignore[misc]
    """A ``Trainer`` that resumes and stops through a ``SegmentContext`` (``segment=``)."""

    def __init__(
        self,
        *args: Any,
        segment: SegmentContext,
        checkpoint_meta: dict[str, Any] | None = None,
        forward_logs: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._colabjob_attach(segment, checkpoint_meta, forward_logs=forward_logs)
