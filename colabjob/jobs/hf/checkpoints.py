"""The HF Trainer mixin's checkpoints: what they hold, how a resume loads them, and each save.

``TrainerCheckpoints`` is mixed into ``ResumableTrainerMixin`` (``colabjob.jobs.hf.trainer``,
whose docstring tells the whole flow). A save (``_colabjob_save``, every rank at an optimizer
step) snapshots the model or its trainable tensors, the optimizer, scheduler, scaler, RNGs,
the data position and the ``TrainerState`` and hands it to the run's one committer; with
several processes rank 0 gathers every rank's RNGs and loader position and alone commits. A
model sharded with FSDP2 (``colabjob.jobs.hf.fsdp``) has its model and optimizer written by
every rank as DCP shards (``saver.start_shards``). ``_colabjob_restore`` loads a checkpoint
at the first resumed epoch, RNGs last.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from colabjob.jobs.checkpointing.saver import (
    gather_rank_states,
    load_model_state,
    loads_apart,
    seed_missing_rank,
    send_rank_state,
    start_shards,
)
from colabjob.jobs.data import Geometry, ResumableLoader
from colabjob.jobs.hf.callback import TRAINER_STATE_FILE, HFRun, metric_rows, remaining_batches
from colabjob.jobs.state.capture import snapshot
from colabjob.jobs.state.codec import read_json
from colabjob.jobs.state.format import STATE_FILE, Counters
from colabjob.jobs.state.restore import restore
from colabjob.jobs.state.sharded import SHARDED_DIR, SHARDED_META, saves_shards
from colabjob.jobs.state.sizing import checkpoint_nbytes
from colabjob.jobs.state.tracked import Tracked

__all__ = ["TrainerCheckpoints"]


class TrainerCheckpoints:
    """The checkpoint half of ``ResumableTrainerMixin`` (see the module docstring)."""

    _colabjob: HFRun

    def _colabjob_tracked(self: Any, loader: Any, scaler: Any) -> Tracked:
        """What this Trainer's checkpoints hold (``colabjob.jobs.state.tracked``): the
        model, optimizer, scheduler, ``scaler``, ``loader`` and the batch geometry."""
        return Tracked(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.lr_scheduler,
            scaler=scaler,
            loader=loader,
            geometry=self._colabjob_geometry(),
        )

    def _colabjob_optimizer(self: Any) -> Any:
        """The torch optimizer inside accelerate's wrapper (what DCP reads and loads)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _colabjob_geometry(self: Any) -> Geometry:
        return Geometry(
            batch_size=int(self._train_batch_size),
            grad_accum=int(self.args.gradient_accumulation_steps),
            world_size=self._colabjob.world_size,
        )

    def _colabjob_restore(self: Any, loader: Any) -> None:
        run = self._colabjob
        assert run.resume_dir is not None
        scaler = getattr(self.accelerator, "scaler", None)
        doc = read_json(run.resume_dir / STATE_FILE)
        saved_scaler = bool((doc.get("optimizer") or {}).get("scaler"))
        apart = loads_apart(doc, self.model, None)
        tracked = dataclasses.replace(  # a whole model was loaded before HF prepared it
            self._colabjob_tracked(
                loader if isinstance(loader, ResumableLoader) else None,
                scaler if saved_scaler else None,
            ),
            model=None,
        )
        with run.loading():
            if apart:  # every rank: DCP files resharded, or whole files cut to the shards
                load_model_state(run.resume_dir, doc, self.model, self._colabjob_optimizer())
                tracked = dataclasses.replace(tracked, optimizer=None)
            got = restore(
                run.resume_dir,
                tracked,
                allow_geometry_change=run.ctx.allow_geometry_change,
                restore_rngs=True,  # last: nothing may draw from the RNGs before the next step
                rank=run.rank,
            )
        if run.rank and not got.rng_found:  # a rank the checkpoint's run did not have
            seed_missing_rank(int(self.args.seed), run.rank, got, run.committer.say)
        hf = got.meta.get("hf") or {}
        self._tr_loss.fill_(float(hf.get("tr_loss", 0.0)))
        self._globalstep_last_logged = int(hf.get("last_logged", self.state.global_step))
        self._colabjob_restore_totals(hf, run.committer.say if run.rank == 0 else None)

    def _save_checkpoint(self: Any, model: Any, trial: Any) -> None:
        """Called by the Trainer when ``control.should_save``: commit through colabjob."""
        run = self._colabjob
        if run.committer.committed_step == self.state.global_step:
            return
        final = bool(self.control.should_training_stop)
        if not final and run.busy:
            run.save_due = True  # one commit in flight: this one waits for a later boundary
            return
        self._colabjob_save(final=final)
        run.t_last = run.ctx.monotonic()  # the pause is a checkpoint cost, not step time

    def _colabjob_save(self: Any, *, final: bool) -> None:
        run = self._colabjob
        t0 = run.ctx.monotonic()
        self.store_flos()  # a collective with several processes: every rank is here
        step = int(self.state.global_step)
        loader = run.loader
        tr_loss = self._tr_loss
        if run.sync is not None:  # the mean HF logs, the same on every resumed rank
            tr_loss = self.accelerator.gather(tr_loss.detach().reshape(1)).mean()
        shards = None
        if saves_shards(self.model):  # every rank writes its shards (DCP)
            shards = start_shards(
                run.ctx, run.committer, run.sync, self.model, self._colabjob_optimizer(), step,
                background=not final,
            )
        if run.sync is not None and run.rank != 0:
            send_rank_state(run.sync, loader)
            run.committer.follow(step, final=final)
            run.save_due = False
            return
        for cb in [*self.callback_handler.callbacks, self.control]:
            if hasattr(cb, "state") and callable(cb.state) and self.state.stateful_callbacks:
                name = type(cb).__name__
                if name in self.state.stateful_callbacks:
                    self.state.stateful_callbacks[name] = cb.state()
        state_json = json.dumps(dataclasses.asdict(self.state), sort_keys=True).encode()
        left = remaining_batches(loader) if loader is not None else None
        epoch_index = run.epoch_index + (1 if left == 0 else 0)
        hf = {
            "epoch_index": epoch_index,
            "tr_loss": float(tr_loss.item()),
            "total_loss": self._colabjob_loss_sum(),
            "learning_rate": getattr(self, "_colabjob_lr", float(self.args.learning_rate)),
            "last_logged": int(self._globalstep_last_logged),
            "train_batch_size": int(self._train_batch_size),
        }
        scaler = getattr(self.accelerator, "scaler", None)
        tracked = self._colabjob_tracked(
            loader, scaler if scaler is not None and scaler.is_enabled() else None
        )
        snap_meta: dict[str, Any] = {"hf": hf}
        if shards is not None:  # the model and optimizer are on disk already: copy the rest
            tracked = dataclasses.replace(tracked, model=None, optimizer=None)
            snap_meta[SHARDED_META] = SHARDED_DIR
            clone = True
        else:  # a background save copies the state first: only when it fits in host memory
            clone = not final and run.committer.background_fits(
                checkpoint_nbytes(self.model, self.optimizer)
            )
        snap = snapshot(
            tracked,
            counters=Counters(
                step=int(self.state.global_step),
                epoch=epoch_index,
                samples_seen=run.samples,
                tokens_seen=int(self.state.num_input_tokens_seen or 0),
            ),
            metrics=metric_rows(self.state.log_history),
            meta=snap_meta,
            clone=clone,
            staging=run.committer.staging,
        )
        if shards is not None:
            snap = dataclasses.replace(snap, shards=shards)
        if run.sync is not None:
            snap = gather_rank_states(run.sync, snap)
        snap_s = run.ctx.monotonic() - t0
        extra = {TRAINER_STATE_FILE: state_json}
        meta = {**run.extra_meta, "hf": True}  # samples_seen and epoch: the committer's
        if final:
            run.committer.save_final(snap, snap_seconds=snap_s, extra=extra, meta=meta)
        else:
            run.committer.save_async(snap, snap_seconds=snap_s, extra=extra, meta=meta)
        run.save_due = False
