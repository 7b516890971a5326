"""``resumable(trainer, url)``: an existing HF Trainer script, resumable across sessions.

Two added lines (three with a budget variable) turn a script that ends with
``trainer.train()`` into one that stops before the session's end with a committed
checkpoint and, run again in the next session, continues exactly where it stopped::

    from colabjob.hf import resumable                                   # added
    trainer = Trainer(model=model, args=args, train_dataset=ds, ...)    # as before
    trainer = resumable(trainer, "gs://bucket/jobs/gpt2", budget="colab-free")  # added
    trainer.train()                                                     # as before

Each ``train()`` call is one segment of the job at ``url``, opened like
``colabjob.session()`` (``colabjob.runner.segment``): the job record, the lease (one live
runner per job), the watchdog (budget, signals, preemption notice, stop requests) and
checkpoints fenced by the lease. The training itself is ``colabjob.jobs.hf.trainer``: our
checkpoints, exact data position and RNGs, never HF ``checkpoint-N`` folders.

When the segment pauses (budget, signal, ...) rather than completes, the code after
``train()`` (saving "the final model") must not run: in a script ``train()`` exits the
process with code 75 ("paused, run me again"); in a notebook (or with
``exit_on_pause=False``) it returns and ``trainer.colabjob_outcome.completed`` is False.
Likewise a usage error (the job's lease held by a live runner, a changed batch geometry)
exits 2 with the CLI's one-line message in a script, and is raised in a notebook; its hint
names keyword arguments (``force=True``, ``allow_geometry_change=True``).
If the job already completed, ``train()`` loads the final weights from the newest
checkpoint and returns without training, so the rest of the script still works.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from colabjob.clock import Clock
from colabjob.errors import ConfigError, ExitCode
from colabjob.jobs.context import SegmentOutcome
from colabjob.jobs.hf.trainer import ResumableTrainerMixin
from colabjob.jobs.policy import StopReason
from colabjob.runner.options import DEFAULTS, SegmentOptions
from colabjob.runner.record import (
    SCRIPT_KEY,
    JobRecord,
    read_record,
    script_config,
    update_record,
)
from colabjob.runner.script_errors import interactive, reported_for_script
from colabjob.runner.segment import open_segment
from colabjob.runner.states import JobEvent, JobState
from colabjob.storage.store import Store, open_store

__all__ = ["resumable"]


def _config_of(trainer: Any) -> dict[str, Any]:
    """The record's config: under ``script`` (not a job spec: the CLI never validates it as
    one, and ``colabjob resume`` says to rerun the script)."""
    try:
        args = json.loads(trainer.args.to_json_string())
    except (TypeError, ValueError):
        args = {}
    keep = (
        "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
        "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_steps", "weight_decay",
        "seed", "data_seed", "fp16", "bf16", "optim",
    )
    model = getattr(getattr(trainer.model, "config", None), "_name_or_path", None)
    return {
        SCRIPT_KEY: {
            "kind": "hf-trainer",
            "trainer": type(trainer).__name__,
            "model": model,
            "training_args": {k: args[k] for k in keep if k in args},
        }
    }


def _with_max_steps(config: dict[str, Any]) -> Callable[[JobRecord], JobRecord]:
    """A record change: the script's ``max_steps`` as this run sets it (what ``status``
    counts to), and a COMPLETED job whose final step is below it ``extend``-ed (SUSPENDED,
    so this segment resumes it)."""
    steps = config[SCRIPT_KEY]["training_args"].get("max_steps")

    def change(record: JobRecord) -> JobRecord:
        script = script_config(record.config)
        if script is None or not isinstance(steps, int):
            return record
        args = dict(script.get("training_args") or {})
        if args.get("max_steps") != steps or SCRIPT_KEY not in record.config:
            args["max_steps"] = steps  # (a record from before SCRIPT_KEY takes its form)
            new = {k: v for k, v in script.items() if k not in ("job", "training_args")}
            new = {SCRIPT_KEY: {**new, "training_args": args}}
            record = dataclasses.replace(record, config=new)
        if record.state is JobState.COMPLETED and steps > (record.last_step or 0):
            record = record.apply(JobEvent.EXTEND)
        return record

    return change


class _SegmentTrainerMixin:
    """Wraps each ``train()`` call in a runner segment (record, lease, watchdog)."""

    _colabjob_store: Store
    _colabjob_opts: SegmentOptions
    _colabjob_exit: bool | None

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        store = self._colabjob_store
        config = _config_of(self)
        got = read_record(store)
        if got is not None:  # a larger max_steps continues a completed job
            update_record(store, _with_max_steps(config), clock=self._colabjob_opts.clock)
            got = read_record(store)
        if got is not None and got[0].state is JobState.COMPLETED:
            return self._colabjob_load_completed()
        exit_now = self._colabjob_exit
        if exit_now is None:
            exit_now = not interactive()
        with (
            reported_for_script(exit_on_error=exit_now),  # a held lease: one line, exit 2
            open_segment(store, self._colabjob_opts, config=config) as seg,
        ):
            self._colabjob_attach(seg.context)
            try:
                output = super().train(*args, **kwargs)  # type: ignore[misc]
            finally:  # on an error, the crash outcome the mixin recorded
                seg.outcome = self.colabjob_outcome
        outcome: SegmentOutcome = self.colabjob_outcome
        if not outcome.completed:
            log = self._colabjob_opts.log
            if log is not None:
                log(
                    f"paused at step {outcome.last_step} ({outcome.stop_reason}); run this "
                    "again to resume from the committed checkpoint"
                )
            if exit_now:
                raise SystemExit(ExitCode.PAUSED)
        return output

    def _colabjob_load_completed(self: Any) -> Any:
        """The job is done: load its last weights and trainer state (so ``save_state()``
        after ``train()`` writes the finished run's, not an empty one), train nothing."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        from colabjob.jobs.context import SegmentContext
        from colabjob.jobs.hf.callback import TRAINER_STATE_FILE
        from colabjob.jobs.hf.trainer import job_train_loss
        from colabjob.jobs.state.restore import restore
        from colabjob.jobs.state.tracked import Tracked
        from colabjob.storage.checkpoints import CheckpointStore

        checkpoints = CheckpointStore(self._colabjob_store)
        self._colabjob_attach(SegmentContext(store=self._colabjob_store, checkpoints=checkpoints))
        with tempfile.TemporaryDirectory(prefix="colabjob-final-") as tmp:
            info = checkpoints.fetch_latest(tmp)
            if info is None:
                raise ConfigError(
                    f"job at {self._colabjob_store.url} completed without a checkpoint"
                )
            got = restore(tmp, Tracked(model=self.model), restore_rngs=False)
            if (Path(tmp) / TRAINER_STATE_FILE).exists():
                self.state = TrainerState.load_from_json(str(Path(tmp) / TRAINER_STATE_FILE))
        log = self._colabjob_opts.log
        if log is not None:
            log(f"job already completed at step {info.step}: loaded its weights, nothing to train")
        self._colabjob.outcome = SegmentOutcome(
            stop_reason=StopReason.COMPLETED,
            first_step=info.step,
            last_step=info.step,
            completed=True,
            checkpoint_step=info.step,
        )
        loss = job_train_loss(got.meta.get("hf") or {}, info.step)
        metrics = {"train_loss": loss} if loss is not None else {}
        return TrainOutput(info.step, 0.0 if loss is None else loss, metrics)


_CLASSES: dict[type, type] = {}


def resumable(
    trainer: Any,
    url: str | os.PathLike[str] | Store,
    *,
    budget: str | float | None = DEFAULTS.budget,
    platform: str | None = DEFAULTS.platform,
    session_started_at: str | float | None = DEFAULTS.session_started_at,
    margin: str | float | None = DEFAULTS.margin,
    step_guess: str | float | None = DEFAULTS.step_guess,
    save_guess: str | float | None = DEFAULTS.save_guess,
    every_steps: int | None = DEFAULTS.every_steps,
    every_minutes: float | None = DEFAULTS.every_minutes,
    keep: int = DEFAULTS.keep,
    allow_geometry_change: bool = DEFAULTS.allow_geometry_change,
    staging_dir: str | os.PathLike[str] | None = DEFAULTS.staging_dir,
    force: bool = DEFAULTS.force,
    exit_on_pause: bool | None = None,
    log: Callable[[str], None] | None = DEFAULTS.log,
    tensorboard: bool | Literal["auto"] = DEFAULTS.tensorboard,
    wandb: bool = DEFAULTS.wandb,
    wandb_project: str | None = DEFAULTS.wandb_project,
    clock: Clock = DEFAULTS.clock,
    async_checkpoint: bool | Literal["auto"] = DEFAULTS.async_checkpoint,
) -> Any:
    """Make ``trainer`` (a ``transformers.Trainer``, any subclass) resumable at ``url``.

    ``url``: a local path, ``/content/drive/MyDrive/...``, ``gs://bucket/prefix`` or
    ``memory://name``. ``budget`` (``"11h30m"``, ``"colab-pro"``), ``platform``,
    ``session_started_at`` and ``margin`` override what the platform says about the
    session's end; ``step_guess``/``save_guess`` (seconds or ``"2m"``) what the stop rule
    assumes until a step / a checkpoint is measured. Checkpoints every ``every_steps`` steps
    and/or ``every_minutes`` (in the background), plus a final one when stopping; ``keep``
    newest are kept; ``async_checkpoint`` as in ``colabjob.session`` (``"auto"``: in the
    background unless a copy of the state would not fit in host memory). ``tensorboard`` /
    ``wandb``: trackers fed from HF's log rows (see
    ``colabjob.session``); HF's own ``report_to`` keeps working too. ``force`` takes
    over an expired lease. ``exit_on_pause``: exit with code 75 after a pause, and with 2
    (one line on stderr) after a usage error (default: yes in a script, no in a notebook).
    Returns the same trainer object.
    """
    opts = SegmentOptions.from_arguments(
        locals(),
        besides=("trainer", "url", "exit_on_pause"),
        log_metrics=False,  # HF prints its own log rows
    )
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise ConfigError(f"resumable() takes a transformers.Trainer, got {type(trainer).__name__}")
    cls = type(trainer)
    if not issubclass(cls, _SegmentTrainerMixin):
        if cls not in _CLASSES:
            bases = (_SegmentTrainerMixin, ResumableTrainerMixin, cls)
            _CLASSES[cls] = type(f"Resumable{cls.__name__}", bases, {})
        trainer.__class__ = _CLASSES[cls]
    t: Any = trainer
    t._colabjob_store = url if isinstance(url, Store) else open_store(url)
    t._colabjob_opts = opts
    t._colabjob_exit = exit_on_pause
    return trainer
