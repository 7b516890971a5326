"""How an HF Trainer segment reports across sessions: the whole job's ``train_loss``, the
end-of-``train()`` banner on a pause, and a learning rate changed on resume.

- ``train_loss``: HF divides the loss summed in this ``train()`` call by the steps of this
  call only, while a resume restores the sum of the steps before it too (``_tr_loss``, the
  part not yet logged), so a resumed run reported a wrong mean. The checkpoint keeps the
  job's running sum (``total_loss``: HF's ``_total_loss_scalar``); restored, the same sums
  in the same order give the uninterrupted run's mean exactly: ``job_train_loss``.
- HF logs "Training completed. Do not forget to share your model..." at the end of every
  ``train()``, a pause included; ``completion_banner_off`` drops that one record from the
  ``transformers.trainer`` logger while a paused segment finishes, so colabjob's "paused"
  line is the last word.
- The optimizer and scheduler state in the checkpoint keep the learning rate the job
  started with; a script rerun with another ``learning_rate`` is told so once
  (``lr_change_note``), as the spec path does for ``--set``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["JobLossMixin", "completion_banner_off", "job_train_loss", "lr_change_note"]

_BANNER = "Training completed."


def job_train_loss(hf_meta: Mapping[str, Any], step: int) -> float | None:
    """The mean loss over the whole job at ``step`` from a checkpoint's ``hf`` meta (None for
    a checkpoint written before the running sum was kept). HF's own formula: the logged sum
    plus the unlogged remainder, over the steps."""
    total = hf_meta.get("total_loss")
    if total is None:
        return None
    return (float(total) + float(hf_meta.get("tr_loss", 0.0))) / max(step, 0.001)


class _DropBanner(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _BANNER not in str(record.msg)


@contextlib.contextmanager
def completion_banner_off(paused: bool) -> Iterator[None]:
    """While a paused segment finishes (``paused``), HF's completion banner is not logged."""
    if not paused:
        yield
        return
    logger, drop = logging.getLogger("transformers.trainer"), _DropBanner()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def lr_change_note(saved: Any, now: float) -> str | None:
    """The line for a resume whose ``learning_rate`` differs from the checkpoint's."""
    if saved is None or float(saved) == float(now):
        return None
    return (
        f"changed training_args.learning_rate: {float(saved):g} -> {float(now):g} is ignored "
        "on resume: the checkpoint's optimizer and scheduler keep the job's learning rate "
        f"({float(saved):g}); start a new job to train with another one"
    )


class JobLossMixin:
    """The Trainer side of the above (a base of ``ResumableTrainerMixin``): the running loss
    sum and learning rate a checkpoint keeps, and HF's end of ``train()`` with the job's
    ``train_loss`` and, on a pause, without its completion banner."""

    def _colabjob_begin_totals(self: Any, *, fresh: bool) -> None:
        self._colabjob_job_loss = fresh  # from step 0, HF's loss sum is the job's
        self._colabjob_lr = float(self.args.learning_rate)  # the saved one, once restored
        self._colabjob_total: float | None = None

    def _colabjob_restore_totals(self: Any, hf: Mapping[str, Any], say: Any) -> None:
        """After HF reset its sums: the checkpoint's ``hf`` meta; ``say`` the LR note."""
        if hf.get("total_loss") is not None:
            self._total_loss_scalar = float(hf["total_loss"])
            self._colabjob_job_loss = True
        if hf.get("learning_rate") is not None:
            note = lr_change_note(hf["learning_rate"], self.args.learning_rate)
            self._colabjob_lr = float(hf["learning_rate"])
            if note is not None and say is not None:
                say(f"warning: {note}")

    def _colabjob_loss_sum(self: Any) -> float | None:
        """The job's logged loss sum for a checkpoint (None: not known from step 0). A save
        after ``train()`` ended takes the sum from before HF added the unlogged rest."""
        if not getattr(self, "_colabjob_job_loss", False):
            return None
        total = getattr(self, "_colabjob_total", None)
        return float(self._total_loss_scalar if total is None else total)

    def _finalize_training(self: Any, trial: Any, num_train_samples: int, start_time: float) -> Any:
        from transformers.trainer_utils import TrainOutput

        reason = self._colabjob.stop_reason  # a StopReason (a str enum) or None
        self._colabjob_total = float(self._total_loss_scalar)
        self._colabjob_finalizing = True
        try:
            with completion_banner_off(reason is not None and reason != "completed"):
                out = super()._finalize_training(trial, num_train_samples, start_time)  # type: ignore[misc]
        finally:
            self._colabjob_finalizing = False
        loss = out.metrics.get("train_loss", out.training_loss)
        return TrainOutput(out.global_step, loss, out.metrics)

    def log(self: Any, logs: dict[str, float], start_time: float | None = None) -> None:
        finalizing = getattr(self, "_colabjob_finalizing", False) and "train_loss" in logs
        if finalizing and getattr(self, "_colabjob_job_loss", False):  # HF's: this call's only
            logs["train_loss"] = self._total_loss_scalar / max(self.state.global_step, 0.001)
        super().log(logs, start_time)  # type: ignore[misc]
