"""``finetune``: full causal-LM fine-tuning of a pretrained model through HF Trainer.

The model (``model.name_or_path``, a local directory or a hub name) is loaded with fp32
master weights unless ``model.dtype`` says otherwise; mixed precision comes from
``training.precision``. The data is tokenized with the model's tokenizer (or
``tokenizer.name_or_path``) and packed. Checkpoints hold the full model, optimizer,
scheduler, scaler, RNGs and data position; the final artifact (``final/``) is the model and
tokenizer as ``save_pretrained`` writes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from colabjob.jobs.defaults import DeviceCaps
from colabjob.jobs.kinds.hf_trainer import load_pretrained, plan_training, run_trainer

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.context import SegmentContext, SegmentOutcome


def run(spec: JobSpec, ctx: SegmentContext) -> SegmentOutcome:
    assert spec.model is not None and spec.data is not None
    tokenizer, dataset, model = load_pretrained(spec, "fp32", frozen_base=False)
    plan = plan_training(spec, ctx, model, caps=DeviceCaps.detect())
    return run_trainer(spec, ctx, model=model, tokenizer=tokenizer, dataset=dataset, plan=plan)
