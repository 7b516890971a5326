"""The built-in job kinds, chosen by ``job.kind`` in the spec.

``run_kind(spec, ctx)`` runs one segment of the job and returns its ``SegmentOutcome``:

- ``finetune`` (``finetune.py``): full causal-LM fine-tuning through HF Trainer;
- ``lora`` (``lora.py``): PEFT LoRA; checkpoints hold the adapters and their optimizer state
  only; the final artifact is the adapter or the merged model (``checkpoint.final_artifact``);
- ``scratch`` (``scratch.py``): a model built from a config (GPT-2 by default), with a given
  tokenizer or one trained on the data;
- ``python`` (``python.py``): the user's ``module:function`` driving a ``Session``.

All of them commit through ``ctx.checkpoints`` (manifest last, fenced by the lease), stop on
``ctx.policy`` and resume the data position exactly; none uses HF ``checkpoint-N`` folders.
Each runs on several processes too (``--nproc N``): the Trainer-based kinds as DDP through
``colabjob.jobs.hf.trainer`` (rank 0 commits), ``python`` through the user's ``Session`` loop.
Each kind module is imported only when its kind runs (transformers and peft load lazily).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from colabjob.errors import ConfigError

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.context import SegmentContext, SegmentOutcome

__all__ = ["KIND_MODULES", "preflight", "run_kind"]

KIND_MODULES: dict[str, str] = {
    "finetune": "colabjob.jobs.kinds.finetune",
    "lora": "colabjob.jobs.kinds.lora",
    "scratch": "colabjob.jobs.kinds.scratch",
    "python": "colabjob.jobs.kinds.python",
}


def run_kind(spec: JobSpec, ctx: SegmentContext) -> SegmentOutcome:
    """Run one segment of ``spec`` (dispatching on ``spec.job.kind``) in ``ctx``."""
    kind = spec.job.kind
    if kind not in KIND_MODULES:
        raise ConfigError(
            f"job.kind: unknown kind {kind!r}", hint=f"one of {', '.join(KIND_MODULES)}"
        )
    module = importlib.import_module(KIND_MODULES[kind])
    outcome: SegmentOutcome = module.run(spec, ctx)
    return outcome


def preflight(spec: JobSpec) -> None:
    """Cheap checks of what ``run_kind`` would load, before anything is written to the job's
    storage: local data exists and has ``text_field``; a local model directory has a config;
    LoRA target modules exist in it (the model is built on the meta device: no weights are
    read); a ``python`` entrypoint imports. Hub names are not checked (no network here).
    Raises ``ConfigError`` (exit code 2)."""
    from colabjob.config.schema import looks_local

    if spec.job.kind == "python":
        from colabjob.jobs.kinds.python import load_entrypoint

        assert spec.job.entrypoint is not None
        load_entrypoint(spec.job.entrypoint)
    if spec.data is not None and spec.data.is_local:
        from colabjob.jobs.data.text import iter_texts

        next(iter_texts(spec.data), None)  # opens the first file and reads one document
    model = spec.model
    if model is None or model.name_or_path is None or not looks_local(model.name_or_path):
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            model.name_or_path, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path: {model.name_or_path!r} has no usable config: {e}",
            hint="give a directory written by save_pretrained",
        ) from e
    if spec.job.kind == "lora":
        import torch
        from transformers import AutoModelForCausalLM

        from colabjob.jobs.kinds.lora import check_targets

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        check_targets(skeleton, spec)
