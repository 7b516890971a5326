"""``lora``: PEFT LoRA on a pretrained causal LM through HF Trainer.

The frozen base is loaded in the compute dtype (bf16/fp16 on a GPU, fp32 on CPU) unless
``model.dtype`` says otherwise; adapters go on ``lora.target_modules`` (``auto``: the table in
``colabjob.config.lora_targets`` by ``config.model_type``; a name the model lacks is a
``ConfigError``). Checkpoints hold only the trainable tensors (the adapters) and their
optimizer state: the snapshot keeps trainable parameters when part of the model is frozen.
The final artifact (``final/``) is the adapter (``adapter_config.json`` +
``adapter_model.safetensors``) or, with ``checkpoint.final_artifact: merged``, the base with
the adapters merged in, a plain model that ``AutoModelForCausalLM.from_pretrained`` loads.
With ``training.fsdp`` on several processes the frozen base is sharded as it loads, the
adapters stay whole and alike on every rank (checkpoints are unchanged), and a merged
artifact is merged by rank 0 into a whole copy of the base.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from colabjob.errors import ConfigError
from colabjob.jobs.defaults import DeviceCaps, choose_precision
from colabjob.jobs.kinds.hf_trainer import (
    load_model,
    load_pretrained,
    plan_training,
    run_trainer,
    weights_dtype,
)
from colabjob.jobs.state.sharded import is_sharded

if TYPE_CHECKING:
    from colabjob.config import JobSpec
    from colabjob.jobs.context import SegmentContext, SegmentOutcome

__all__ = ["add_adapters", "check_targets", "merged_on_whole_base", "run"]


def check_targets(model: Any, spec: JobSpec) -> tuple[str, ...]:
    """The spec's LoRA target modules for ``model``; ConfigError naming any it lacks."""
    assert spec.lora is not None
    targets = spec.lora.modules_for(str(model.config.model_type))
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {missing} not in the model ({model.config.model_type})",
            hint="list module names the model has, e.g. "
            + ", ".join(sorted({n.rsplit('.', 1)[-1] for n in names if n})[:8]),
        )
    return targets


def add_adapters(model: Any, spec: JobSpec) -> Any:
    """``model`` wrapped by PEFT with the spec's LoRA adapters (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    assert spec.lora is not None
    targets = check_targets(model, spec)
    from transformers.pytorch_utils import Conv1D

    conv1d = any(  # GPT-2 style layers store weights transposed
        isinstance(mod, Conv1D) and name.rsplit(".", 1)[-1] in targets
        for name, mod in model.named_modules()
    )
    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=cast(Any, spec.lora.alpha),  # peft types it int; a float scales as well
        lora_dropout=spec.lora.dropout,
        target_modules=list(targets),
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merged_on_whole_base(trained: Any, spec: JobSpec, precision: str, *, main: bool) -> Any:
    """Every rank, for a base sharded over the processes: the trained adapters (saved by
    every rank, as PEFT gathers sharded state) merged by the ``main`` rank into a whole
    copy of the base it loads; None on the other ranks."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="colabjob-adapter-") as tmp:
        trained.save_pretrained(tmp, is_main_process=main)
        if not main:
            return None
        base = load_model(spec, weights_dtype(spec, precision, frozen_base=True), shard=False)
        return PeftModel.from_pretrained(base, tmp).merge_and_unload()


def run(spec: JobSpec, ctx: SegmentContext) -> SegmentOutcome:
    assert spec.model is not None and spec.data is not None
    caps = DeviceCaps.detect()
    precision, _ = choose_precision(spec.training.precision, caps)
    tokenizer, dataset, base = load_pretrained(spec, precision, frozen_base=True)
    model = add_adapters(base, spec)
    plan = plan_training(spec, ctx, model, caps=caps)
    if plan.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input

    def save_model(trained: Any, directory: Path, main: bool) -> None:
        if spec.checkpoint.final_artifact != "merged":
            trained.save_pretrained(directory, is_main_process=main)
        elif is_sharded(trained):  # every rank: PEFT's save gathers the sharded state
            merged = merged_on_whole_base(trained, spec, precision, main=main)
            if merged is not None:
                merged.save_pretrained(directory)
        else:
            trained.merge_and_unload().save_pretrained(directory)

    return run_trainer(
        spec, ctx, model=model, tokenizer=tokenizer, dataset=dataset, plan=plan,
        save_model=save_model,
    )
